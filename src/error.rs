//! Errors shared across the crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TillerError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid value for `{field}`: {message}")]
    InvalidField { field: String, message: String },
    #[error("model `{0}` not found")]
    ModelNotFound(String),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl TillerError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TillerError::File { path: path.into(), message: message.into() }
    }
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        TillerError::InvalidField { field: field.into(), message: message.into() }
    }
}

pub type Result<T, E = TillerError> = std::result::Result<T, E>;
