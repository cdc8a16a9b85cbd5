//! Asynchronous jobs: `POST /v1/jobs` takes a generation request and answers 202 at once;
//! `GET /v1/jobs/{id}` reports status, progress and the result; `GET /v1/jobs/{id}/events`
//! streams the job's events (resumable with `Last-Event-ID`); `DELETE /v1/jobs/{id}` cancels.
//!
//! Ids are unguessable. A finished job stays readable for `jobs.ttl_secs`, then it is gone
//! (404). `Idempotency-Key` on POST returns the job first created with that key and the same
//! body (400 for the same key with another body); keys are scoped by the caller's API key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorResponse};
use super::handlers::{job_error, metadata, prepare, submit_error, Prepared};
use super::types::{Image, ImagesResponse};
use super::AppState;
use crate::engine::{JobEvent, JobHandle, JobStatus};

struct Entry {
    handle: Arc<JobHandle>,
    prepared: Arc<Prepared>,
}

/// The jobs the server knows, by id, and the idempotency keys that name them.
pub struct JobStore {
    ttl: Duration,
    max_jobs: usize,
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    jobs: HashMap<String, Entry>,
    /// (scope, key) → (body fingerprint, job id).
    keys: HashMap<(u64, String), (u64, String)>,
}

impl JobStore {
    pub fn new(ttl: Duration, max_jobs: usize) -> Self {
        Self { ttl, max_jobs: max_jobs.max(1), inner: Mutex::new(StoreInner::default()) }
    }

    /// Forget finished jobs older than the TTL (and their keys).
    fn sweep(&self, s: &mut StoreInner) {
        let ttl = self.ttl;
        s.jobs.retain(|_, e| e.handle.finished_at().is_none_or(|t| t.elapsed() < ttl));
        let jobs = &s.jobs;
        s.keys.retain(|_, (_, id)| jobs.contains_key(id));
    }

    fn get(&self, id: &str) -> Option<(Arc<JobHandle>, Arc<Prepared>)> {
        let mut s = self.inner.lock().unwrap();
        self.sweep(&mut s);
        s.jobs.get(id).map(|e| (e.handle.clone(), e.prepared.clone()))
    }
}

/// Job status and, once there, its result or error.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobInfo {
    pub id: String,
    /// Always `job`.
    pub object: String,
    pub status: JobStatus,
    /// Unix seconds at submission.
    pub created: u64,
    /// The last finished step and the total (ReNO: iterations); absent before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// Where the events stream is.
    pub events_url: String,
    /// The images, as `POST /v1/images/generations` answers them, once `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ImagesResponse>,
    /// Why the job failed, once `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobProgress {
    pub step: usize,
    pub total: usize,
}

