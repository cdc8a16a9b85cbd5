//! Shared by the flow-model parity tests: fixture paths, reference files and the tolerance check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// max |error| ≤ TOL · max |reference| per tensor, in f32.
pub const TOL: f64 = 1e-4;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `refs/<stem>.safetensors` and its JSON sidecar (Python-written: `-Infinity` reads as null).
pub fn refs(stem: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("refs");
    let t = candle_core::safetensors::load(dir.join(format!("{stem}.safetensors")), &Device::Cpu).unwrap();
    let json = std::fs::read_to_string(dir.join(format!("{stem}.json")))
        .map(|s| serde_json::from_str(&tiller::util::json::from_python_json(&s)).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (t, json)
}

/// Asserts `got` is within [`TOL`] of `want` relative to `want`'s largest value; returns the
/// relative error.
pub fn close(case: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{case}: shape");
    let (g, w) = (got.to_dtype(DType::F64).unwrap(), want.to_dtype(DType::F64).unwrap());
    let err = (&g - &w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
    let rel = err / scale;
    println!("{case:<48} max|err| {err:.3e}  max|ref| {scale:.3e}  rel {rel:.3e}");
    assert!(rel <= TOL, "{case}: relative error {rel:.3e}");
    rel
}

/// The stems of `refs/flowrun_<prefix>*.json`, sorted.
pub fn flow_runs(prefix: &str) -> Vec<String> {
    let mut runs: Vec<String> = std::fs::read_dir(fixtures().join("refs"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(&format!("flowrun_{prefix}")).then(|| n.strip_suffix(".json").map(str::to_string)).flatten()
        })
        .collect();
    runs.sort();
    runs
}

/// Replays the recorded run `stem` (flow-euler, 16×16) on `model`: timesteps, every step's
/// latents, the pipeline loop's final latents and the decoded image. Returns whether it used
/// classifier-free guidance.
pub fn check_flow_run(model: &dyn tiller::models::DiffusionModel, stem: &str) -> bool {
    use tiller::pipeline::{sample_latents, Conditioning};
    use tiller::sampling::{build_for, ReplayNoise, SamplerKind};
    let (t, json) = refs(stem);
    let steps = json["num_inference_steps"].as_u64().unwrap() as usize;
    let n = json["n"].as_u64().unwrap() as usize;
    let seq = model.info().image_seq_len(16, 16);
    let sampler = build_for(SamplerKind::FlowEuler, &model.info().scheduler, steps, 0.0, seq).unwrap();
    let want_ts: Vec<f64> = t["timesteps"].to_vec1().unwrap();
    for (i, w) in want_ts.iter().enumerate() {
        assert!((sampler.timestep(i) - w).abs() < 1e-3, "{stem}: timesteps {:?} vs {want_ts:?}", sampler.timesteps());
    }
    let guidance = json["guidance_scale"].as_f64().unwrap();
    let cond =
        Conditioning::new(model, json["prompt"].as_str().unwrap(), json["negative_prompt"].as_str(), guidance, n)
            .unwrap();
    // Step by step (localises a failure), then the pipeline's loop.
    let mut x = (&t["init_latents"] * sampler.init_noise_sigma()).unwrap();
    let mut prev: Option<Tensor> = None;
    for i in 0..steps {
        let out = cond.predict(model, &sampler.scale_model_input(&x, i).unwrap(), sampler.timestep(i)).unwrap();
        let x0 = sampler.predict_x0(&x, &out, i).unwrap();
        x = sampler.transition(&x, &x0, prev.as_ref(), i, None).unwrap();
        prev = Some(x0);
        close(&format!("{stem} step {i}"), &x, &t[&format!("latents_step_{i}")]);
    }
    let (latents, _) =
        sample_latents(model, sampler.as_ref(), &cond, &t["init_latents"], &mut ReplayNoise::new(vec![]), &mut |_| {
            true
        })
        .unwrap();
    close(&format!("{stem} final latents"), &latents, &t["latents"]);
    close(&format!("{stem} image"), &model.decode(&latents).unwrap(), &t["image"]);
    cond.cfg
}
