//! Steering on the analytic Gaussian-mixture model, checked against the closed-form tilted
//! target p(x)·exp(β·r(x)) for the linear reward `brightness` (docs/steering.md).
//!
//! The mixture lives in 3×2×2 = 12 dimensions (two isotropic modes at ∓0.5, weights 0.7/0.3),
//! so thousands of independent steered runs fit in one batch: a request with n "images" runs n
//! independent generations, which is exactly what these statistics need.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tiller::models::gaussian_mixture::{GaussianMixtureModel, GmmConfig};
use tiller::models::DiffusionModel;
use tiller::reward::brightness::Brightness;
use tiller::reward::Reward;
use tiller::sampling::{build_sampler, Sampler, SamplerKind};
use tiller::steering::fk::{FkSpec, Potential, ResampleSchedule, Select};
use tiller::steering::svdd::SvddSpec;
use tiller::steering::{run, Resampler, SteerContext, SteeringSpec};

const STEPS: usize = 100;

fn model() -> GaussianMixtureModel {
    let cfg: GmmConfig = serde_json::from_value(serde_json::json!({
        "kind": "gaussian-mixture", "channels": 3, "height": 2, "width": 2,
        "components": [
            {"weight": 0.7, "mean": [-0.5, -0.5, -0.5], "std": 0.1},
            {"weight": 0.3, "mean": [0.5, 0.5, 0.5], "std": 0.1}
        ],
        "scheduler": {
            "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1
        }
    }))
    .unwrap();
    GaussianMixtureModel::from_config("gmm", &cfg, &Device::Cpu).unwrap()
}

/// The exact right-mode weight of p·exp(β·brightness): brightness = ½ + bᵀx with b = 1/(2D).
fn exact_right_weight(m: &GaussianMixtureModel, beta: f64) -> f64 {
    let d = m.mixture().dim();
    m.mixture().tilted_weights(&vec![0.5 / d as f64; d], beta)[1]
}

fn ddim(m: &GaussianMixtureModel, eta: f64) -> Box<dyn Sampler> {
    build_sampler(SamplerKind::Ddim, m.info().scheduler.vp().unwrap(), STEPS, eta).unwrap()
}

struct Outcome {
    right: f64,
    rewards: Vec<f32>,
}

