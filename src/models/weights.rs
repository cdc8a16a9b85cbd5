//! Reading one component's weights (`unet/`, `vae/`, `text_encoder/`) as diffusers and
//! transformers publish them: single or sharded safetensors files, optional `.fp16` variants.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Result, TillerError};

/// Weights of one component, by published tensor name, already on the target device/dtype.
#[derive(Clone)]
pub struct ComponentWeights {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub tensors: HashMap<String, Tensor>,
    pub dtype: DType,
    pub device: Device,
}

impl ComponentWeights {
    /// A VarBuilder over these tensors (clones are reference-counted, nothing is copied).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device)
    }
}

/// Weight files of a component in `dir` whose stem is `stem` (`diffusion_pytorch_model` or
/// `model`): the variant file when asked and present, else the plain one; sharded sets through
/// their `.index.json`.
pub fn find_weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(format!("{stem}.{v}.safetensors"));
    }
    candidates.push(format!("{stem}.safetensors"));
    for name in &candidates {
        let single = dir.join(name);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            return read_index(&index);
        }
    }
    if dir.join(format!("{stem}.bin")).is_file() {
        return Err(TillerError::file(
            dir.join(format!("{stem}.bin")),
            "PyTorch pickle weights are not loaded (unsafe to unpickle); convert them to safetensors",
        ));
    }
    Err(TillerError::file(dir, format!("no weight file: expected {}", candidates.join(" or "))))
}

fn read_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| TillerError::file(index, e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TillerError::file(index, format!("malformed JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| TillerError::file(index, "missing `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for v in map.values() {
        let name = v.as_str().ok_or_else(|| TillerError::file(index, "weight_map values must be file names"))?;
        if name.contains('/') || name.contains("..") {
            return Err(TillerError::file(index, format!("shard name `{name}` must be a plain file name")));
        }
        let p = dir.join(name);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    for f in &files {
        if !f.is_file() {
            return Err(TillerError::file(f, format!("shard listed in {} is missing", index.display())));
        }
    }
    Ok(files)
}

/// Memory-map the files and materialise every tensor in `dtype` on `device`.
pub fn load_component(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<ComponentWeights> {
    let files = find_weight_files(dir, stem, variant)?;
    let mut tensors = HashMap::new();
    for f in &files {
        // SAFETY: the file is mapped read-only and every tensor is copied out before the map is
        // dropped; a concurrent writer could only corrupt values, which we accept like every
        // safetensors loader does.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .map_err(|e| TillerError::file(f, format!("not a valid safetensors file: {e}")))?;
        for (name, _) in st.tensors() {
            let t = st.load(&name, &Device::Cpu).map_err(|e| TillerError::file(f, format!("tensor `{name}`: {e}")))?;
            let t = t.to_dtype(dtype)?.to_device(device)?;
            tensors.insert(name, t);
        }
    }
    Ok(ComponentWeights { dir: dir.to_path_buf(), files, tensors, dtype, device: device.clone() })
}

/// Read and parse a component's `config.json`.
/// `root/name`, or an error naming the missing diffusers component directory.
pub fn component_dir(root: &Path, name: &str) -> Result<std::path::PathBuf> {
    let d = root.join(name);
    if !d.is_dir() {
        return Err(TillerError::file(&d, format!("missing component directory `{name}/` (diffusers layout)")));
    }
    Ok(d)
}

pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TillerError::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| TillerError::file(path, format!("malformed config: {e}")))
}

/// Attach the component directory to a network construction error ("cannot find tensor ...").
pub fn in_component<T>(dir: &Path, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| TillerError::file(dir, format!("weights do not match config.json: {e}")))
}
