//! Cost of one training step (forward, backward, AdamW) of the shapes-world UNet and VAE with
//! candle on this machine's CPU. `scripts/train_shapes.py --bench` measures the same step in
//! PyTorch; the ratio decided which framework trains the default model (see README, "Training").
//!
//! `cargo bench --bench train_step` prints milliseconds per step and per sample.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use tiller::models::unet_2d::{UNet2DConditionModel, UNet2DConfig};
use tiller::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use tiller::sampling::SeededNoise;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(SeededNoise::new(seed).sample_vec(n), shape, &Device::Cpu).unwrap()
}

fn config<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("training").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn time_steps(label: &str, batch: usize, reps: usize, mut step: impl FnMut()) {
    step(); // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        step();
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{label:<28} batch {batch:>3}: {ms:>9.1} ms/step {:>7.2} ms/sample", ms / batch as f64);
}

fn main() {
    let reps: usize = std::env::var("TILLER_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dev = Device::Cpu;

    let ucfg: UNet2DConfig = config("unet_config.json");
    let vm = VarMap::new();
    let unet = UNet2DConditionModel::load(VarBuilder::from_varmap(&vm, DType::F32, &dev), &ucfg).unwrap();
    let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW { lr: 1e-4, ..Default::default() }).unwrap();
    let b = 32;
    let x = randn(&[b, 4, 16, 16], 1);
    let ctx = randn(&[b, 16, 128], 2);
    let target = randn(&[b, 4, 16, 16], 3);
    time_steps("unet forward", b, reps, || {
        unet.forward(&x, &tiller::models::timesteps(500.0, x.dim(0).unwrap(), x.device()).unwrap(), &ctx, None)
            .unwrap();
    });
    time_steps("unet forward+backward+adamw", b, reps, || {
        let y = unet
            .forward(&x, &tiller::models::timesteps(500.0, x.dim(0).unwrap(), x.device()).unwrap(), &ctx, None)
            .unwrap();
        let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    });

    let vcfg: AutoencoderKLConfig = config("vae_config.json");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    vb.get((vcfg.block_out_channels[0], vcfg.in_channels, 3, 3), "encoder.conv_in.weight").unwrap();
    let vae = AutoencoderKL::load(vb, &vcfg).unwrap();
    let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW { lr: 1e-4, ..Default::default() }).unwrap();
    let b = 16;
    let img = randn(&[b, 3, 64, 64], 4);
    time_steps("vae encode+decode+backward", b, reps, || {
        let z = vae.encode_mean(&img).unwrap();
        let y = vae.decode(&z).unwrap();
        let loss = (y - &img).unwrap().abs().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    });
}
