//! Checks every recorded diffusers run in `tests/fixtures/refs/run_*.json` (+ `.safetensors`):
//! timesteps, init_noise_sigma, Euler sigmas and the steps at which diffusers drew noise, both
//! from the sidecar's effective scheduler config and from the model's shipped
//! `scheduler_config.json` plus the run's overrides (what the server sees).

use std::path::PathBuf;

use candle_core::Device;
use tiller::sampling::{build_sampler, Sampler, SchedulerConfig};

fn refs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refs")
}

fn check(
    ctx: &str,
    sampler: &dyn Sampler,
    side: &serde_json::Value,
    st: &std::collections::HashMap<String, candle_core::Tensor>,
) {
    let want_t: Vec<f64> = serde_json::from_value(side["timesteps"].clone()).unwrap();
    let ts = st["timesteps"].to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(sampler.timesteps(), want_t, "{ctx}: timesteps (sidecar)");
    let ours: Vec<f32> = sampler.timesteps().iter().map(|&t| t as f32).collect();
    let theirs: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
    assert_eq!(ours, theirs, "{ctx}: timesteps (tensor)");
    if let Some(init) = side.get("init_noise_sigma").and_then(|v| v.as_f64()) {
        let got = sampler.init_noise_sigma();
        assert!((got - init).abs() <= 1e-6 * init.max(1.0), "{ctx}: init_noise_sigma {got} vs {init}");
    }
    if let Some(sig) = st.get("sigmas") {
        let want = sig.to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let got = sampler.sigmas().expect("sigma-space sampler");
        assert_eq!(got.len(), want.len(), "{ctx}");
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{ctx}: sigma {a} vs {b}");
        }
    }
    let noise_steps: Vec<usize> =
        side["noises"].as_array().unwrap().iter().map(|n| n["step"].as_u64().unwrap() as usize).collect();
    let ours: Vec<usize> = (0..sampler.num_steps()).filter(|&i| sampler.step_needs_noise(i)).collect();
    assert_eq!(ours, noise_steps, "{ctx}: steps drawing noise");
}

#[test]
fn timesteps_match_every_recorded_run() {
    let dir = refs();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no {dir:?}; skipping");
        return;
    };
    let mut runs: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("run_") && name.ends_with(".json")
        })
        .collect();
    runs.sort();
    for path in &runs {
        let ctx = path.file_name().unwrap().to_string_lossy().to_string();
        let side: serde_json::Value =
            serde_json::from_str(&tiller::util::json::from_python_json(&std::fs::read_to_string(path).unwrap()))
                .unwrap();
        let st = candle_core::safetensors::load(path.with_extension("safetensors"), &Device::Cpu).unwrap();
        let class = side["scheduler"].as_str().unwrap();
        let kind = SchedulerConfig::kind_for_class(class).unwrap_or_else(|| panic!("{ctx}: class {class}"));
        let steps = side["num_inference_steps"].as_u64().unwrap() as usize;
        let eta = side["eta"].as_f64().unwrap_or(0.0);

        // 1. the effective config diffusers used
        let cfg = SchedulerConfig::from_json(&side["scheduler_config"].to_string()).unwrap();
        let s = build_sampler(kind, &cfg, steps, eta).unwrap();
        check(&format!("{ctx} (effective config)"), s.as_ref(), &side, &st);

        // 2. the model's shipped config + overrides, resolved with the class defaults of `kind`
        let model = side["model"].as_str().unwrap();
        let shipped = dir.join("../models").join(model).join("scheduler/scheduler_config.json");
        let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
        if let Some(over) = side.get("scheduler_overrides").and_then(|o| o.as_object()) {
            for (k, v) in over {
                value[k] = v.clone();
            }
        }
        let cfg = SchedulerConfig::from_json(&value.to_string()).unwrap();
        let s = build_sampler(kind, &cfg, steps, eta).unwrap();
        check(&format!("{ctx} (shipped config as {kind:?})"), s.as_ref(), &side, &st);
    }
    eprintln!("{} runs checked", runs.len());
}
