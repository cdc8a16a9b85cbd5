//! Latent files: safetensors holding f32 tensors, the exchange format of `--init-latents`,
//! `--save-latents` and the HTTP API's base64 `init_latents`.
//!
//! * An **init-latents** file holds one f32 tensor `latents` shaped (n, C, H/f, W/f): unit-variance
//!   initial noise with the meaning of diffusers' `latents` argument. A file written by
//!   `--save-latents` is accepted too: it carries the run's initial noise as `init_latents`, which
//!   then takes precedence over its (final) `latents`, so any saved run can be replayed.
//! * A **save-latents** file holds `latents` (final latents, before VAE scaling and decode),
//!   `image` (decoded images, f32 NCHW in [0, 1] before quantisation) and `init_latents`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, TillerError};

/// Name of the tensor a latents file must hold.
pub const LATENTS: &str = "latents";
/// Decoded image tensor in a `--save-latents` file.
pub const IMAGE: &str = "image";
/// Initial noise tensor in a `--save-latents` file.
pub const INIT_LATENTS: &str = "init_latents";

/// Why a latents buffer was rejected (the message names what is wrong).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LatentsError(pub String);

/// Parse a safetensors buffer holding initial latents (see the module docs). The tensor must be
/// f32 and 4-dimensional; it is returned on the CPU.
pub fn read_init_latents(bytes: &[u8]) -> std::result::Result<Tensor, LatentsError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| LatentsError(format!("not a valid safetensors file: {e}")))?;
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    let name = if names.iter().any(|n| n == INIT_LATENTS) {
        INIT_LATENTS
    } else if names.iter().any(|n| n == LATENTS) {
        LATENTS
    } else {
        let mut names = names;
        names.sort();
        return Err(LatentsError(format!(
            "no tensor named `{LATENTS}` (found: {})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        )));
    };
    let view = st.tensor(name).map_err(|e| LatentsError(format!("tensor `{name}`: {e}")))?;
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(LatentsError(format!("tensor `{name}` has dtype {:?}; expected F32", view.dtype())));
    }
    if view.shape().len() != 4 {
        return Err(LatentsError(format!(
            "tensor `{name}` has shape {:?}; expected 4 dimensions (n, channels, height/f, width/f)",
            view.shape()
        )));
    }
    let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(LatentsError(format!("tensor `{name}` contains NaN or infinite values")));
    }
    Tensor::from_vec(values, view.shape().to_vec(), &Device::Cpu)
        .map_err(|e| LatentsError(format!("tensor `{name}`: {e}")))
}

/// Read an init-latents file from disk.
pub fn load_init_latents(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| TillerError::file(path, format!("cannot read: {e}")))?;
    read_init_latents(&bytes).map_err(|e| TillerError::file(path, e.0))
}

/// Serialize named tensors (converted to f32 on the CPU) to a safetensors buffer.
pub fn to_safetensors_bytes(tensors: &[(&str, &Tensor)]) -> Result<Vec<u8>> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        map.insert(name.to_string(), t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?);
    }
    safetensors::serialize(&map, None).map_err(|e| TillerError::Other(anyhow::anyhow!("safetensors: {e}")))
}

/// Write named tensors (as f32) to a safetensors file.
pub fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let bytes = to_safetensors_bytes(tensors)?;
    std::fs::write(path, bytes).map_err(|e| TillerError::file(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_precedence() {
        let a = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 4, 2, 2)).unwrap();
        let b = (&a * 2.0).unwrap();
        let bytes = to_safetensors_bytes(&[(LATENTS, &a)]).unwrap();
        let back = read_init_latents(&bytes).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let bytes = to_safetensors_bytes(&[(LATENTS, &a), (INIT_LATENTS, &b)]).unwrap();
        let back = read_init_latents(&bytes).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn rejects_bad_files() {
        assert!(read_init_latents(b"garbage").unwrap_err().0.contains("safetensors"));
        let t = Tensor::zeros((4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = read_init_latents(&to_safetensors_bytes(&[(LATENTS, &t)]).unwrap()).unwrap_err();
        assert!(e.0.contains("4 dimensions"), "{e}");
        let e = read_init_latents(&to_safetensors_bytes(&[("noise", &t)]).unwrap()).unwrap_err();
        assert!(e.0.contains("found: noise"), "{e}");
    }
}
