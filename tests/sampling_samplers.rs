//! Closed-form and diffusers facts about the samplers (no model, no Python).

use candle_core::{Device, Tensor};
use tiller::models::PredictionType;
use tiller::sampling::{build_sampler, check_params, timesteps_for, SamplerKind, SchedulerConfig, TimestepSpacing};

const SD15_SCHEDULER: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

const SD_TURBO_SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.24.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "trailing",
  "trained_betas": null,
  "use_karras_sigmas": null
}"#;

fn sd() -> SchedulerConfig {
    SchedulerConfig::from_json(SD15_SCHEDULER).unwrap()
}

fn with_spacing(s: TimestepSpacing) -> SchedulerConfig {
    let mut c = sd();
    c.timestep_spacing = Some(s);
    c
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn vec(x: &Tensor) -> Vec<f32> {
    x.to_vec1::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn parses_real_configs() {
    let c = sd();
    assert_eq!(c.class_name, "PNDMScheduler");
    assert_eq!(c.beta_schedule, "scaled_linear");
    assert_eq!(c.steps_offset, 1);
    assert_eq!(c.set_alpha_to_one, Some(false));
    assert_eq!(c.timestep_spacing, None);
    let turbo = SchedulerConfig::from_json(SD_TURBO_SCHEDULER).unwrap();
    assert_eq!(turbo.timestep_spacing, Some(TimestepSpacing::Trailing));
    assert!(!turbo.use_karras_sigmas);
    let lcm = SchedulerConfig::from_json(r#"{"_class_name": "LCMScheduler"}"#).unwrap();
    assert_eq!((lcm.beta_schedule.as_str(), lcm.beta_start, lcm.beta_end), ("scaled_linear", 0.00085, 0.012));
    let v = SchedulerConfig::from_json(r#"{"prediction_type": "v_prediction"}"#).unwrap();
    assert_eq!(v.prediction_type, PredictionType::VPrediction);
}

#[test]
fn timesteps_per_class_defaults() {
    let c = sd();
    assert_eq!(timesteps_for(SamplerKind::Ddim, &c, 4).unwrap(), vec![751.0, 501.0, 251.0, 1.0]);
    assert_eq!(timesteps_for(SamplerKind::Ddpm, &c, 4).unwrap(), vec![751.0, 501.0, 251.0, 1.0]);
    // Euler's own default spacing is linspace when the config has no timestep_spacing key
    assert_eq!(timesteps_for(SamplerKind::Euler, &c, 4).unwrap(), vec![999.0, 666.0, 333.0, 0.0]);
    assert_eq!(timesteps_for(SamplerKind::EulerAncestral, &c, 4).unwrap(), vec![999.0, 666.0, 333.0, 0.0]);
    let tr = with_spacing(TimestepSpacing::Trailing);
    assert_eq!(timesteps_for(SamplerKind::Ddim, &tr, 4).unwrap(), vec![999.0, 749.0, 499.0, 249.0]);
    let le = with_spacing(TimestepSpacing::Leading);
    assert_eq!(timesteps_for(SamplerKind::Euler, &le, 4).unwrap(), vec![751.0, 501.0, 251.0, 1.0]);
    // LCM ignores spacing and steps_offset
    assert_eq!(timesteps_for(SamplerKind::Lcm, &tr, 4).unwrap(), vec![999.0, 759.0, 499.0, 259.0]);
    let l20 = timesteps_for(SamplerKind::Lcm, &c, 20).unwrap();
    assert_eq!(&l20[..4], &[999.0, 959.0, 899.0, 859.0]);
    // Euler linspace timesteps are fractional for most step counts
    let e50 = timesteps_for(SamplerKind::Euler, &c, 50).unwrap();
    assert!((e50[1] - 978.6122).abs() < 1e-3, "{}", e50[1]);
}

#[test]
fn init_noise_sigma_rules() {
    let c = sd();
    assert_eq!(build_sampler(SamplerKind::Ddim, &c, 4, 0.0).unwrap().init_noise_sigma(), 1.0);
    assert_eq!(build_sampler(SamplerKind::Lcm, &c, 4, 0.0).unwrap().init_noise_sigma(), 1.0);
    let e = build_sampler(SamplerKind::Euler, &c, 4, 0.0).unwrap();
    assert!((e.init_noise_sigma() - 14.6146).abs() < 1e-3);
    // leading: sqrt(σ(751)² + 1), σ at the first (not the 999th) timestep
    let e = build_sampler(SamplerKind::Euler, &with_spacing(TimestepSpacing::Leading), 4, 0.0).unwrap();
    let s0 = e.sigmas().unwrap()[0];
    assert!((e.init_noise_sigma() - (s0 * s0 + 1.0).sqrt()).abs() < 1e-9);
    assert!(s0 > 4.0 && s0 < 4.2, "{s0}");
    // SD-Turbo: Euler-ancestral, trailing, 1 step
    let turbo = SchedulerConfig::from_json(SD_TURBO_SCHEDULER).unwrap();
    let ea = build_sampler(SamplerKind::EulerAncestral, &turbo, 1, 0.0).unwrap();
    assert_eq!(ea.timesteps(), vec![999.0]);
    assert!((ea.init_noise_sigma() - 14.6146).abs() < 1e-3);
    assert_eq!(ea.sigmas().unwrap()[1], 0.0);
}

#[test]
fn noise_draws_follow_diffusers() {
    let c = sd();
    let flags = |k, cfg: &SchedulerConfig, n, eta| {
        let s = build_sampler(k, cfg, n, eta).unwrap();
        (0..n).map(|i| s.step_needs_noise(i)).collect::<Vec<_>>()
    };
    assert_eq!(flags(SamplerKind::Ddim, &c, 3, 0.0), vec![false; 3]);
    assert_eq!(flags(SamplerKind::Ddim, &c, 3, 0.5), vec![true; 3]);
    assert_eq!(flags(SamplerKind::Euler, &c, 3, 0.0), vec![false; 3]);
    // Euler-ancestral draws on the last step too (σ_up = 0 there)
    assert_eq!(flags(SamplerKind::EulerAncestral, &c, 3, 0.0), vec![true; 3]);
    assert_eq!(flags(SamplerKind::Lcm, &c, 3, 0.0), vec![true, true, false]);
    // DDPM draws when the *timestep* is > 0: with steps_offset 1 the last step is t = 1
    assert_eq!(flags(SamplerKind::Ddpm, &c, 3, 0.0), vec![true; 3]);
    let mut c0 = sd();
    c0.steps_offset = 0;
    assert_eq!(flags(SamplerKind::Ddpm, &c0, 3, 0.0), vec![true, true, false]);
    assert!(!build_sampler(SamplerKind::Ddim, &c, 3, 0.0).unwrap().is_stochastic());
}

#[test]
fn validation_errors() {
    let c = sd();
    let msg = |k, n, eta| check_params(k, &c, n, eta).unwrap_err().to_string();
    assert!(msg(SamplerKind::Ddim, 0, 0.0).contains("steps"));
    assert!(msg(SamplerKind::Ddim, 1001, 0.0).contains("num_train_timesteps"));
    assert!(msg(SamplerKind::Lcm, 51, 0.0).contains("original_inference_steps"));
    assert!(msg(SamplerKind::Ddim, 10, 1.5).contains("eta"));
    assert!(msg(SamplerKind::Ddim, 10, -0.1).contains("eta"));
    assert!(check_params(SamplerKind::Lcm, &c, 50, 0.0).is_ok());
    assert!(check_params(SamplerKind::Ddim, &c, 1000, 0.0).is_ok());
    // leading + steps_offset 1 with 1000 steps reaches t = 1000: rejected at build
    assert!(build_sampler(SamplerKind::Ddim, &c, 1000, 0.0).is_err());
    assert!(build_sampler(SamplerKind::Ddim, &c, 999, 0.0).is_ok());
    let mut bad = sd();
    bad.variance_type = Some("learned_range".into());
    assert!(check_params(SamplerKind::Ddpm, &bad, 10, 0.0).is_err());
    let mut bad = sd();
    bad.beta_schedule = "sigmoid".into();
    assert!(build_sampler(SamplerKind::Ddim, &bad, 10, 0.0).is_err());
    // Karras σ are supported (tests/sampling_multistep.rs); exponential and beta σ are not.
    let mut karras = sd();
    karras.use_karras_sigmas = true;
    assert!(build_sampler(SamplerKind::Euler, &karras, 10, 0.0).is_ok());
    let mut exp = sd();
    exp.use_exponential_sigmas = true;
    for k in [SamplerKind::Euler, SamplerKind::DpmPp2m] {
        let Err(e) = build_sampler(k, &exp, 10, 0.0) else { panic!("{k}: exponential sigmas accepted") };
        assert!(e.to_string().contains("exponential"), "{e}");
    }
}

/// DDIM with η = 1 is the DDPM posterior q(x_s | x_t, x̂0).
#[test]
fn ddim_eta_one_is_ddpm_posterior() {
    let c = sd();
    let s = build_sampler(SamplerKind::Ddim, &c, 10, 1.0).unwrap();
    let sched = tiller::sampling::NoiseSchedule::from_config(&c).unwrap();
    let x = t(&[0.5, -1.0, 2.0, 0.1]);
    let x0 = t(&[0.2, 0.3, -0.4, 1.0]);
    let zero = x.zeros_like().unwrap();
    let one = x.ones_like().unwrap();
    for i in 0..9 {
        let (ts, tp) = (s.timestep(i) as usize, s.timestep(i + 1) as usize);
        let (at, as_) = (sched.abar(ts), sched.abar(tp));
        let mean = s.transition(&x, &x0, None, i, Some(&zero)).unwrap();
        let std = (&s.transition(&x, &x0, None, i, Some(&one)).unwrap() - &mean).unwrap();
        let c0 = as_.sqrt() * (1.0 - at / as_) / (1.0 - at);
        let ct = (at / as_).sqrt() * (1.0 - as_) / (1.0 - at);
        let want_mean = ((&x0 * c0).unwrap() + (&x * ct).unwrap()).unwrap();
        let want_std = ((1.0 - as_) / (1.0 - at) * (1.0 - at / as_)).sqrt() as f32;
        assert!(max_diff(&mean, &want_mean) < 1e-5, "step {i}");
        for v in vec(&std) {
            assert!((v - want_std).abs() < 1e-5, "step {i}: {v} vs {want_std}");
        }
    }
}

/// The transition takes ε̂ from (x, x̂0); for every prediction type this equals the ε̂ diffusers
/// derives from the model output.
#[test]
fn ddim_eps_from_x0_matches_direct_formula() {
    let x = t(&[0.5, -1.0, 2.0, 0.1]);
    let out = t(&[0.7, 0.2, -1.3, 0.4]);
    for pred in [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample] {
        let mut c = sd();
        c.prediction_type = pred;
        let s = build_sampler(SamplerKind::Ddim, &c, 20, 0.0).unwrap();
        let sched = tiller::sampling::NoiseSchedule::from_config(&c).unwrap();
        for i in 0..20 {
            let ts = s.timestep(i) as usize;
            let prev = ts as i64 - 50;
            let (a, ap) = (sched.abar(ts), if prev >= 0 { sched.abar(prev as usize) } else { sched.abar(0) });
            let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
            let (x0, eps) = match pred {
                PredictionType::Epsilon => (((&x - (&out * sb).unwrap()).unwrap() / sa).unwrap(), out.clone()),
                PredictionType::VPrediction => (
                    ((&x * sa).unwrap() - (&out * sb).unwrap()).unwrap(),
                    ((&out * sa).unwrap() + (&x * sb).unwrap()).unwrap(),
                ),
                PredictionType::Sample => (out.clone(), ((&x - (&out * sa).unwrap()).unwrap() / sb).unwrap()),
            };
            let want = ((&x0 * ap.sqrt()).unwrap() + (&eps * (1.0 - ap).sqrt()).unwrap()).unwrap();
            let got = s.step(&x, &out, i, None).unwrap();
            let scale = vec(&want).iter().fold(1f32, |m, v| m.max(v.abs()));
            assert!(max_diff(&got, &want) / scale < 2e-5, "{pred:?} step {i}: {:?} vs {:?}", vec(&got), vec(&want));
        }
    }
}

#[test]
fn one_step_samplers_return_x0() {
    let turbo = SchedulerConfig::from_json(SD_TURBO_SCHEDULER).unwrap();
    let x = t(&[10.0, -3.0, 7.5, 0.25]);
    let out = t(&[0.7, 0.2, -1.3, 0.4]);
    let z = t(&[1.0, 1.0, 1.0, 1.0]);
    let mut alpha_one = sd();
    alpha_one.set_alpha_to_one = Some(true);
    for (kind, cfg) in [
        (SamplerKind::Euler, &turbo),
        (SamplerKind::EulerAncestral, &turbo),
        (SamplerKind::Lcm, &turbo),
        (SamplerKind::Ddim, &alpha_one),
    ] {
        let s = build_sampler(kind, cfg, 1, 0.0).unwrap();
        let x0 = s.predict_x0(&x, &out, 0).unwrap();
        let noise = if s.step_needs_noise(0) { Some(&z) } else { None };
        let got = s.transition(&x, &x0, None, 0, noise).unwrap();
        assert_eq!(vec(&got), vec(&x0), "{kind:?}");
    }
}

#[test]
fn euler_scale_and_v_prediction() {
    let mut c = sd();
    c.prediction_type = PredictionType::VPrediction;
    let s = build_sampler(SamplerKind::Euler, &c, 4, 0.0).unwrap();
    let sig = s.sigmas().unwrap();
    let x = t(&[2.0, -1.0, 0.5, 3.0]);
    let scaled = s.scale_model_input(&x, 1).unwrap();
    let k = 1.0 / (sig[1] * sig[1] + 1.0).sqrt();
    assert!(max_diff(&scaled, &(&x * k).unwrap()) < 1e-6);
    // with x = x0 + σ·ε and v = α·ε − σ_vp·x0 (α = 1/√(σ²+1), σ_vp = σ·α), x̂0 is exact
    let x0 = t(&[0.3, -0.2, 0.9, -1.1]);
    let eps = t(&[1.0, 0.5, -0.7, 0.2]);
    let s1 = sig[1];
    let a = 1.0 / (s1 * s1 + 1.0).sqrt();
    let xs = (&x0 + (&eps * s1).unwrap()).unwrap();
    let v = ((&eps * a).unwrap() - (&x0 * (s1 * a)).unwrap()).unwrap();
    let got = s.predict_x0(&xs, &v, 1).unwrap();
    assert!(max_diff(&got, &x0) < 1e-5);
}
