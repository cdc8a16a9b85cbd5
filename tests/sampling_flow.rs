//! Flow-matching sampling against diffusers' `FlowMatchEulerDiscreteScheduler` (0.42, torch
//! CPU, float32): sigma schedules (shift, dynamic shifting with μ from the image's token count,
//! exponential and linear time shifts, `shift_terminal`, the SD3 and FLUX pipelines' sigma
//! spacings) and whole loops with a closed-form "network" (`out = 0.8·tanh(x) + bias·t/1000`)
//! and, for `stochastic_sampling`, the noise diffusers drew. The loops come from
//! `scripts/sampling/flow.py` (diffusers venv) into `tests/fixtures/refs/flow_sampling.json`.

use candle_core::{Device, Tensor};
use tiller::sampling::{build_flow_sampler, FlowSchedulerConfig, FlowSigmas, SamplerKind};

fn tensor(v: &serde_json::Value, shape: &[usize]) -> Tensor {
    let v: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn flow_euler_loops_match_diffusers() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/refs/flow_sampling.json"))
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shape: Vec<usize> = serde_json::from_value(dump["shape"].clone()).unwrap();
    let init = tensor(&dump["init"], &shape);
    let bias = tensor(&dump["bias"], &shape);
    let mut worst = 0f32;
    let cases = dump["cases"].as_array().unwrap();
    assert!(cases.len() >= 13);
    for case in cases {
        let cfg = FlowSchedulerConfig::from_json(&case["config"].to_string()).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let sigmas = match case["sigmas"].as_str().unwrap() {
            "linspace" => FlowSigmas::Linspace,
            _ => FlowSigmas::Scheduler,
        };
        let seq_len = case["seq_len"].as_u64().unwrap() as usize;
        let ctx = format!("{} steps {steps} sigmas {sigmas:?} seq {seq_len}", case["config"]);
        let sampler = build_flow_sampler(SamplerKind::FlowEuler, &cfg, sigmas, steps, 0.0, seq_len).unwrap();

        let want_t: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let want_s: Vec<f64> = serde_json::from_value(case["sigma_values"].clone()).unwrap();
        let got_s = sampler.sigmas().unwrap();
        assert_eq!(got_s.len(), want_s.len(), "{ctx}");
        for i in 0..steps {
            assert!(
                (sampler.timestep(i) - want_t[i]).abs() <= 1e-4 * want_t[i].max(1.0),
                "{ctx}: timesteps {:?} vs {want_t:?}",
                sampler.timesteps()
            );
        }
        for (g, w) in got_s.iter().zip(&want_s) {
            assert!((g - w).abs() <= 1e-6, "{ctx}: sigmas {got_s:?} vs {want_s:?}");
        }

        let draws: Vec<usize> = serde_json::from_value(case["draws"].clone()).unwrap();
        let mut noises = case["noises"].as_array().unwrap().iter().map(|n| tensor(n, &shape));
        assert_eq!(sampler.init_noise_sigma(), 1.0);
        let mut x = init.clone();
        for (i, want) in case["traj"].as_array().unwrap().iter().enumerate() {
            assert_eq!(sampler.step_needs_noise(i) as usize, draws[i], "{ctx}: noise draw at step {i}");
            let t = sampler.timestep(i);
            let x_in = sampler.scale_model_input(&x, i).unwrap();
            let out = ((x_in.tanh().unwrap() * 0.8).unwrap() + (&bias * (t as f32 / 1000.0) as f64).unwrap()).unwrap();
            let z = if sampler.step_needs_noise(i) { Some(noises.next().unwrap()) } else { None };
            x = sampler.step(&x, &out, i, z.as_ref()).unwrap();
            let want = tensor(want, &shape);
            let err = max_abs(&(&x - &want).unwrap()) / max_abs(&want).max(1e-3);
            worst = worst.max(err);
            assert!(err < 1e-4, "{ctx}: step {i} relative error {err}");
        }
        assert!(noises.next().is_none(), "{ctx}: diffusers drew more noise");
    }
    eprintln!("{} flow loops match; worst relative error {worst:e}", cases.len());
}

/// The steering interface (x̂0, then the transition) gives the same loop as diffusers' update.
#[test]
fn predict_then_transition_equals_the_step() {
    let cfg = FlowSchedulerConfig::from_json(r#"{"shift": 3.0}"#).unwrap();
    let s = build_flow_sampler(SamplerKind::FlowEuler, &cfg, FlowSigmas::Scheduler, 6, 0.0, 0).unwrap();
    let dev = Device::Cpu;
    let x = Tensor::new(&[[0.4f32, -1.3], [2.0, 0.1]], &dev).unwrap();
    let v = Tensor::new(&[[-0.7f32, 0.2], [1.1, -0.5]], &dev).unwrap();
    for i in 0..6 {
        let a = s.step(&x, &v, i, None).unwrap();
        let x0 = s.predict_x0(&x, &v, i).unwrap();
        let b = s.transition(&x, &x0, None, i, None).unwrap();
        assert!(max_abs(&(&a - &b).unwrap()) < 1e-5, "step {i}");
        // x̂0 = x − σ·v
        let sigma = s.sigmas().unwrap()[i];
        let want = (&x - (&v * sigma).unwrap()).unwrap();
        assert!(max_abs(&(&x0 - want).unwrap()) < 1e-6);
    }
}

#[test]
fn flow_sde_draws_noise_except_where_it_adds_none() {
    let cfg = FlowSchedulerConfig::from_json(r#"{"shift": 3.0}"#).unwrap();
    let sde = build_flow_sampler(SamplerKind::FlowSde, &cfg, FlowSigmas::Scheduler, 5, 1.0, 0).unwrap();
    assert!(sde.is_stochastic());
    assert!((0..4).all(|i| sde.step_needs_noise(i) && sde.injects_noise(i)));
    assert!(!sde.step_needs_noise(4), "the last step (σ' = 0) adds no noise");
    let det = build_flow_sampler(SamplerKind::FlowSde, &cfg, FlowSigmas::Scheduler, 5, 0.0, 0).unwrap();
    assert!(!det.is_stochastic());
    assert!(build_flow_sampler(SamplerKind::FlowSde, &cfg, FlowSigmas::Scheduler, 5, 1.5, 0).is_err());
    // Samplers of the other family are refused, naming the field.
    let Err(e) = build_flow_sampler(SamplerKind::Ddim, &cfg, FlowSigmas::Scheduler, 5, 0.0, 0) else {
        panic!("ddim on a flow schedule")
    };
    assert!(e.to_string().contains("flow-euler or flow-sde"), "{e}");
}
