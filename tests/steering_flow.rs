//! Sampling and steering on the exact flow-matching Gaussian mixture: the same mixture as
//! tests/steering_gmm.rs (3×2×2, modes at ∓0.5 with weights 0.7/0.3, std 0.1), but with a
//! `FlowMatchEulerDiscreteScheduler` schedule, so the model returns the exact velocity
//! v* = (x − E[x0 | x]) / σ of the path x = (1 − σ)·x0 + σ·ε. Every flow sampler must reproduce
//! the base mode weights; FK through flow-sde must reach the closed-form tilted weight of
//! p(x)·exp(β·brightness) as it does on the VP model; FlowChef and ReNO must raise the reward.

use candle_core::{Device, Tensor};
use tiller::models::gaussian_mixture::{GaussianMixtureModel, GmmConfig};
use tiller::models::DiffusionModel;
use tiller::reward::brightness::Brightness;
use tiller::reward::Reward;
use tiller::sampling::{build_for, Sampler, SamplerKind};
use tiller::steering::fk::{FkSpec, Potential, ResampleSchedule, Select};
use tiller::steering::flowchef::FlowChefSpec;
use tiller::steering::svdd::SvddSpec;
use tiller::steering::{run, Resampler, SteerContext, SteeringSpec};

fn model_with(scheduler: serde_json::Value) -> GaussianMixtureModel {
    let cfg: GmmConfig = serde_json::from_value(serde_json::json!({
        "kind": "gaussian-mixture", "channels": 3, "height": 2, "width": 2,
        "components": [
            {"weight": 0.7, "mean": [-0.5, -0.5, -0.5], "std": 0.1},
            {"weight": 0.3, "mean": [0.5, 0.5, 0.5], "std": 0.1}
        ],
        "scheduler": scheduler
    }))
    .unwrap();
    GaussianMixtureModel::from_config("flow-gmm", &cfg, &Device::Cpu).unwrap()
}

fn model() -> GaussianMixtureModel {
    model_with(serde_json::json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))
}

fn sampler(m: &GaussianMixtureModel, kind: SamplerKind, steps: usize, eta: f64) -> Box<dyn Sampler> {
    build_for(kind, &m.info().scheduler, steps, eta, 4).unwrap()
}

fn exact_right_weight(m: &GaussianMixtureModel, beta: f64) -> f64 {
    let d = m.mixture().dim();
    m.mixture().tilted_weights(&vec![0.5 / d as f64; d], beta)[1]
}

struct Outcome {
    right: f64,
    rewards: Vec<f32>,
}

fn ctx<'a>(
    m: &'a GaussianMixtureModel,
    s: &'a dyn Sampler,
    reward: &'a dyn Reward,
    runs: usize,
    seed: u64,
) -> SteerContext<'a> {
    SteerContext {
        model: m,
        sampler: s,
        reward: Some(reward),
        prompt: "",
        negative_prompt: None,
        guidance_scale: 1.0,
        seeds: (0..runs as u64).map(|i| seed * 1_000_003 + i).collect(),
        latent_shape: (3, 2, 2),
        init_latents: None,
        edit: None,
        trace: false,
    }
}

fn steer(m: &GaussianMixtureModel, s: &dyn Sampler, spec: &SteeringSpec, runs: usize, seed: u64) -> Outcome {
    let reward = Brightness::new();
    let out = run(&ctx(m, s, &reward, runs, seed), spec, &mut |_| true).unwrap();
    let mut right = 0;
    let mut rewards = Vec::new();
    for img in &out.images {
        let x: Vec<f32> = img.latents.flatten_all().unwrap().to_vec1().unwrap();
        assert!(x.iter().all(|v| v.is_finite()), "non-finite sample");
        right += (m.mixture().nearest_component(&x) == 1) as usize;
        rewards.push(img.reward.unwrap());
    }
    Outcome { right: right as f64 / runs as f64, rewards }
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

fn fk(k: usize, beta: f64, every: usize) -> SteeringSpec {
    SteeringSpec::Fk(FkSpec {
        particles: k,
        potential: Potential::Diff,
        beta,
        resample: ResampleSchedule::explicit(every, 0.0, 1.0),
        resampler: Resampler::Systematic,
        ess_threshold: None,
        select: Select::Sample,
    })
}

#[test]
fn the_model_predicts_the_exact_velocity() {
    // At σ = 1 the state is pure noise and E[x0 | x] is the mixture mean, so v* = x − E[x0].
    let m = model();
    let x = Tensor::new(&[0.3f32, -1.2, 0.7, 2.0, 0.1, -0.4, 1.5, -0.8, 0.0, 0.9, -2.0, 0.6], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 2, 2))
        .unwrap();
    let v = m
        .predict(
            &x,
            &tiller::models::timesteps(1000.0, 1, &Device::Cpu).unwrap(),
            &m.encode_prompts(&["".into()]).unwrap(),
            None,
        )
        .unwrap();
    let mix_mean = 0.7 * -0.5 + 0.3 * 0.5;
    let want: Vec<f32> =
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x - mix_mean as f32).collect();
    let got: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    // At σ = 0.01 a point on the bright mode belongs to it alone, and the Gaussian posterior mean
    // is (s²·μ + a·τ²·x)/(a²·τ² + s²) with a = 0.99, s = 0.01, τ = 0.1.
    let on_mode = Tensor::full(0.5f32, (1, 3, 2, 2), &Device::Cpu).unwrap();
    let t = tiller::models::timesteps(10.0, 1, &Device::Cpu).unwrap();
    let v = m.predict(&on_mode, &t, &m.encode_prompts(&["".into()]).unwrap(), None).unwrap();
    let x0 = (&on_mode - (v * 0.01).unwrap()).unwrap();
    let (a, s, tau) = (0.99f64, 0.01f64, 0.1f64);
    let want = (s * s * 0.5 + a * tau * tau * 0.5) / (a * a * tau * tau + s * s);
    let err = (x0 - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err < 1e-4, "x̂0 off the closed-form posterior mean {want} by {err}");
}

