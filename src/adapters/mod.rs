//! LoRA adapters: reading kohya and PEFT files, matching them to a model, and applying them
//! merged or unmerged without touching the base weights.
//!
//! `file` reads and validates safetensors bytes, `lora` normalises key layouts, `apply` matches
//! layers to modules and builds weight maps, `registry` keeps the adapters directory and the
//! cache of merged variants.

pub mod apply;
pub mod file;
pub mod lora;
pub mod registry;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

pub use apply::{ResolvedLayer, TargetIndex};
pub use lora::{Component, LoraFile, LoraFormat};

/// Why an adapter cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AdapterError {
    /// The file is not a well-formed safetensors LoRA (400).
    #[error("{0}")]
    Invalid(String),
    /// Keys that match no module, or shapes that do not fit (400).
    #[error("adapter does not fit the model: {0}")]
    Mismatch(String),
    /// Made for another model family (400).
    #[error("{0}")]
    WrongFamily(String),
    /// No adapter of that name (404).
    #[error("adapter `{0}` not found")]
    NotFound(String),
    /// Filesystem problems (reading the adapters root) (500 unless the path was the client's).
    #[error("{0}")]
    Io(String),
}

impl AdapterError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        AdapterError::Invalid(msg.into())
    }
}

impl From<candle_core::Error> for AdapterError {
    fn from(e: candle_core::Error) -> Self {
        AdapterError::Invalid(e.to_string())
    }
}

/// A LoRA file read from disk.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub path: PathBuf,
    pub file: LoraFile,
    /// File size in bytes.
    pub size_bytes: u64,
    /// safetensors `__metadata__` (untrusted strings).
    pub metadata: HashMap<String, String>,
}

/// What `GET /v1/adapters` shows for one adapter.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AdapterSummary {
    pub name: String,
    pub format: LoraFormat,
    /// Largest rank among the layers.
    pub rank: usize,
    /// Layers per component.
    pub components: HashMap<String, usize>,
    /// Number of adapted modules.
    pub modules: usize,
    /// Module keys as the file names them (first 50).
    pub module_keys: Vec<String>,
    pub size_bytes: u64,
    /// Path relative to the adapters root.
    pub path: String,
}

impl Adapter {
    /// Read and parse a LoRA file; `adapter_config.json` beside it (PEFT directories) supplies
    /// the scaling when present.
    pub fn load(name: &str, path: &Path) -> Result<Self, AdapterError> {
        let bytes = file::read_limited(path, file::MAX_FILE_BYTES)?;
        let size_bytes = bytes.len() as u64;
        let (tensors, metadata) = file::parse_safetensors(&bytes)?;
        let config_path = path.parent().map(|d| d.join("adapter_config.json"));
        let adapter_config = match config_path.filter(|p| p.is_file()) {
            Some(p) => {
                let text =
                    std::fs::read_to_string(&p).map_err(|e| AdapterError::Io(format!("{}: {e}", p.display())))?;
                Some(
                    serde_json::from_str(&text)
                        .map_err(|e| AdapterError::invalid(format!("{}: malformed JSON: {e}", p.display())))?,
                )
            }
            None => None,
        };
        let file = lora::parse(tensors, &metadata, &lora::ScalingSources { adapter_config })?;
        Ok(Self { name: name.to_string(), path: path.to_path_buf(), file, size_bytes, metadata })
    }

    pub fn summary(&self, root: &Path) -> AdapterSummary {
        let mut components = HashMap::new();
        for l in &self.file.layers {
            *components.entry(l.component.name().to_string()).or_insert(0) += 1;
        }
        let rel = self.path.strip_prefix(root).unwrap_or(&self.path).display().to_string();
        AdapterSummary {
            name: self.name.clone(),
            format: self.file.format,
            rank: self.file.rank(),
            components,
            modules: self.file.layers.len(),
            module_keys: self.file.layers.iter().take(50).map(|l| l.source.clone()).collect(),
            size_bytes: self.size_bytes,
            path: rel,
        }
    }
}

/// Adapters chosen for one request, with their user weights.
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    pub items: Vec<(Arc<Adapter>, f64)>,
}

impl AdapterSet {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Cache key: adapters sorted by name with their weights (bit-exact), so the same
    /// combination in any order shares one variant.
    pub fn key(&self) -> String {
        let mut parts: Vec<String> = self.items.iter().map(|(a, s)| format!("{}:{:x}", a.name, s.to_bits())).collect();
        parts.sort();
        parts.join(",")
    }
}