fn info(handle: &JobHandle, p: &Prepared) -> Result<JobInfo, ApiError> {
    let status = handle.status();
    let (mut result, mut error) = (None, None);
    match handle.outcome() {
        Some(JobEvent::Completed(out)) => {
            let total_ms = handle.finished_at().map(|t| t.duration_since(handle.submitted)).unwrap_or_default();
            let total_ms = total_ms.as_secs_f64() * 1e3;
            let mut data = Vec::with_capacity(out.images.len());
            for img in &out.images {
                data.push(Image {
                    b64_json: base64::engine::general_purpose::STANDARD.encode(&img.encoded),
                    tiller: metadata(p, &out, img, total_ms)?,
                });
            }
            result = Some(ImagesResponse { created: handle.created, data });
        }
        Some(JobEvent::Failed(e)) => error = Some(job_error(e).body().error),
        Some(JobEvent::Cancelled) => error = Some(job_error(crate::engine::JobError::Cancelled).body().error),
        _ => {}
    }
    Ok(JobInfo {
        id: handle.id.clone(),
        object: "job".into(),
        status,
        created: handle.created,
        progress: handle.progress().map(|(step, total)| JobProgress { step, total }),
        events_url: format!("/v1/jobs/{}/events", handle.id),
        result,
        error,
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "job_not_found",
        format!("No job `{id}`: it never existed, or it finished more than jobs.ttl_secs ago"),
    )
    .with_param("id")
}

/// FNV-1a, for scoping keys by API key and fingerprinting bodies (not a security boundary:
/// the job id itself is the secret).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Submit a generation job.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = super::types::ImageGenerationRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Return the job created earlier with this key and the same body (keys last as long as their job)")),
    responses(
        (status = 202, description = "Accepted; poll `GET /v1/jobs/{id}` or follow `events_url`", body = JobInfo,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "An earlier job with the same Idempotency-Key and body", body = JobInfo),
        (status = 400, description = "Malformed JSON, an invalid, unknown or missing field (`error.param` names its path), a malformed Idempotency-Key, or one reused with another body", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 413, description = "Body larger than `limits.max_body_bytes`", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse),
        (status = 503, description = "Models not loaded yet, or shutting down", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn create_job(
    State(state): State<AppState>,
    id: Option<axum::Extension<super::middleware::RequestId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match create_job_inner(&state, &headers, body, id.map(|i| i.0 .0)) {
        Ok((status, info)) => {
            let mut resp = (status, Json(&info)).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", info.id)) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

fn create_job_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    request_id: Option<String>,
) -> Result<(StatusCode, JobInfo), ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .map(|s| s.trim().trim_matches('"').to_string())
                .filter(|s| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic()));
            Some(k.ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
                .with_param("Idempotency-Key")
            })?)
        }
    };
    let bytes = body.map_err(|rej| super::handlers::body_error(rej, state.limits.max_body_bytes))?;
    let fingerprint = fnv(&bytes);
    let scope = fnv(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default());
    let store = &state.jobs;
    // One lock from the key lookup to the insertion: two concurrent requests with the same key
    // cannot both create a job. Nothing in between waits (validation and submission return at
    // once), and nothing that holds the engine's locks takes this one.
    let mut s = store.inner.lock().unwrap();
    store.sweep(&mut s);
    if let Some(k) = &key {
        if let Some((fp, id)) = s.keys.get(&(scope, k.clone())) {
            if *fp != fingerprint {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "This Idempotency-Key was used with a different request body; use a new key",
                ));
            }
            if let Some(e) = s.jobs.get(id) {
                return Ok((StatusCode::OK, info(&e.handle, &e.prepared)?));
            }
        }
    }
    let mut label = None;
    let prepared = prepare(state, Ok(bytes), request_id, &mut label)?;
    {
        if s.jobs.len() >= store.max_jobs {
            // Make room by dropping the oldest finished job; refuse if all are unfinished.
            let oldest = s
                .jobs
                .iter()
                .filter(|(_, e)| e.handle.finished_at().is_some())
                .min_by_key(|(_, e)| e.handle.seq)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => {
                    s.jobs.remove(&id);
                }
                None => {
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_jobs",
                        format!("{} jobs are unfinished (jobs.max_jobs); retry later", s.jobs.len()),
                    )
                    .with_retry_after(state.engine.retry_after_secs()))
                }
            }
        }
    }
    let handle = state.engine.submit(prepared.job.clone()).map_err(|e| submit_error(e, &state.engine))?;
    // A job has no client waiting on it, but still a deadline: limits.request_timeout_secs.
    let (watch, timeout) = (handle.clone(), Duration::from_secs(state.limits.request_timeout_secs));
    let engine = state.engine.clone();
    tokio::spawn(async move {
        if tokio::time::timeout(timeout, watch.wait()).await.is_err() {
            engine.cancel(&watch);
        }
    });
    let prepared = Arc::new(prepared);
    let out = info(&handle, &prepared)?;
    if let Some(k) = key {
        s.keys.insert((scope, k), (fingerprint, handle.id.clone()));
    }
    s.jobs.insert(handle.id.clone(), Entry { handle, prepared });
    Ok((StatusCode::ACCEPTED, out))
}