#[test]
fn exact_velocity_reproduces_the_mixture_with_every_flow_sampler() {
    // (diffusers' `stochastic_sampling` re-noises x̂0 itself, which is a sample only for a
    // consistency-distilled network; with the exact posterior mean it shrinks towards the mixture
    // mean, so it is not among these.)
    let m = model();
    let flux = model_with(serde_json::json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": true,
        "base_shift": 0.5, "max_shift": 1.15
    }));
    let cases: Vec<(&str, &GaussianMixtureModel, SamplerKind, usize, f64)> = vec![
        ("flow-euler shift 3", &m, SamplerKind::FlowEuler, 50, 0.0),
        ("flow-sde η=1", &m, SamplerKind::FlowSde, 50, 1.0),
        ("flow-sde η=0.5", &m, SamplerKind::FlowSde, 50, 0.5),
        ("flow-euler dynamic shift", &flux, SamplerKind::FlowEuler, 50, 0.0),
    ];
    for (name, model, kind, steps, eta) in cases {
        let s = sampler(model, kind, steps, eta);
        let o = steer(model, s.as_ref(), &SteeringSpec::None, 3000, 1);
        assert!((o.right - 0.3).abs() < 0.03, "{name}: right-mode fraction {} vs 0.3", o.right);
        let off = o.rewards.iter().filter(|&&r| (r - 0.25).abs() > 0.1 && (r - 0.75).abs() > 0.1).count();
        assert!(off < 30, "{name}: {off} samples off both modes");
    }
}

#[test]
fn fk_through_flow_sde_reaches_the_tilted_target() {
    let m = model();
    let s = sampler(&m, SamplerKind::FlowSde, 100, 1.0);
    let beta = 4.0;
    let exact = exact_right_weight(&m, beta);
    let base = steer(&m, s.as_ref(), &fk(8, 0.0, 10), 2000, 2).right;
    assert!((base - 0.3).abs() < 0.035, "β = 0: right-mode fraction {base} vs base 0.3");
    let mut seen = Vec::new();
    let mut prev = 0.0;
    for (k, runs) in [(1, 2000), (4, 2000), (16, 2000), (64, 1500)] {
        let o = steer(&m, s.as_ref(), &fk(k, beta, 10), runs, 3 + k as u64);
        seen.push((k, o.right));
        assert!(o.right > prev - 0.02, "k = {k}: {} fell below {prev}; all: {seen:?}", o.right);
        prev = o.right;
    }
    eprintln!("FK diff on flow-sde, β = {beta}: exact {exact:.3}, right-mode fraction by k: {seen:?}");
    let (_, at64) = seen[3];
    assert!((at64 - exact).abs() < 0.03, "k = 64: {at64} vs exact {exact}");
}

#[test]
fn svdd_through_flow_sde_tilts() {
    let m = model();
    let s = sampler(&m, SamplerKind::FlowSde, 50, 1.0);
    let argmax = steer(&m, s.as_ref(), &SteeringSpec::Svdd(SvddSpec { candidates: 4, alpha: 0.0 }), 500, 23).right;
    assert!(argmax > 0.97, "argmax SVDD must collapse onto the bright mode: {argmax}");
}