/// `runs` independent steered generations; the fraction that ended in the right mode.
fn steer(m: &GaussianMixtureModel, sampler: &dyn Sampler, spec: &SteeringSpec, runs: usize, seed: u64) -> Outcome {
    let reward = Brightness::new();
    let ctx = SteerContext {
        model: m,
        sampler,
        reward: Some(&reward as &dyn Reward),
        prompt: "",
        negative_prompt: None,
        guidance_scale: 1.0,
        seeds: (0..runs as u64).map(|i| seed * 1_000_003 + i).collect(),
        latent_shape: (3, 2, 2),
        init_latents: None,
        edit: None,
        trace: false,
    };
    let out = run(&ctx, spec, &mut |_| true).unwrap();
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

fn fk(k: usize, beta: f64, potential: Potential, every: usize) -> SteeringSpec {
    SteeringSpec::Fk(FkSpec {
        particles: k,
        potential,
        beta,
        resample: ResampleSchedule::explicit(every, 0.0, 1.0),
        resampler: Resampler::Systematic,
        ess_threshold: None,
        select: Select::Sample,
    })
}

#[test]
fn exact_denoiser_reproduces_the_mixture_with_every_sampler() {
    // No steering: DDIM η=1 and η=0, DDPM, Euler (Karras too) and DPM-Solver++ 2M (whose
    // history runs through the strategy's loop) all draw the base mode weights.
    let m = model();
    let cfg = m.info().scheduler.vp().unwrap();
    for (kind, eta, steps) in [
        (SamplerKind::Ddim, 1.0, 100),
        (SamplerKind::Ddim, 0.0, 50),
        (SamplerKind::Ddpm, 0.0, 100),
        (SamplerKind::Euler, 0.0, 50),
        (SamplerKind::EulerAncestral, 0.0, 50),
        (SamplerKind::EulerKarras, 0.0, 30),
        (SamplerKind::DpmPp2m, 0.0, 20),
        (SamplerKind::DpmPp2mKarras, 0.0, 20),
    ] {
        let s = build_sampler(kind, cfg, steps, eta).unwrap();
        let o = steer(&m, s.as_ref(), &SteeringSpec::None, 3000, 1);
        assert!((o.right - 0.3).abs() < 0.03, "{kind:?} eta {eta}: right-mode fraction {} vs 0.3", o.right);
        // Samples sit on the modes: brightness ≈ 0.25 or 0.75.
        let off = o.rewards.iter().filter(|&&r| (r - 0.25).abs() > 0.1 && (r - 0.75).abs() > 0.1).count();
        assert!(off < 30, "{kind:?}: {off} samples off both modes");
    }
}

#[test]
fn fk_beta_zero_keeps_the_base_weights() {
    let m = model();
    let s = ddim(&m, 1.0);
    let o = steer(&m, s.as_ref(), &fk(8, 0.0, Potential::Diff, 5), 2000, 2);
    assert!((o.right - 0.3).abs() < 0.035, "β = 0: right-mode fraction {} vs base 0.3", o.right);
}

#[test]
fn fk_diff_approaches_the_tilted_target_as_particles_grow() {
    let m = model();
    let s = ddim(&m, 1.0);
    let beta = 4.0;
    let exact = exact_right_weight(&m, beta);
    let mut prev = 0.0;
    let mut seen = Vec::new();
    for (k, runs) in [(1, 2000), (4, 2000), (16, 2000), (64, 1500)] {
        let o = steer(&m, s.as_ref(), &fk(k, beta, Potential::Diff, 10), runs, 3 + k as u64);
        seen.push((k, o.right));
        // Monotone up to Monte-Carlo error (≈ 0.01).
        assert!(o.right > prev - 0.02, "k = {k}: {} fell below {prev}; all: {seen:?}", o.right);
        prev = o.right;
    }
    eprintln!("FK diff, β = {beta}: exact {exact:.3}, right-mode fraction by k: {seen:?}");
    let (_, at64) = seen[3];
    assert!((at64 - exact).abs() < 0.03, "k = 64: {at64} vs exact {exact}");
    assert!((seen[0].1 - 0.3).abs() < 0.035, "k = 1 must be unsteered: {}", seen[0].1);
}

#[test]
fn greedy_potentials_are_at_least_as_greedy_as_diff() {
    let m = model();
    let s = ddim(&m, 1.0);
    let beta = 4.0;
    let diff = steer(&m, s.as_ref(), &fk(16, beta, Potential::Diff, 10), 1500, 11).right;
    for p in [Potential::Max, Potential::Sum, Potential::Current] {
        let o = steer(&m, s.as_ref(), &fk(16, beta, p, 10), 1500, 11);
        eprintln!("{p:?}: {} (diff {diff})", o.right);
        assert!(o.right >= diff - 0.02, "{p:?}: {} less greedy than diff {diff}", o.right);
    }
}

#[test]
fn huge_beta_times_reward_stays_finite() {
    // β·r of order 100 (and far beyond): log-space weights must not overflow into NaN.
    let m = model();
    let s = ddim(&m, 1.0);
    for beta in [400.0, 1e6] {
        let o = steer(&m, s.as_ref(), &fk(8, beta, Potential::Diff, 5), 200, 5);
        assert!(o.right > 0.95, "β = {beta}: a huge tilt must pick the bright mode, got {}", o.right);
        assert!(o.rewards.iter().all(|r| r.is_finite()));
    }
}

#[test]
fn svdd_soft_under_tilts_and_argmax_collapses() {
    let m = model();
    let s = ddim(&m, 1.0);
    let beta = 4.0;
    let exact = exact_right_weight(&m, beta);
    let soft = |mm: usize| SteeringSpec::Svdd(SvddSpec { candidates: mm, alpha: 1.0 / beta });
    let s4 = steer(&m, s.as_ref(), &soft(4), 1500, 21).right;
    let s16 = steer(&m, s.as_ref(), &soft(16), 1500, 22).right;
    eprintln!("SVDD soft α = 1/β: M=4 {s4}, M=16 {s16}, exact {exact}");
    assert!(s4 > 0.33, "soft SVDD must tilt towards the bright mode: {s4}");
    assert!(s16 >= s4 - 0.02, "more candidates must not tilt less: {s4} → {s16}");
    assert!(s16 < exact + 0.02, "soft SVDD under-tilts at finite M: {s16} vs exact {exact}");
    let argmax = steer(&m, s.as_ref(), &SteeringSpec::Svdd(SvddSpec { candidates: 4, alpha: 0.0 }), 500, 23).right;
    assert!(argmax > 0.97, "argmax SVDD must collapse onto the bright mode: {argmax}");
}

#[test]
fn deterministic_samplers_are_rejected_for_fk_and_svdd() {
    let m = model();
    let s = ddim(&m, 0.0);
    let reward = Brightness::new();
    let ctx = SteerContext {
        model: &m,
        sampler: s.as_ref(),
        reward: Some(&reward as &dyn Reward),
        prompt: "",
        negative_prompt: None,
        guidance_scale: 1.0,
        seeds: vec![1],
        latent_shape: (3, 2, 2),
        init_latents: None,
        edit: None,
        trace: false,
    };
    for spec in [fk(4, 1.0, Potential::Diff, 5), SteeringSpec::Svdd(SvddSpec { candidates: 4, alpha: 0.0 })] {
        match run(&ctx, &spec, &mut |_| true) {
            Err(tiller::pipeline::GenerationError::InvalidInput(tiller::error::FieldError {
                field, message, ..
            })) => {
                assert_eq!(field, "scheduler");
                assert!(message.contains("stochastic"), "{message}");
            }
            other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn dpmpp_2m_is_the_same_through_the_pipeline_and_steering_and_refused_for_fk() {
    let m = Arc::new(model());
    let p = tiller::pipeline::GenerationParams {
        prompt: "x".into(),
        n: 3,
        seed: 5,
        steps: Some(8),
        scheduler: Some(SamplerKind::DpmPp2mKarras),
        ..Default::default()
    };
    let plain = tiller::pipeline::generate(m.as_ref(), &p, &mut |_| true).unwrap();
    let steered =
        tiller::steering::generate(m.as_ref(), &p, &tiller::steering::SteeringRequest::default(), &mut |_| true)
            .unwrap();
    let a: Vec<f32> = plain.latents.flatten_all().unwrap().to_vec1().unwrap();
    let lat: Vec<Tensor> = steered.steered.images.iter().map(|i| i.latents.clone()).collect();
    let b: Vec<f32> = Tensor::cat(&lat, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
    let s = build_sampler(SamplerKind::DpmPp2m, m.info().scheduler.vp().unwrap(), 8, 0.0).unwrap();
    let err = tiller::steering::check_plan(
        &fk(4, 1.0, Potential::Diff, 2),
        s.as_ref(),
        tiller::sampling::ScheduleFamily::Vp,
        4,
    );
    assert!(matches!(err, Err(tiller::steering::PlanError::NeedsNoise { .. })), "{err:?}");
}

#[test]
fn steering_none_matches_the_plain_pipeline() {
    // Same seed, same noise order: `none` is the plain pipeline.
    let m = Arc::new(model());
    let p = tiller::pipeline::GenerationParams {
        prompt: "x".into(),
        n: 3,
        seed: 77,
        steps: Some(20),
        eta: Some(1.0),
        ..Default::default()
    };
    let plain = tiller::pipeline::generate(m.as_ref(), &p, &mut |_| true).unwrap();
    let req = tiller::steering::SteeringRequest::default();
    let steered = tiller::steering::generate(m.as_ref(), &p, &req, &mut |_| true).unwrap();
    let a: Vec<f32> = plain.latents.flatten_all().unwrap().to_vec1().unwrap();
    let lat: Vec<Tensor> = steered.steered.images.iter().map(|i| i.latents.clone()).collect();
    let b: Vec<f32> = Tensor::cat(&lat, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
}

fn ctx_with<'a>(
    m: &'a GaussianMixtureModel,
    s: &'a dyn Sampler,
    r: &'a dyn Reward,
    seeds: Vec<u64>,
) -> SteerContext<'a> {
    SteerContext {
        model: m,
        sampler: s,
        reward: Some(r),
        prompt: "",
        negative_prompt: None,
        guidance_scale: 1.0,
        seeds,
        latent_shape: (3, 2, 2),
        init_latents: None,
        edit: None,
        trace: true,
    }
}

#[test]
fn fk_reweights_a_four_step_lcm_run_by_default() {
    // The old fixed `every: 5` never reweighted a 4-step run: FK was best-of-k at the end.
    let m = model();
    let s = build_sampler(SamplerKind::Lcm, m.info().scheduler.vp().unwrap(), 4, 0.0).unwrap();
    let reward = Brightness::new();
    let spec: SteeringSpec = serde_json::from_value(serde_json::json!({"method": "fk", "particles": 4})).unwrap();
    let out = run(&ctx_with(&m, s.as_ref(), &reward, vec![1, 2]), &spec, &mut |_| true).unwrap();
    for img in &out.images {
        let steps: Vec<(usize, &str)> = img.trace.iter().map(|e| (e.step, e.kind.as_str())).collect();
        assert_eq!(steps, [(1, "resample"), (2, "resample"), (4, "final")]);
    }
    // The tilt shows: more of the bright mode than plain 4-step LCM.
    let base = steer(&m, s.as_ref(), &SteeringSpec::None, 600, 3).right;
    let fk = steer(&m, s.as_ref(), &spec, 600, 3).right;
    eprintln!("4-step LCM: base {base}, FK k=4 β=10 {fk}");
    assert!(fk > base + 0.2, "FK on 4 LCM steps must tilt: base {base}, fk {fk}");
}

#[test]
fn svdd_selects_on_a_one_step_run() {
    // One Euler-ancestral step injects no noise (σ_up = 0 at the last step): the old code took it
    // for a stochastic sampler and returned an unsteered sample. Now SVDD chooses among its
    // starting noises, the first of which is the plain run's.
    let m = model();
    let s = build_sampler(SamplerKind::EulerAncestral, m.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    assert!(!s.is_stochastic(), "one Euler-ancestral step adds no noise");
    let reward = Brightness::new();
    let seeds: Vec<u64> = (0..20).collect();
    let c = ctx_with(&m, s.as_ref(), &reward, seeds);
    let svdd = run(&c, &SteeringSpec::Svdd(SvddSpec { candidates: 8, alpha: 0.0 }), &mut |_| true).unwrap();
    let plain =
        run(&c, &SteeringSpec::BestOfN(tiller::steering::best_of_n::BestOfNSpec { n: 1 }), &mut |_| true).unwrap();
    let mut better = 0;
    for (a, b) in svdd.images.iter().zip(&plain.images) {
        assert_eq!(a.trace.len(), 1, "one selection");
        assert_eq!(a.trace[0].kind, "select");
        assert_eq!(a.trace[0].rewards.len(), 8);
        let (ra, rb) = (a.reward.unwrap(), b.reward.unwrap());
        assert!(ra >= rb - 1e-6, "the best of 8 starts is no worse than the first: {ra} < {rb}");
        better += (ra > rb + 1e-6) as usize;
    }
    assert!(better >= 12, "SVDD improved only {better} of 20 images");
    assert_eq!(svdd.denoiser_evals, 20 * 8);
}

#[test]
fn fk_refuses_schedules_that_cannot_diverge_or_name_no_step() {
    let m = model();
    let reward = Brightness::new();
    // Two Euler-ancestral steps: resampling at step 1 is followed by no noise.
    let s = build_sampler(SamplerKind::EulerAncestral, m.info().scheduler.vp().unwrap(), 2, 0.0).unwrap();
    let spec = fk(4, 1.0, Potential::Diff, 1);
    let err = tiller::steering::check_plan(&spec, s.as_ref(), tiller::sampling::ScheduleFamily::Vp, 4).unwrap_err();
    assert!(matches!(err, tiller::steering::PlanError::NeedsNoise { method: "fk" }), "{err:?}");
    match run(&ctx_with(&m, s.as_ref(), &reward, vec![1]), &spec, &mut |_| true) {
        Err(tiller::pipeline::GenerationError::InvalidInput(e)) => assert_eq!(e.field, "scheduler"),
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    // The default schedule on the same sampler is empty: terminal selection only, refused as well
    // because nothing can diverge after a resampling. One step only selects: accepted.
    let default: SteeringSpec = serde_json::from_value(serde_json::json!({"method": "fk"})).unwrap();
    assert!(tiller::steering::check_plan(&default, s.as_ref(), tiller::sampling::ScheduleFamily::Vp, 4).is_err());
    let one = build_sampler(SamplerKind::EulerAncestral, m.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    assert!(tiller::steering::check_plan(&default, one.as_ref(), tiller::sampling::ScheduleFamily::Vp, 4).is_ok());
    // An explicit window that names none of 10 steps.
    let d = ddim(&m, 1.0);
    let late: SteeringSpec =
        serde_json::from_value(serde_json::json!({"method": "fk", "resample": {"start": 0.95, "end": 1.0}})).unwrap();
    let ten = build_sampler(SamplerKind::Ddim, m.info().scheduler.vp().unwrap(), 10, 1.0).unwrap();
    assert!(matches!(
        tiller::steering::check_plan(&late, ten.as_ref(), tiller::sampling::ScheduleFamily::Vp, 4),
        Err(tiller::steering::PlanError::EmptySchedule { steps: 10 })
    ));
    assert!(
        tiller::steering::check_plan(&late, d.as_ref(), tiller::sampling::ScheduleFamily::Vp, 4).is_ok(),
        "100 steps: step 95 exists"
    );
    // ReNO's step cap.
    let reno: SteeringSpec = serde_json::from_value(serde_json::json!({"method": "reno"})).unwrap();
    assert!(matches!(
        tiller::steering::check_plan(&reno, ten.as_ref(), tiller::sampling::ScheduleFamily::Vp, 4),
        Err(tiller::steering::PlanError::TooManyRenoSteps { steps: 10, max: 4 })
    ));
}
