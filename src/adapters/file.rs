//! Strict reading of untrusted safetensors bytes (LoRA files come from users).
//!
//! Every rule of the format is checked with its own message before any tensor is built: header
//! length within the file and under 100 MB, a JSON object header, known dtypes, byte ranges that
//! match dtype × shape, lie inside the data, neither overlap nor leave holes, and finite values.
//! Nothing here panics on any input (a fuzz target in `fuzz/` exercises it).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::AdapterError;

/// Largest header accepted (the safetensors reference limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Largest LoRA file read (LoRAs are MBs; SDXL rank-128 files stay well under this).
pub const MAX_FILE_BYTES: u64 = 2 << 30;
/// Most tensors in one file.
pub const MAX_TENSORS: usize = 100_000;

/// Read a file of at most `max` bytes.
pub fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, AdapterError> {
    let meta = std::fs::metadata(path).map_err(|e| AdapterError::Io(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(AdapterError::invalid(format!("{}: not a regular file", path.display())));
    }
    if meta.len() > max {
        return Err(AdapterError::invalid(format!(
            "{}: {} bytes is over the {max}-byte limit",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| AdapterError::Io(format!("{}: {e}", path.display())))
}

struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn dtype_of(s: &str) -> Option<(DType, usize)> {
    Some(match s {
        "F16" => (DType::F16, 2),
        "BF16" => (DType::BF16, 2),
        "F32" => (DType::F32, 4),
        "F64" => (DType::F64, 8),
        _ => return None,
    })
}

/// Parse and validate safetensors bytes into CPU tensors (kept in their dtype) and the
/// `__metadata__` map.
#[allow(clippy::type_complexity)]
pub fn parse_safetensors(bytes: &[u8]) -> Result<(HashMap<String, Tensor>, HashMap<String, String>), AdapterError> {
    let bad = |m: String| Err(AdapterError::Invalid(format!("malformed safetensors file: {m}")));
    let len = bytes.len() as u64;
    if len < 8 {
        return bad(format!("{len} bytes is too short to hold the 8-byte header length (truncated file?)"));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return bad(format!("header length {n} is over the {MAX_HEADER_BYTES}-byte limit"));
    }
    if n > len - 8 {
        return bad(format!("header length {n} runs past the end of the {len}-byte file (truncated file?)"));
    }
    let header_end = 8 + n as usize;
    let header = match std::str::from_utf8(&bytes[8..header_end]) {
        Ok(s) => s,
        Err(e) => return bad(format!("header is not UTF-8: {e}")),
    };
    let json: serde_json::Value = match serde_json::from_str(header.trim_end_matches(' ')) {
        Ok(v) => v,
        Err(e) => return bad(format!("header is not valid JSON: {e}")),
    };
    let Some(obj) = json.as_object() else { return bad("header must be a JSON object".into()) };
    if obj.len() > MAX_TENSORS + 1 {
        return bad(format!("{} header entries is over the {MAX_TENSORS} limit", obj.len()));
    }
    let data = &bytes[header_end..];
    let mut metadata = HashMap::new();
    let mut entries = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            let Some(m) = v.as_object() else { return bad("`__metadata__` must be an object of strings".into()) };
            for (k, x) in m {
                let Some(s) = x.as_str() else { return bad(format!("`__metadata__.{k}` must be a string")) };
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let info = match v.as_object() {
            Some(o) => o,
            None => return bad(format!("tensor `{name}`: entry must be an object")),
        };
        let dt = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let Some((dtype, size)) = dtype_of(dt) else {
            return bad(format!("tensor `{name}`: dtype `{dt}` is not a float type LoRAs use (F16, BF16, F32, F64)"));
        };
        let shape: Option<Vec<usize>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect());
        let Some(shape) = shape else {
            return bad(format!("tensor `{name}`: `shape` must be a list of non-negative integers"));
        };
        let offsets: Option<Vec<u64>> =
            info.get("data_offsets").and_then(|s| s.as_array()).and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let Some([begin, end]) = offsets.as_deref().and_then(|o| <[u64; 2]>::try_from(o).ok()) else {
            return bad(format!("tensor `{name}`: `data_offsets` must be [begin, end]"));
        };
        if begin > end || end > data.len() as u64 {
            return bad(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] lie outside the {}-byte data section",
                data.len()
            ));
        }
        // Tensors store strides (products of trailing dimensions) even when a zero dimension
        // makes them empty: the product of the non-zero dimensions must fit too, or building
        // the tensor overflows.
        let extent = shape.iter().try_fold(size as u64, |acc, &d| acc.checked_mul(d.max(1) as u64));
        if extent.is_none() {
            return bad(format!(
                "tensor `{name}`: shape {shape:?} is too large (its dimensions multiply to more than 2^64)"
            ));
        }
        let needed = shape.iter().try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
        if needed != Some(end - begin) {
            return bad(format!(
                "tensor `{name}`: dtype {dt} with shape {shape:?} needs {} bytes but data_offsets give {}",
                needed.map(|n| n.to_string()).unwrap_or_else(|| "more than 2^64".into()),
                end - begin
            ));
        }
        entries.push(Entry { name: name.clone(), dtype, shape, begin: begin as usize, end: end as usize });
    }
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut covered = 0usize;
    for (i, e) in entries.iter().enumerate() {
        if e.begin < covered {
            let prev = &entries[i - 1];
            return bad(format!("tensors `{}` and `{}` overlap (bytes {}..{})", prev.name, e.name, e.begin, covered));
        }
        if e.begin > covered {
            return bad(format!("bytes {covered}..{} of the data section belong to no tensor", e.begin));
        }
        covered = e.end;
    }
    if covered != data.len() {
        return bad(format!("bytes {covered}..{} of the data section belong to no tensor", data.len()));
    }
    let mut tensors = HashMap::with_capacity(entries.len());
    for e in entries {
        let t = Tensor::from_raw_buffer(&data[e.begin..e.end], e.dtype, &e.shape, &Device::Cpu)?;
        let finite = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.iter().all(|v| v.is_finite());
        if !finite {
            return Err(AdapterError::Invalid(format!("tensor `{}` contains NaN or infinite values", e.name)));
        }
        tensors.insert(e.name, t);
    }
    Ok((tensors, metadata))
}
