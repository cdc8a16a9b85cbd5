//! Gradients flow from the decoded image back to the initial noise through CFG, the sampler,
//! the UNet, the text conditioning and the VAE decoder, and match finite differences.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use tiller::models::stable_diffusion::{LoadOptions, StableDiffusion};
use tiller::models::DiffusionModel;
use tiller::pipeline::Conditioning;
use tiller::sampling::{build_sampler, Sampler, SamplerKind};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn load(name: &str, dtype: DType) -> StableDiffusion {
    let opts = LoadOptions { dtype, device: Device::Cpu, variant: None, clip_skip: 0 };
    StableDiffusion::load(name, &fixture(name), &opts).expect("fixture model loads")
}

/// reward(x_T) = weighted mean of the decoded image after a 2-step DDIM run with CFG.
fn reward(
    model: &StableDiffusion,
    sampler: &dyn Sampler,
    cond: &Conditioning,
    x_t: &Tensor,
    weights: &Tensor,
) -> Tensor {
    let mut x = (x_t * sampler.init_noise_sigma()).unwrap();
    for i in 0..sampler.num_steps() {
        let x_in = sampler.scale_model_input(&x, i).unwrap();
        let out = cond.predict(model, &x_in, sampler.timestep(i)).unwrap();
        x = sampler.step(&x, &out, i, None).unwrap();
    }
    let img = model.decode(&x).unwrap();
    (img * weights).unwrap().mean_all().unwrap()
}

fn check(dtype: DType, h: f64, tol: f64) {
    let model = load("sd15-tiny", dtype);
    let sampler = build_sampler(SamplerKind::Ddim, model.info().scheduler.vp().unwrap(), 2, 0.0).unwrap();
    let cond = Conditioning::new(&model, "a red circle", Some("blurry"), 3.0, 1).unwrap();
    let (c, hh, ww) = (4, 8, 8);
    let n = c * hh * ww;
    let base: Vec<f64> = (0..n).map(|i| ((i * 7919 % 1000) as f64 / 500.0 - 1.0) * 1.5).collect();
    let x0 = Tensor::from_vec(base.clone(), (1, c, hh, ww), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let weights = Tensor::from_vec(
        (0..3 * 16 * 16).map(|i| ((i % 13) as f64 / 6.0) - 1.0).collect::<Vec<_>>(),
        (1, 3, 16, 16),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    let var = Var::from_tensor(&x0).unwrap();
    let r = reward(&model, sampler.as_ref(), &cond, var.as_tensor(), &weights);
    let grads = r.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient reaches the initial noise");
    let g: Vec<f64> = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(gmax > 0.0, "gradient is identically zero");
    let eval = |v: Vec<f64>| -> f64 {
        let t = Tensor::from_vec(v, (1, c, hh, ww), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        reward(&model, sampler.as_ref(), &cond, &t, &weights).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    };
    for idx in [0, 37, 101, 200, n - 1] {
        let mut p = base.clone();
        p[idx] += h;
        let mut m = base.clone();
        m[idx] -= h;
        let fd = (eval(p) - eval(m)) / (2.0 * h);
        let err = (fd - g[idx]).abs() / gmax;
        println!("{dtype:?} idx {idx}: autograd {:.6e} fd {:.6e} err/max|g| {:.2e}", g[idx], fd, err);
        assert!(err < tol, "idx {idx}: autograd {} vs finite difference {fd}", g[idx]);
    }
}

#[test]
fn gradient_to_initial_noise_matches_finite_differences_f64() {
    check(DType::F64, 1e-5, 1e-5);
}

#[test]
fn gradient_to_initial_noise_matches_finite_differences_f32() {
    check(DType::F32, 1e-2, 3e-2);
}
