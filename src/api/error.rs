//! Errors in the OpenAI error shape:
//! `{"error": {"message": "...", "type": "...", "param": "<field>" | null, "code": "..." | null}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The error envelope every non-2xx response carries.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Human-readable explanation.
    pub message: String,
    /// `invalid_request_error` for 4xx, `server_error` for 5xx, as OpenAI does.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `invalid_value`, `model_not_found`, `queue_full`.
    pub code: Option<String>,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: &'static str,
    pub retry_after: Option<u64>,
    /// Send `x-should-retry: false`: a retry would only repeat the failure (the `openai` client
    /// retries 5xx twice by default).
    pub no_retry: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code, retry_after: None, no_retry: false }
    }

    /// 400 naming the field (OpenAI answers every invalid parameter with 400
    /// `invalid_request_error`, which its client raises as `BadRequestError`).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::from(crate::error::FieldError::invalid(param, message))
    }

    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("The model `{name}` does not exist; GET /v1/models lists the available models"),
        )
        .with_param("model")
    }

    /// An adapter problem: 404 for an unknown name, 500 for filesystem trouble, else 400; all
    /// naming `param`.
    pub fn adapter(e: crate::adapters::AdapterError, param: &str) -> Self {
        use crate::adapters::AdapterError as E;
        match e {
            E::NotFound(name) => Self::new(
                StatusCode::NOT_FOUND,
                "adapter_not_found",
                format!("The adapter `{name}` does not exist; GET /v1/adapters lists the registered adapters"),
            )
            .with_param(param),
            E::Io(msg) => Self::internal(msg).with_param(param),
            e @ (E::Invalid(_) | E::Mismatch(_) | E::WrongFamily(_)) => Self::invalid(param, e.to_string()),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn body(&self) -> ErrorResponse {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: kind.to_string(),
                param: self.param.clone(),
                code: Some(self.code.to_string()),
            },
        }
    }
}

/// The one conversion of a parse error into the API's answer: 400, `param` = the field path.
impl From<crate::util::json::FieldError> for ApiError {
    fn from(e: crate::util::json::FieldError) -> Self {
        let message = match e.kind {
            crate::util::json::FieldErrorKind::Syntax => format!("The request body is {}", e.message),
            _ => e.text(),
        };
        let err = Self::new(StatusCode::BAD_REQUEST, e.kind.code(), message);
        if e.field.is_empty() {
            err
        } else {
            err.with_param(&e.field)
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.no_retry {
            resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}
