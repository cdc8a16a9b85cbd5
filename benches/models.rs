//! Per-step UNet time and VAE decode time for the fixture models and a medium config
//! (UNet block_out_channels 64/128/256, 2 layers per block, 32×32 latents).
//!
//! `cargo bench --bench models` prints a table and writes `target/bench-models/results.json`;
//! `scripts/bench_compare.sh` runs this and `scripts/bench_diffusers.py` on the same weights in
//! one go and prints tiller/diffusers ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tiller::models::random_init::{write_random_unet, write_random_vae};
use tiller::models::unet_2d::{UNet2DConditionModel, UNet2DConfig};
use tiller::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use tiller::models::weights::{load_component, read_config};
use tiller::sampling::SeededNoise;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(SeededNoise::new(seed).sample_vec(n), shape, &Device::Cpu).unwrap()
}

fn medium_dir() -> PathBuf {
    let dir = root().join("target/bench-models/medium");
    if !dir.join("unet/diffusion_pytorch_model.safetensors").is_file() {
        let unet = json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": 32, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [64, 128, 256], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 4, "norm_num_groups": 32,
            "use_linear_projection": false
        });
        let vae = json!({
            "_class_name": "AutoencoderKL",
            "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [64, 128, 256], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "sample_size": 128, "scaling_factor": 0.18215
        });
        write_random_unet(&dir.join("unet"), &unet, 1).unwrap();
        write_random_vae(&dir.join("vae"), &vae, 2).unwrap();
    }
    dir
}

struct Case {
    name: &'static str,
    dir: PathBuf,
    context_len: usize,
}

fn bench_case(c: &Case, reps: usize) -> serde_json::Value {
    let dev = Device::Cpu;
    let ucfg: UNet2DConfig = read_config(&c.dir.join("unet/config.json")).unwrap();
    let vcfg: AutoencoderKLConfig = read_config(&c.dir.join("vae/config.json")).unwrap();
    let uw = load_component(&c.dir.join("unet"), "diffusion_pytorch_model", None, DType::F32, &dev).unwrap();
    let vw = load_component(&c.dir.join("vae"), "diffusion_pytorch_model", None, DType::F32, &dev).unwrap();
    let unet = UNet2DConditionModel::load(uw.var_builder(), &ucfg).unwrap();
    let vae = AutoencoderKL::load(vw.var_builder(), &vcfg).unwrap();
    let side = ucfg.sample_size.unwrap_or(8);
    let ctx_dim = match &ucfg.cross_attention_dim {
        tiller::models::unet_2d::PerBlock::One(d) => *d,
        tiller::models::unet_2d::PerBlock::Each(v) => v[0],
    };
    let tcond = ucfg.time_cond_proj_dim.map(|d| randn(&[2, d], 5));
    let mut out = serde_json::Map::new();
    for batch in [1usize, 2] {
        let x = randn(&[batch, ucfg.in_channels, side, side], 3);
        let ctx = randn(&[batch, c.context_len, ctx_dim], 4);
        let tc = tcond.as_ref().map(|t| t.narrow(0, 0, batch).unwrap());
        let ms = median_ms(reps, || {
            unet.forward(
                &x,
                &tiller::models::timesteps(500.0, x.dim(0).unwrap(), x.device()).unwrap(),
                &ctx,
                tc.as_ref(),
            )
            .unwrap();
        });
        out.insert(format!("unet_step_b{batch}_ms"), json!(ms));
    }
    let z = randn(&[1, vcfg.latent_channels, side, side], 6);
    let ms = median_ms(reps, || {
        vae.decode(&z).unwrap();
    });
    out.insert("vae_decode_ms".into(), json!(ms));
    out.insert("latent_side".into(), json!(side));
    out.insert("threads".into(), json!(candle_core::utils::get_num_threads()));
    serde_json::Value::Object(out)
}

fn main() {
    // `cargo bench` passes `--bench`; anything else that is not a flag filters cases by name.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let fixtures = root().join("tests/fixtures/models");
    let cases = [
        Case { name: "sd15-tiny", dir: fixtures.join("sd15-tiny"), context_len: 77 },
        Case { name: "sd2-tiny", dir: fixtures.join("sd2-tiny"), context_len: 77 },
        Case { name: "lcm-tiny", dir: fixtures.join("lcm-tiny"), context_len: 77 },
        Case { name: "medium", dir: medium_dir(), context_len: 77 },
    ];
    let reps: usize = std::env::var("TILLER_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut results = serde_json::Map::new();
    println!("{:<10} {:>8} {:>14} {:>14} {:>14}", "model", "latent", "unet b1 (ms)", "unet b2 (ms)", "vae dec (ms)");
    for c in cases.iter().filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str()))) {
        if !c.dir.join("unet/config.json").is_file() {
            eprintln!("skipping {}: {} missing", c.name, c.dir.display());
            continue;
        }
        let r = bench_case(c, reps);
        println!(
            "{:<10} {:>8} {:>14.2} {:>14.2} {:>14.2}",
            c.name,
            format!("{0}x{0}", r["latent_side"]),
            r["unet_step_b1_ms"].as_f64().unwrap(),
            r["unet_step_b2_ms"].as_f64().unwrap(),
            r["vae_decode_ms"].as_f64().unwrap()
        );
        let mut r = r;
        r["dir"] = json!(c.dir.display().to_string());
        results.insert(c.name.to_string(), r);
    }
    let out = root().join("target/bench-models/results.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&serde_json::Value::Object(results)).unwrap()).unwrap();
    println!("wrote {}", display(&out));
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