/// A job's status, progress and result.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id from POST /v1/jobs")),
    responses(
        (status = 200, description = "The job", body = JobInfo),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown or expired job", body = ErrorResponse),
        (status = 414, description = "URI longer than 8192 bytes", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<JobInfo>, ApiError> {
    // Encoding the result happens after the store's lock is released.
    let (handle, prepared) = state.jobs.get(&id).ok_or_else(|| not_found(&id))?;
    Ok(Json(info(&handle, &prepared)?))
}

/// Cancel a job: a queued job never starts, a running one stops before its next denoiser call.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled (or cancelling: `status` turns `cancelled` within one step)", body = JobInfo),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown or expired job", body = ErrorResponse),
        (status = 414, description = "URI longer than 8192 bytes", body = ErrorResponse),
        (status = 409, description = "The job already finished", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn delete_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<JobInfo>, ApiError> {
    let (handle, prepared) = state.jobs.get(&id).ok_or_else(|| not_found(&id))?;
    match handle.status() {
        JobStatus::Succeeded | JobStatus::Failed => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_finished",
                format!("Job `{id}` already finished ({:?}); nothing to cancel", handle.status()),
            )
            .no_retry())
        }
        _ => state.engine.cancel(&handle),
    }
    Ok(Json(info(&handle, &prepared)?))
}

/// A job's events as Server-Sent Events.
///
/// Each event has an `id:` (its position in the job's log); reconnecting with `Last-Event-ID`
/// resumes after it. Events: `tiller.queued`, `tiller.started`, `tiller.progress` (`step`,
/// `total`), `image_generation.partial_image`, `image_generation.completed` (one per image),
/// `tiller.cancelled`, `error`. The stream ends after the last of them.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "text/event-stream of the job's events", content_type = "text/event-stream", body = super::types::SseEvent),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown or expired job", body = ErrorResponse),
        (status = 414, description = "URI longer than 8192 bytes", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn job_events(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some((handle, prepared)) = state.jobs.get(&id) else { return not_found(&id).into_response() };
    // Ids are `POSITION` for a log position that makes one SSE event and `POSITION.I` for the
    // I-th of several (one `completed` event per image): resume after exactly that one.
    let (from, skip) = match headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::trim) {
        None | Some("") => (0, 0),
        Some(v) => match v.split_once('.') {
            None => (v.parse::<usize>().map(|p| p + 1).unwrap_or(0), 0),
            Some((p, i)) => match (p.parse::<usize>(), i.parse::<usize>()) {
                (Ok(p), Ok(i)) => (p, i + 1),
                _ => (0, 0),
            },
        },
    };
    let size = format!("{}x{}", prepared.job.params.width.unwrap_or(0), prepared.job.params.height.unwrap_or(0));
    let t0 = handle.submitted;
    let tokens = prepared.job.params.prompt.split_whitespace().count() as u64;
    let timeout = Duration::from_secs(state.limits.request_timeout_secs.saturating_add(60));
    let events = super::stream::follow(
        handle,
        from,
        skip,
        timeout,
        None,
        super::handlers::timeout_error(&state),
        move |pos, ev| {
            let own = |name: &str, data: serde_json::Value| vec![Event::default().event(name).data(data.to_string())];
            let mut out = match ev {
                JobEvent::Queued => own("tiller.queued", serde_json::json!({"type": "tiller.queued"})),
                JobEvent::Started => own("tiller.started", serde_json::json!({"type": "tiller.started"})),
                JobEvent::Cancelled => own("tiller.cancelled", serde_json::json!({"type": "tiller.cancelled"})),
                other => super::stream::openai_events(&prepared, other, t0, &size, tokens, true, None),
            };
            let several = out.len() > 1;
            for (i, e) in out.iter_mut().enumerate() {
                let id = if several { format!("{pos}.{i}") } else { pos.to_string() };
                *e = std::mem::take(e).id(id);
            }
            out
        },
    );
    Sse::new(events).keep_alive(KeepAlive::new()).into_response()
}

/// The store a server starts with, from `[jobs]`.
pub fn store(config: &crate::config::JobsConfig) -> Arc<JobStore> {
    Arc::new(JobStore::new(Duration::from_secs(config.ttl_secs), config.max_jobs))
}
