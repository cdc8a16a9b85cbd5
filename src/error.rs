//! Errors shared across the crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TillerError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid value for {0}")]
    InvalidField(FieldError),
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
        TillerError::InvalidField(FieldError::invalid(field, message))
    }
}

impl From<FieldError> for TillerError {
    fn from(e: FieldError) -> Self {
        TillerError::InvalidField(e)
    }
}

pub type Result<T, E = TillerError> = std::result::Result<T, E>;

/// What went wrong with a JSON document, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Path of the field at fault (`steering.particles`, `adapters[0].name`); empty for the
    /// document itself.
    pub field: String,
    pub kind: FieldErrorKind,
    /// Readable explanation, naming the field.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// Not JSON at all (syntax error, truncated).
    Syntax,
    /// A key the type does not have.
    Unknown,
    /// A required key is absent.
    Missing,
    /// A value of the wrong JSON type.
    WrongType,
    /// The right type, a value outside what is allowed.
    InvalidValue,
}

impl FieldErrorKind {
    /// The OpenAI-style error `code`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Syntax => "invalid_json",
            Self::Unknown => "unknown_parameter",
            Self::Missing => "missing_required_parameter",
            Self::WrongType => "invalid_type",
            Self::InvalidValue => "invalid_value",
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::error::Error for FieldError {}

impl FieldError {
    /// A value outside what is allowed.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), kind: FieldErrorKind::InvalidValue, message: message.into() }
    }

    /// The same error at `prefix.field` (a strategy's own field inside `steering`).
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() { prefix.to_string() } else { format!("{prefix}.{}", self.field) };
        self
    }

    /// The message, led by the field's name unless it already names it.
    pub fn text(&self) -> String {
        if self.field.is_empty() || self.message.contains(&format!("`{}`", self.field)) {
            self.message.clone()
        } else {
            format!("`{}`: {}", self.field, self.message)
        }
    }
}
