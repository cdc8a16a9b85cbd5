//! ReNO: gradient ascent on the initial noise through the sampler, the model, the decoder and a
//! differentiable reward — on the Gaussian-mixture model and on the tiny SD-Turbo fixture.

use std::path::Path;

use candle_core::{DType, Device, Var};
use tiller::models::gaussian_mixture::GaussianMixtureModel;
use tiller::models::DiffusionModel;
use tiller::pipeline::GenerationError;
use tiller::reward::brightness::Brightness;
use tiller::reward::jpeg::JpegReward;
use tiller::reward::Reward;
use tiller::sampling::{build_sampler, NoiseSource, Sampler, SamplerKind, SeededNoise};
use tiller::steering::reno::{reward_of_noise, Optimizer, RenoSpec};
use tiller::steering::{run, SteerContext, SteeringSpec};

fn gmm() -> GaussianMixtureModel {
    GaussianMixtureModel::load("toy-gmm", Path::new("models/toy-gmm"), &Device::Cpu).unwrap()
}

fn turbo() -> std::sync::Arc<dyn DiffusionModel> {
    tiller::models::loader::load_model(
        "turbo-tiny",
        Path::new("tests/fixtures/models/turbo-tiny"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn ctx<'a>(
    m: &'a dyn DiffusionModel,
    s: &'a dyn Sampler,
    r: &'a dyn Reward,
    seeds: Vec<u64>,
    guidance: f64,
) -> SteerContext<'a> {
    let (h, w) = m.info().default_size;
    let f = m.info().vae_scale_factor;
    SteerContext {
        model: m,
        sampler: s,
        reward: Some(r),
        prompt: "a bright picture",
        negative_prompt: None,
        guidance_scale: guidance,
        seeds,
        latent_shape: (m.info().latent_channels, h / f, w / f),
        init_latents: None,
        edit: None,
        trace: true,
    }
}

fn reno(iterations: usize, optimizer: Optimizer, lr: Option<f64>) -> RenoSpec {
    RenoSpec { iterations, optimizer, lr, return_noise: true, ..RenoSpec::default() }
}

/// Directional derivative of r(G(ε)) along a random direction: autograd vs central differences.
fn check_gradient(c: &SteerContext, h: f64, tol: f64) {
    let (ch, hh, ww) = c.latent_shape;
    let n = c.seeds.len();
    // Seeded, so the check is the same on every run.
    let mut rng = SeededNoise::new(c.seeds[0] ^ 0xD1);
    let shape = candle_core::Shape::from((n, ch, hh, ww));
    let eps0 = rng.next(&shape, &Device::Cpu).unwrap();
    let dir = rng.next(&shape, &Device::Cpu).unwrap();
    let var = Var::from_tensor(&eps0).unwrap();
    let r = reward_of_noise(c, var.as_tensor()).unwrap();
    let grads = r.sum_all().unwrap().backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient reaches the noise");
    let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let f = |sign: f64| -> f64 {
        let e = (&eps0 + (&dir * (sign * h)).unwrap()).unwrap();
        reward_of_noise(c, &e).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let numeric = (f(1.0) - f(-1.0)) / (2.0 * h);
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
    eprintln!("directional derivative: autograd {analytic:.6e}, finite differences {numeric:.6e}, rel {rel:.2e}");
    assert!(analytic.abs() > 1e-8, "gradient vanished");
    assert!(rel < tol, "autograd {analytic} vs finite differences {numeric}");
}

#[test]
fn reno_gradient_matches_finite_differences_on_the_mixture() {
    let m = gmm();
    let s = build_sampler(SamplerKind::Ddim, m.info().scheduler.vp().unwrap(), 2, 0.0).unwrap();
    let r = Brightness::new();
    check_gradient(&ctx(&m, s.as_ref(), &r, vec![1, 2], 1.0), 1e-3, 1e-2);
}

#[test]
fn reno_gradient_matches_finite_differences_on_sd_turbo_fixture() {
    let m = turbo();
    let s = build_sampler(SamplerKind::Euler, m.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    let r = Brightness::new();
    // Small steps: the decoder's clamp to [0, 1] has kinks that larger steps straddle.
    check_gradient(&ctx(m.as_ref(), s.as_ref(), &r, vec![3], 0.0), 1e-3, 2e-2);
}

fn rewards_of(trace: &[tiller::steering::TraceEvent]) -> Vec<f32> {
    trace.iter().map(|e| e.rewards[0]).collect()
}

#[test]
fn reno_raises_brightness_on_the_mixture_and_returns_the_best_iterate() {
    let m = gmm();
    // One DDIM step from pure noise (toy-gmm uses trailing spacing, so the step starts at
    // t = 999): a one-step generator, as ReNO targets.
    let s = build_sampler(SamplerKind::Ddim, m.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    let r = Brightness::new();
    for opt in [Optimizer::Sgd, Optimizer::Adam] {
        // each optimiser's default learning rate
        let lr = None;
        let c = ctx(&m, s.as_ref(), &r, vec![10, 11, 12], 1.0);
        let out = run(&c, &SteeringSpec::Reno(reno(15, opt, lr)), &mut |_| true).unwrap();
        for img in &out.images {
            let rs = rewards_of(&img.trace);
            let best = rs.iter().cloned().fold(f32::MIN, f32::max);
            eprintln!("{opt:?}: rewards by iteration {rs:?}");
            assert!(rs[rs.len() - 1] > rs[0] + 0.02, "{opt:?}: reward did not rise: {rs:?}");
            assert_eq!(img.reward.unwrap(), best, "the best iterate is returned");
            // The returned image really has that reward.
            let decoded = m.decode(&img.latents).unwrap();
            let again = r.score(&decoded, "").unwrap()[0];
            assert!((again - best).abs() < 1e-6);
        }
        assert_eq!(out.reward_evals, 15 * 3);
        assert_eq!(out.denoiser_evals, 15 * 3);
        // 14 updates, each differentiating the one denoiser call of every image
        assert_eq!(out.backward_evals, 14 * 3);
        assert!(out.timings.backward_ms > 0.0);
    }
}

#[test]
fn reno_raises_brightness_on_sd_turbo_fixture() {
    let m = turbo();
    let s = build_sampler(SamplerKind::Euler, m.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    let r = Brightness::new();
    let c = ctx(m.as_ref(), s.as_ref(), &r, vec![5], 0.0);
    let out = run(&c, &SteeringSpec::Reno(reno(6, Optimizer::Sgd, None)), &mut |_| true).unwrap();
    let rs = rewards_of(&out.images[0].trace);
    eprintln!("SD-Turbo fixture, brightness by iteration: {rs:?}");
    assert!(rs[5] > rs[0], "reward did not rise: {rs:?}");
    assert_eq!(out.images[0].reward.unwrap(), rs.iter().cloned().fold(f32::MIN, f32::max));
}

#[test]
fn optimised_noise_replays_the_image_with_method_none() {
    // A stochastic 3-step sampler: the replay must reuse the same step noise too.
    let m = gmm();
    let s = build_sampler(SamplerKind::Ddim, m.info().scheduler.vp().unwrap(), 3, 1.0).unwrap();
    let r = Brightness::new();
    let c = ctx(&m, s.as_ref(), &r, vec![42], 1.0);
    let out = run(&c, &SteeringSpec::Reno(reno(5, Optimizer::Sgd, None)), &mut |_| true).unwrap();
    let noise = out.images[0].optimized_noise.clone().unwrap();
    let mut replay = ctx(&m, s.as_ref(), &r, vec![42], 1.0);
    replay.init_latents = Some(noise);
    let again = run(&replay, &SteeringSpec::None, &mut |_| true).unwrap();
    let a: Vec<f32> = out.images[0].latents.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = again.images[0].latents.flatten_all().unwrap().to_vec1().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "replay differs by {diff}");
}

#[test]
fn reno_refuses_a_non_differentiable_reward() {
    let m = gmm();
    let s = build_sampler(SamplerKind::Ddim, m.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    let r = JpegReward::compressibility();
    let c = ctx(&m, s.as_ref(), &r, vec![1], 1.0);
    match run(&c, &SteeringSpec::Reno(RenoSpec::default()), &mut |_| true) {
        Err(GenerationError::InvalidInput(tiller::error::FieldError { field, message, .. })) => {
            assert_eq!(field, "reward");
            assert!(message.contains("differentiable"), "{message}");
        }
        other => panic!("expected a 4xx error, got {:?}", other.map(|_| ())),
    }
}
