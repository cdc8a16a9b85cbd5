//! Request metrics and bearer-token checks.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::util::metrics as m;

/// Response extension naming the model a request used (the `model` label of request metrics).
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// The request's id: the client's `x-request-id` when it is a sensible one (1–128 visible
/// ASCII characters), else a new random one. Handlers read it from the request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub const REQUEST_ID: &str = "x-request-id";

/// Longest request URI (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8192;

fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let bytes: [u8; 12] = rand::random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        })
}

/// Give every request an id (accepted or generated), echo it in the response, run the handler
/// inside a span that carries it (so every log line of the request names it), and write one
/// access-log line per request (target `tiller::access`).
pub async fn request_context(mut req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = request_id(&req);
    // No route takes a long URI. Refusing above MAX_URI_BYTES gives an OpenAI-shaped 414 for
    // every URI that reaches the server (past 64 KiB the HTTP library answers 414 on its own,
    // without a body).
    let uri_len = req.uri().to_string().len();
    if uri_len > MAX_URI_BYTES {
        let mut resp = ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("The request URI has {uri_len} bytes; at most {MAX_URI_BYTES} are accepted"),
        )
        .into_response();
        if let Ok(v) = header::HeaderValue::from_str(&id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        return resp;
    }
    req.extensions_mut().insert(RequestId(id.clone()));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = Instant::now();
    let span = tracing::info_span!("request", request_id = %id);
    let mut resp = next.run(req).instrument(span.clone()).await;
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let _enter = span.enter();
    tracing::info!(
        target: "tiller::access",
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        ms = format!("{:.1}", t0.elapsed().as_secs_f64() * 1e3),
        "{method} {path} {}",
        resp.status().as_u16()
    );
    resp
}

/// The CORS layer for `server.cors_origins` (none when empty).
pub fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| header::HeaderValue::from_str(o).ok()))
    };
    Some(CorsLayer::new().allow_origin(allow).allow_methods(Any).allow_headers(Any).expose_headers([
        header::RETRY_AFTER,
        header::HeaderName::from_static(REQUEST_ID),
        header::LOCATION,
    ]))
}

/// Count requests and record their latency by route, method, status and model.
pub async fn record_metrics(req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let model = resp.extensions().get::<ModelLabel>().map(|m| m.0.clone()).unwrap_or_default();
    let labels = [("route", route), ("method", method), ("status", status), ("model", model)];
    metrics::counter!(m::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(m::HTTP_DURATION, &labels).record(t0.elapsed().as_secs_f64());
    resp
}

/// POST bodies are JSON: a missing or other `Content-Type` is 415 (an OpenAI-shaped error),
/// not parsed on a guess.
pub async fn require_json(req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "The request body must be JSON: send `Content-Type: application/json`",
        )
        .into_response()
    }
}

fn bearer_ok(req: &Request, key: &str) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| constant_time_eq(token.trim().as_bytes(), key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(what: &str) -> Response {
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        format!("Missing or incorrect {what}; send `Authorization: Bearer <key>`"),
    )
    .into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

/// `/v1/*`: require `server.api_key` when configured.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match &state.api_key {
        Some(key) if !bearer_ok(&req, key) => unauthorized("API key"),
        _ => next.run(req).await,
    }
}

/// `/metrics`: require `server.admin_key` when configured.
pub async fn require_admin_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match &state.admin_key {
        Some(key) if !bearer_ok(&req, key) => unauthorized("admin key"),
        _ => next.run(req).await,
    }
}

/// `POST /v1/adapters`, `DELETE /v1/adapters/{name}`: `server.admin_key` when configured, else
/// `server.api_key` when configured (so that setting only an API key does not leave adapter
/// management open), else open like the rest of the server.
pub async fn require_manage_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match (&state.admin_key, &state.api_key) {
        (Some(key), _) if !bearer_ok(&req, key) => unauthorized("admin key"),
        (None, Some(key)) if !bearer_ok(&req, key) => unauthorized("API key"),
        _ => next.run(req).await,
    }
}
