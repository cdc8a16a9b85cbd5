//! DPM-Solver++ 2M (`dpmpp-2m`, `dpmpp-2m-karras`) and Euler with Karras σ (`euler-karras`, or
//! `use_karras_sigmas` in the config) against diffusers 0.42's `DPMSolverMultistepScheduler` and
//! `EulerDiscreteScheduler`: timesteps, σ and every latent of 23 recorded loops with the
//! closed-form "network" `out = 0.8·tanh(x_in) + bias·t/1000` (`scripts/sampling/multistep.py`).
//! The loops run through `predict_x0` and `transition` with the previous step's x̂0, as every
//! strategy does.

use candle_core::{Device, Tensor};
use tiller::sampling::{build_sampler, SamplerKind, SchedulerConfig};

fn tensor(v: &serde_json::Value, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn kind(name: &str) -> SamplerKind {
    serde_json::from_value(serde_json::Value::String(name.into())).unwrap()
}

#[test]
fn multistep_and_karras_loops_match_diffusers() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/refs/multistep_sampling.json"))
            .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shape: Vec<usize> = serde_json::from_value(dump["shape"].clone()).unwrap();
    let init = tensor(&dump["init"], &shape);
    let bias = tensor(&dump["bias"], &shape);
    let cases = dump["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 23);
    let mut worst = 0f32;
    for case in cases {
        let cfg = SchedulerConfig::from_json(&case["config"].to_string()).unwrap();
        let k = kind(case["kind"].as_str().unwrap());
        let steps = case["steps"].as_u64().unwrap() as usize;
        let ctx = format!("{k} {} steps {steps}", case["config"]);
        let s = build_sampler(k, &cfg, steps, 0.0).unwrap();

        let want_t: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let want_s: Vec<f64> = serde_json::from_value(case["sigmas"].clone()).unwrap();
        for (i, w) in want_t.iter().enumerate() {
            assert!((s.timestep(i) - w).abs() <= 1e-3, "{ctx}: timesteps {:?} vs {want_t:?}", s.timesteps());
        }
        let got_s = s.sigmas().unwrap();
        assert_eq!(got_s.len(), want_s.len(), "{ctx}");
        for (g, w) in got_s.iter().zip(&want_s) {
            assert!((g - w).abs() <= 1e-5 * w.max(1.0), "{ctx}: sigmas {got_s:?} vs {want_s:?}");
        }

        let mut x = (&init * s.init_noise_sigma()).unwrap();
        let mut prev: Option<Tensor> = None;
        for (i, want) in case["traj"].as_array().unwrap().iter().enumerate() {
            let t = s.timestep(i);
            let x_in = s.scale_model_input(&x, i).unwrap();
            let out = ((x_in.tanh().unwrap() * 0.8).unwrap() + (&bias * (t as f32 / 1000.0) as f64).unwrap()).unwrap();
            let x0 = s.predict_x0(&x, &out, i).unwrap();
            x = s.transition(&x, &x0, prev.as_ref(), i, None).unwrap();
            prev = Some(x0);
            let want = tensor(want, &shape);
            let err = max_abs(&(&x - &want).unwrap()) / max_abs(&want).max(1e-3);
            worst = worst.max(err);
            assert!(err < 1e-4, "{ctx}: step {i} relative error {err}");
        }
    }
    eprintln!("{} loops match; worst relative error {worst:e}", cases.len());
}

/// The history matters: DPM-Solver++ 2M without the previous x̂0 is the first-order (DDIM)
/// step, which lands elsewhere; `step` refuses the second-order steps instead of guessing.
#[test]
fn dpmpp_2m_uses_the_previous_prediction() {
    let cfg = SchedulerConfig::stable_diffusion();
    let s = build_sampler(SamplerKind::DpmPp2m, &cfg, 5, 0.0).unwrap();
    assert!(s.is_multistep() && !s.is_stochastic());
    let dev = Device::Cpu;
    let x = Tensor::new(&[[0.4f32, -1.3], [2.0, 0.1]], &dev).unwrap();
    let x0 = Tensor::new(&[[0.1f32, -0.2], [0.3, 0.0]], &dev).unwrap();
    let m1 = Tensor::new(&[[0.5f32, 0.2], [-0.3, 0.4]], &dev).unwrap();
    let first = s.transition(&x, &x0, None, 2, None).unwrap();
    let second = s.transition(&x, &x0, Some(&m1), 2, None).unwrap();
    assert!(max_abs(&(&first - &second).unwrap()) > 1e-3);
    // With m1 = x0 the extrapolation term vanishes: the second-order step is the first-order one.
    let same = s.transition(&x, &x0, Some(&x0), 2, None).unwrap();
    assert!(max_abs(&(&first - &same).unwrap()) < 1e-6);
    assert!(s.step(&x, &x0, 0, None).is_ok(), "step 0 is first order");
    assert!(s.step(&x, &x0, 2, None).is_err(), "step 2 needs history");
    // The last step (to σ = 0) returns x̂0.
    let last = s.transition(&x, &x0, Some(&m1), 4, None).unwrap();
    assert!(max_abs(&(&last - &x0).unwrap()) == 0.0);
}

#[test]
fn unsupported_dpm_variants_are_named_and_fall_back_to_ddim_by_default() {
    for (over, word) in [
        (r#""algorithm_type": "sde-dpmsolver++""#, "sde-dpmsolver++"),
        (r#""solver_order": 3"#, "solver_order"),
        (r#""solver_type": "heun""#, "heun"),
        (r#""use_lu_lambdas": true"#, "use_lu_lambdas"),
    ] {
        let cfg = SchedulerConfig::from_json(&format!(r#"{{"_class_name": "DPMSolverMultistepScheduler", {over}}}"#))
            .unwrap();
        assert_eq!(cfg.default_sampler(), SamplerKind::Ddim, "{over}");
        let Err(e) = build_sampler(SamplerKind::DpmPp2m, &cfg, 10, 0.0) else { panic!("{over} accepted") };
        assert!(e.to_string().contains(word), "{over}: {e}");
    }
    let cfg = SchedulerConfig::from_json(r#"{"_class_name": "DPMSolverMultistepScheduler"}"#).unwrap();
    assert_eq!(cfg.default_sampler(), SamplerKind::DpmPp2m);
}