#[test]
fn flow_euler_is_refused_for_fk_and_flowchef_for_diffusion_models() {
    let m = model();
    let s = sampler(&m, SamplerKind::FlowEuler, 10, 0.0);
    let reward = Brightness::new();
    match run(&ctx(&m, s.as_ref(), &reward, 1, 1), &fk(4, 1.0, 2), &mut |_| true) {
        Err(tiller::pipeline::GenerationError::InvalidInput(f)) => {
            assert_eq!(f.field, "scheduler");
            assert!(f.message.contains("flow-sde"), "{}", f.message);
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    let vp = model_with(serde_json::json!({"_class_name": "DDIMScheduler"}));
    let ddim = build_for(SamplerKind::Ddim, &vp.info().scheduler, 10, 0.0, 4).unwrap();
    let spec = SteeringSpec::Flowchef(FlowChefSpec::default());
    match run(&ctx(&vp, ddim.as_ref(), &reward, 1, 1), &spec, &mut |_| true) {
        Err(tiller::pipeline::GenerationError::InvalidInput(f)) => assert_eq!(f.field, "steering.method"),
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn flowchef_raises_the_reward_and_is_plain_sampling_at_step_size_zero() {
    let m = model();
    let reward = Brightness::new();
    for (kind, eta) in [(SamplerKind::FlowEuler, 0.0), (SamplerKind::FlowSde, 1.0)] {
        let s = sampler(&m, kind, 20, eta);
        let plain = run(&ctx(&m, s.as_ref(), &reward, 400, 5), &SteeringSpec::None, &mut |_| true).unwrap();
        let zero = SteeringSpec::Flowchef(FlowChefSpec { step_size: 0.0, ..Default::default() });
        let same = run(&ctx(&m, s.as_ref(), &reward, 400, 5), &zero, &mut |_| true).unwrap();
        let lat = |o: &tiller::steering::Steered| -> Vec<f32> {
            let l: Vec<Tensor> = o.images.iter().map(|i| i.latents.clone()).collect();
            Tensor::cat(&l, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(lat(&plain), lat(&same), "{kind}: step_size 0 must be plain sampling, noise for noise");

        let spec = SteeringSpec::Flowchef(FlowChefSpec { step_size: 0.3, inner_steps: 3, max_steps: None });
        let mut c = ctx(&m, s.as_ref(), &reward, 400, 5);
        c.trace = true;
        let steered = run(&c, &spec, &mut |_| true).unwrap();
        let r0: Vec<f32> = plain.images.iter().map(|i| i.reward.unwrap()).collect();
        let r1: Vec<f32> = steered.images.iter().map(|i| i.reward.unwrap()).collect();
        let right = |o: &tiller::steering::Steered| {
            o.images
                .iter()
                .filter(|i| {
                    m.mixture().nearest_component(&i.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap()) == 1
                })
                .count() as f64
                / o.images.len() as f64
        };
        eprintln!(
            "{kind}: mean brightness {:.3} → {:.3}, right mode {:.3} → {:.3}",
            mean(&r0),
            mean(&r1),
            right(&plain),
            right(&steered)
        );
        assert!(mean(&r1) > mean(&r0) + 0.05, "{kind}: FlowChef must raise the reward: {} → {}", mean(&r0), mean(&r1));
        assert!(right(&steered) > right(&plain) + 0.1);
        // Costs: no extra network call, one reward per move and image plus the final score.
        assert_eq!(steered.denoiser_evals, plain.denoiser_evals);
        assert_eq!(steered.reward_evals, 400 * (20 * 3 + 1));
        let trace = &steered.images[0].trace;
        assert_eq!(trace.iter().filter(|e| e.kind == "guide").count(), 20);
        assert!(trace.iter().all(|e| e.kind != "guide" || (e.rewards.len() == 3 && e.grad_norm.is_some())));
    }
}

/// With x̂0 = x − σ·v and v held fixed, FlowChef's gradient is the reward's gradient at x̂0:
/// for brightness = mean((x̂0 + 1)/2) that is 1/(2D) everywhere (inside the clamp).
#[test]
fn flowchef_gradient_is_the_reward_gradient_at_x0() {
    let m = model();
    let s = sampler(&m, SamplerKind::FlowEuler, 4, 0.0);
    let reward = Brightness::new();
    let c = ctx(&m, s.as_ref(), &reward, 1, 1);
    let x = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 0.2, -0.1, 0.05, 0.15, -0.3, 0.25, 0.1, -0.05], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 2, 2))
        .unwrap();
    let v = (&x * 0.5).unwrap();
    let (_, g) = tiller::steering::flowchef::reward_gradient(&c, &x, &v, 1).unwrap();
    for gi in g.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
        assert!((gi - 1.0 / 24.0).abs() < 1e-6, "{gi}");
    }
}

#[test]
fn reno_raises_the_reward_on_a_four_step_flow() {
    // schnell-style: shift 1, four steps. (One step from σ = 1 lands on E[x0] for every noise,
    // so the exact model has no gradient there.)
    let m = model_with(serde_json::json!({"_class_name": "FlowMatchEulerDiscreteScheduler"}));
    let s = sampler(&m, SamplerKind::FlowEuler, 4, 0.0);
    let reward = Brightness::new();
    let spec = SteeringSpec::Reno(tiller::steering::reno::RenoSpec { iterations: 10, ..Default::default() });
    let mut c = ctx(&m, s.as_ref(), &reward, 16, 9);
    c.trace = true;
    let out = run(&c, &spec, &mut |_| true).unwrap();
    let first: Vec<f32> = out.images.iter().map(|i| i.trace.first().unwrap().rewards[0]).collect();
    let last: Vec<f32> = out.images.iter().map(|i| i.reward.unwrap()).collect();
    eprintln!("ReNO on a four-step flow: mean brightness {:.3} → {:.3}", mean(&first), mean(&last));
    assert!(first.iter().zip(&last).all(|(a, b)| b >= a), "no image may get worse: {first:?} → {last:?}");
    assert!(mean(&last) > mean(&first) + 0.01, "{first:?} → {last:?}");
}
