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
