//! Per-step UNet time (batch 1, 2 and 8) and VAE decode time for the fixture models and a
//! medium config (UNet block_out_channels 64/128/256, 2 layers per block, 32×32 latents), and a
//! whole 20-step generation of the medium pipeline; for the medium config also the fused
//! attention alone at the generation's 4,096 tokens (4 heads of 16).
//!
//! `cargo bench --bench models` prints a table and writes `target/bench-models/results.json`
//! (the attention time is in the JSON and in `bench_compare.sh`'s summary);
//! `TILLER_BENCH_ONLY=unet_b1,unet_b2,unet_b8,vae,attention,generate` picks measures, `TILLER_BENCH_REPS`
//! the repetitions (median reported; the generation runs a third as many);
//! `scripts/bench_compare.sh` runs this and `scripts/bench_diffusers.py` on the same weights in
//! one go and prints tiller/diffusers ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tiller::models::random_init::{write_random_clip_text, write_random_unet, write_random_vae};
use tiller::models::unet_2d::{UNet2DConditionModel, UNet2DConfig};
use tiller::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use tiller::models::weights::{load_component, read_config};
use tiller::pipeline::GenerationParams;
use tiller::sampling::{SamplerKind, SeededNoise};

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
    if !dir.join("text_encoder/model.safetensors").is_file() {
        // A whole pipeline around the UNet and VAE, for the 20-step generation: a 4-layer CLIP
        // text encoder of SD's width (768) on the tiny fixture's tokenizer, and SD 1.5's
        // scheduler config, in the layout diffusers' StableDiffusionPipeline loads.
        let tiny = root().join("tests/fixtures/models/sd15-tiny");
        let mut te: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny.join("text_encoder/config.json")).unwrap()).unwrap();
        for (k, v) in [
            ("hidden_size", 768),
            ("intermediate_size", 3072),
            ("num_attention_heads", 12),
            ("num_hidden_layers", 4),
            ("projection_dim", 768),
        ] {
            te[k] = json!(v);
        }
        write_random_clip_text(&dir.join("text_encoder"), &te, 3).unwrap();
        for sub in ["tokenizer", "scheduler", "feature_extractor"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            for f in std::fs::read_dir(tiny.join(sub)).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, dir.join(sub).join(f.file_name().unwrap())).unwrap();
            }
        }
        std::fs::copy(tiny.join("model_index.json"), dir.join("model_index.json")).unwrap();
    }
    dir
}

/// One whole text-to-image generation of the medium pipeline: 256×256, 20 DDIM steps,
/// guidance 7.5 (40 UNet evaluations), prompt encoding and VAE decode included.
fn bench_generation(dir: &Path, reps: usize) -> f64 {
    let model = tiller::models::loader::load_model("medium", dir, &Device::Cpu, DType::F32).unwrap();
    let params = GenerationParams {
        prompt: "a red circle above a blue square".into(),
        n: 1,
        width: Some(256),
        height: Some(256),
        steps: Some(20),
        guidance_scale: Some(7.5),
        scheduler: Some(SamplerKind::Ddim),
        seed: 7,
        ..Default::default()
    };
    median_ms(reps, || {
        tiller::pipeline::generate(model.as_ref(), &params, &mut |_| true).unwrap();
    })
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
    let tcond = ucfg.time_cond_proj_dim.map(|d| randn(&[8, d], 5));
    let mut out = serde_json::Map::new();
    let only = std::env::var("TILLER_BENCH_ONLY").unwrap_or_default();
    let wanted = |m: &str| only.is_empty() || only.split(',').any(|w| w == m);
    for batch in [1usize, 2, 8] {
        if !wanted(&format!("unet_b{batch}")) {
            continue;
        }
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
    if wanted("vae") {
        let z = randn(&[1, vcfg.latent_channels, side, side], 6);
        let ms = median_ms(reps, || {
            vae.decode(&z).unwrap();
        });
        out.insert("vae_decode_ms".into(), json!(ms));
    }
    if c.name == "medium" && wanted("attention") {
        // The self-attention of the generation's 64×64 latents at the first level: 4,096 tokens,
        // 4 heads of 16, the fused CPU kernel alone.
        let (q, k, v) = (randn(&[1, 4096, 64], 7), randn(&[1, 4096, 64], 8), randn(&[1, 4096, 64], 9));
        let ms = median_ms(reps, || {
            tiller::models::cpu_kernels::on_pool(&dev, || {
                tiller::models::cpu_kernels::attention(&q, &k, &v, 4).unwrap().unwrap()
            });
        });
        out.insert("attention_4096_ms".into(), json!(ms));
    }
    if c.name == "medium" && wanted("generate") {
        // Each generation is 40 UNet calls: fewer repetitions keep the run short.
        out.insert("generate_20_steps_ms".into(), json!(bench_generation(&c.dir, reps.div_ceil(3).max(3))));
    }
    out.insert("latent_side".into(), json!(side));
    out.insert("threads".into(), json!(candle_core::utils::get_num_threads()));
    serde_json::Value::Object(out)
}

fn main() {
    tiller::models::cpu_kernels::tune_process();
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
    let measures = ["unet_step_b1_ms", "unet_step_b2_ms", "unet_step_b8_ms", "vae_decode_ms", "generate_20_steps_ms"];
    println!(
        "{:<10} {:>8} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "model", "latent", "unet b1 (ms)", "unet b2 (ms)", "unet b8 (ms)", "vae dec (ms)", "gen 20 (ms)"
    );
    for c in cases.iter().filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str()))) {
        if !c.dir.join("unet/config.json").is_file() {
            eprintln!("skipping {}: {} missing", c.name, c.dir.display());
            continue;
        }
        let r = bench_case(c, reps);
        let cell = |k: &str| r.get(k).and_then(|v| v.as_f64()).map_or("-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{:<10} {:>8} {:>14} {:>14} {:>14} {:>14} {:>14}",
            c.name,
            format!("{0}x{0}", r["latent_side"]),
            cell(measures[0]),
            cell(measures[1]),
            cell(measures[2]),
            cell(measures[3]),
            cell(measures[4])
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
