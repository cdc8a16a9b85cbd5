//! Gradients through the flow pipelines (FLUX-dev with its guidance embedding, SD3 with CFG):
//! from a weighted mean of the decoded image back to the initial noise, through two flow-euler
//! steps, the transformer (rotary positions, joint attention, RMS norms), packing and the VAE,
//! against central finite differences in f64. ReNO and FlowChef rely on these gradients.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use tiller::models::DiffusionModel;
use tiller::pipeline::Conditioning;
use tiller::sampling::{build_for, Sampler, SamplerKind};

fn load(name: &str) -> std::sync::Arc<dyn DiffusionModel> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name);
    // f64 for the finite differences (the server's loader accepts f32/f16/bf16 only).
    let opts = tiller::models::stable_diffusion::LoadOptions {
        dtype: DType::F64,
        device: Device::Cpu,
        variant: None,
        clip_skip: 0,
    };
    if name.starts_with("flux") {
        std::sync::Arc::new(tiller::models::flux::Flux::load(name, &dir, &opts).unwrap())
    } else {
        std::sync::Arc::new(tiller::models::sd3::StableDiffusion3::load(name, &dir, &opts).unwrap())
    }
}

fn reward(model: &dyn DiffusionModel, sampler: &dyn Sampler, cond: &Conditioning, x_t: &Tensor, w: &Tensor) -> Tensor {
    let mut x = x_t.clone();
    for i in 0..sampler.num_steps() {
        let out = cond.predict(model, &x, sampler.timestep(i)).unwrap();
        x = sampler.step(&x, &out, i, None).unwrap();
    }
    (model.decode(&x).unwrap() * w).unwrap().mean_all().unwrap()
}

fn check(name: &str, guidance: f64) {
    let model = load(name);
    let sampler =
        build_for(SamplerKind::FlowEuler, &model.info().scheduler, 2, 0.0, model.info().image_seq_len(16, 16)).unwrap();
    let cond = Conditioning::new(model.as_ref(), "a red circle", Some("blurry"), guidance, 1).unwrap();
    let (c, h, w) = (16, 8, 8);
    let n = c * h * w;
    let base: Vec<f64> = (0..n).map(|i| ((i * 7919 % 1000) as f64 / 500.0 - 1.0) * 1.5).collect();
    let weights = Tensor::from_vec(
        (0..3 * 16 * 16).map(|i| ((i % 13) as f64 / 6.0) - 1.0).collect::<Vec<_>>(),
        (1, 3, 16, 16),
        &Device::Cpu,
    )
    .unwrap();
    let x0 = Tensor::from_vec(base.clone(), (1, c, h, w), &Device::Cpu).unwrap();
    let var = Var::from_tensor(&x0).unwrap();
    let r = reward(model.as_ref(), sampler.as_ref(), &cond, var.as_tensor(), &weights);
    let grads = r.backward().unwrap();
    let g: Vec<f64> =
        grads.get(var.as_tensor()).expect("gradient reaches the noise").flatten_all().unwrap().to_vec1().unwrap();
    let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(gmax > 0.0, "{name}: gradient is identically zero");
    let eval = |v: Vec<f64>| -> f64 {
        let t = Tensor::from_vec(v, (1, c, h, w), &Device::Cpu).unwrap();
        reward(model.as_ref(), sampler.as_ref(), &cond, &t, &weights).to_scalar::<f64>().unwrap()
    };
    for idx in [0, 37, 101, 555, n - 1] {
        let (mut p, mut m) = (base.clone(), base.clone());
        p[idx] += 1e-5;
        m[idx] -= 1e-5;
        let fd = (eval(p) - eval(m)) / 2e-5;
        let err = (fd - g[idx]).abs() / gmax;
        println!("{name} idx {idx}: autograd {:.6e} fd {fd:.6e} err/max|g| {err:.2e}", g[idx]);
        assert!(err < 1e-5, "{name} idx {idx}: autograd {} vs finite difference {fd}", g[idx]);
    }
}

#[test]
fn flux_gradient_to_initial_noise_matches_finite_differences() {
    check("flux-dev-tiny", 3.5);
}

#[test]
fn sd3_gradient_through_cfg_matches_finite_differences() {
    check("sd3-t5-tiny", 4.0);
}

/// ReNO (a 2-step schnell-style generator) and FlowChef raise a differentiable reward on the
/// tiny FLUX pipeline, through the real strategy code.
#[test]
fn reno_and_flowchef_raise_the_reward_on_flux_schnell() {
    use tiller::steering::{generate, SteeringRequest, SteeringSpec};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/flux-schnell-tiny");
    let model = tiller::models::loader::load_model("flux-schnell-tiny", &dir, &Device::Cpu, DType::F32).unwrap();
    let reward: std::sync::Arc<dyn tiller::reward::Reward> =
        std::sync::Arc::new(tiller::reward::brightness::Brightness::new());
    let params = tiller::pipeline::GenerationParams {
        prompt: "a red circle".into(),
        n: 3,
        width: Some(16),
        height: Some(16),
        steps: Some(2),
        seed: 11,
        ..Default::default()
    };
    let run = |spec: SteeringSpec| {
        let req = SteeringRequest { spec, reward: Some(reward.clone()), trace: true };
        generate(model.as_ref(), &params, &req, &mut |_| true).unwrap().steered
    };
    let mean = |s: &tiller::steering::Steered| s.images.iter().map(|i| i.reward.unwrap() as f64).sum::<f64>() / 3.0;
    let plain = run(SteeringSpec::None);
    let reno = run(SteeringSpec::Reno(tiller::steering::reno::RenoSpec { iterations: 6, ..Default::default() }));
    for img in &reno.images {
        let first = img.trace.first().unwrap().rewards[0];
        assert!(img.reward.unwrap() >= first, "ReNO's best is at least its first iterate");
    }
    let chef = run(SteeringSpec::Flowchef(tiller::steering::flowchef::FlowChefSpec {
        step_size: 50.0,
        inner_steps: 3,
        max_steps: None,
    }));
    println!("brightness: plain {:.4}, ReNO {:.4}, FlowChef {:.4}", mean(&plain), mean(&reno), mean(&chef));
    assert!(mean(&reno) > mean(&plain), "ReNO must raise the reward");
    assert!(mean(&chef) > mean(&plain), "FlowChef must raise the reward");
}
