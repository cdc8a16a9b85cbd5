//! Finding and loading model directories under the models root.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::error::{Result, TillerError};
use crate::models::gaussian_mixture::{self, GaussianMixtureModel};
use crate::models::stable_diffusion::{LoadOptions, StableDiffusion};
use crate::models::DiffusionModel;

/// Model directories directly under `root` (each holding `model_index.json`, or `gmm.json` for
/// the analytic Gaussian-mixture model), sorted by name.
pub fn discover_models(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries =
        std::fs::read_dir(root).map_err(|e| TillerError::file(root, format!("cannot read models directory: {e}")))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.join("model_index.json").is_file() || p.join(gaussian_mixture::CONFIG_FILE).is_file() {
            if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                out.push((name.to_string(), p.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Load the model in `dir` (diffusers layout), naming it `name`.
///
/// On CPU only f32 is sensible: candle's CPU bf16 conv2d is unimplemented (an error here) and
/// f16 runs about 2× slower than f32 (a warning).
pub fn load_model(name: &str, dir: &Path, device: &Device, dtype: DType) -> Result<Arc<dyn DiffusionModel>> {
    check_dtype(device, dtype)?;
    if !dir.is_dir() {
        return Err(TillerError::file(dir, "model directory does not exist"));
    }
    if dir.join(gaussian_mixture::CONFIG_FILE).is_file() {
        return Ok(Arc::new(GaussianMixtureModel::load(name, dir, device)?));
    }
    if !dir.join("model_index.json").is_file() {
        return Err(TillerError::file(dir.join("model_index.json"), "missing: not a diffusers model directory"));
    }
    let variant = match dtype {
        DType::F16 => Some("fp16".to_string()),
        _ => None,
    };
    let opts = LoadOptions { dtype, device: device.clone(), variant, clip_skip: 0 };
    #[derive(serde::Deserialize)]
    struct Class {
        #[serde(rename = "_class_name", default)]
        class_name: String,
    }
    let class: Class = super::weights::read_config(&dir.join("model_index.json"))?;
    if super::sd3::PIPELINES.contains(&class.class_name.as_str()) {
        return Ok(Arc::new(super::sd3::StableDiffusion3::load(name, dir, &opts)?));
    }
    if super::flux::PIPELINES.contains(&class.class_name.as_str()) {
        return Ok(Arc::new(super::flux::Flux::load(name, dir, &opts)?));
    }
    Ok(Arc::new(StableDiffusion::load(name, dir, &opts)?))
}

/// Reject dtypes the device cannot run.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    match (device.is_cpu(), dtype) {
        (_, DType::F32) => Ok(()),
        (true, DType::BF16) => Err(TillerError::field(
            "dtype",
            "bf16 is not supported on CPU (candle's CPU bf16 conv2d is unimplemented); use f32",
        )),
        (true, DType::F16) => {
            tracing::warn!("f16 on CPU is about 2x slower than f32 in candle; prefer dtype = \"f32\"");
            Ok(())
        }
        (_, DType::F16 | DType::BF16) => Ok(()),
        (_, other) => Err(TillerError::field("dtype", format!("unsupported dtype {other:?}; use f32, f16 or bf16"))),
    }
}
