//! Route handlers.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;

use super::error::{ApiError, ErrorResponse};
use super::middleware::ModelLabel;
use super::types::*;
use super::validate;
use super::AppState;
use crate::engine::{EngineState, Job, JobError, ModelSummary, SubmitError};

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { depth, retry_after_secs } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("The server is busy ({depth} jobs queued); retry after {retry_after_secs} s"),
        )
        .with_retry_after(retry_after_secs),
        SubmitError::NotReady(msg) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("Models are not ready: {msg}"))
                .with_retry_after(5)
        }
        SubmitError::UnknownModel(name) => ApiError::model_not_found(&name),
        SubmitError::WorkerGone => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "The server is shutting down")
        }
    }
}

/// Generate images from a prompt.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "images",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "Generated images (PNG, base64) with tiller metadata", body = ImagesResponse),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key (when `server.api_key` is set)", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 413, description = "Body larger than `limits.max_body_bytes`", body = ErrorResponse),
        (status = 422, description = "Invalid field; `error.param` names it (`adapters` for an adapter that does not fit the model)", body = ErrorResponse),
        (status = 429, description = "Queue full; see the Retry-After header", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 500, description = "Internal error", body = ErrorResponse),
        (status = 502, description = "An `http` reward's scorer answered badly", body = ErrorResponse),
        (status = 503, description = "Models not loaded yet", body = ErrorResponse),
        (status = 504, description = "Not finished within `limits.request_timeout_secs` (the job was cancelled), or an `http` reward's scorer timed out", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn create_image(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let mut label = None;
    let result = create_image_inner(&state, body, t0, &mut label).await;
    let mut resp = match result {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    };
    if let Some(model) = label {
        resp.extensions_mut().insert(ModelLabel(model));
    }
    resp
}

async fn create_image_inner(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    t0: Instant,
    label: &mut Option<String>,
) -> Result<ImagesResponse, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The request body exceeds {} bytes (limits.max_body_bytes)", state.limits.max_body_bytes),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("Cannot read the request body: {rej}"))
        }
    })?;
    let req = validate::parse_body(&bytes)?;
    let model = state.engine.model(req.model.as_deref()).map_err(submit_error)?;
    *label = Some(model.name.clone());
    let validated = validate::check(req, &state.limits, &model, &state.rewards, &state.adapters)?;
    let applied: Vec<AppliedAdapter> = validated
        .adapters
        .items
        .iter()
        .map(|(a, scale)| AppliedAdapter { name: a.name.clone(), scale: *scale })
        .collect();
    let params = validated.params;
    let request_seed = params.seed;
    let trace = validated.steering.trace;
    let job =
        Job { model: Some(model.name.clone()), params, steering: validated.steering, adapters: validated.adapters };
    let ticket = state.engine.submit(job).map_err(submit_error)?;
    let timeout = Duration::from_secs(state.limits.request_timeout_secs);
    // Dropping `ticket` (timeout, or this future dropped because the client went away)
    // cancels the job at its next denoising step.
    let out = match tokio::time::timeout(timeout, ticket.wait()).await {
        Ok(r) => r,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "The request did not finish within {} s (limits.request_timeout_secs) and was cancelled",
                    state.limits.request_timeout_secs
                ),
            ))
        }
    };
    let out = out.map_err(|e| match e {
        JobError::Invalid { field, message } => ApiError::invalid(&field, message),
        JobError::Upstream(msg) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "reward_upstream_error", msg).with_param("reward")
        }
        JobError::UpstreamTimeout(msg) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "reward_upstream_timeout", msg).with_param("reward")
        }
        JobError::Cancelled => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled", "The job was cancelled"),
        JobError::Failed(msg) => ApiError::internal(format!("Generation failed: {msg}")),
        JobError::WorkerGone => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "The engine stopped"),
    })?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let timings = TimingsMs {
        queue_ms: out.queue_ms,
        encode_ms: out.timings.encode_ms,
        denoise_ms: out.timings.denoise_ms,
        decode_ms: out.timings.decode_ms,
        total_ms,
    };
    let p = &out.params;
    let mut data = Vec::with_capacity(out.images.len());
    for img in &out.images {
        let optimized_noise = match &img.optimized_noise {
            Some(t) => Some(
                base64::engine::general_purpose::STANDARD.encode(
                    crate::util::tensor_io::to_safetensors_bytes(&[("latents", t)])
                        .map_err(|e| ApiError::internal(format!("cannot serialise the optimised noise: {e}")))?,
                ),
            ),
            None => None,
        };
        data.push(Image {
            b64_json: base64::engine::general_purpose::STANDARD.encode(&img.png),
            tiller: ImageMetadata {
                seed: img.seed,
                request_seed,
                model: out.model.clone(),
                width: p.width,
                height: p.height,
                steps: p.steps,
                scheduler: p.scheduler,
                guidance_scale: p.guidance_scale,
                eta: p.eta,
                denoiser_evals: out.denoiser_evals,
                prompt_truncated: out.prompt_truncated,
                timings: timings.clone(),
                steering: SteeringMetadata {
                    method: out.method.to_string(),
                    reward_name: out.reward.clone(),
                    reward: img.reward,
                    reward_evals: out.reward_evals,
                    phases: out.timings.clone(),
                    optimized_noise,
                    trace: trace.then(|| img.trace.clone()),
                },
                adapters: applied.clone(),
                adapter_variant: out.variant.map(|v| AdapterVariant {
                    merged: v.merged,
                    cached: v.cached,
                    build_ms: v.build_ms,
                }),
            },
        });
    }
    Ok(ImagesResponse { created: unix_now(), data })
}

fn model_entry(s: &ModelSummary, default: Option<&str>) -> Model {
    let info = &s.info;
    let (h, w) = info.default_size;
    let prediction = serde_json::to_value(info.scheduler.prediction_type)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Model {
        id: s.name.clone(),
        object: "model".into(),
        created: s.created,
        owned_by: "tiller".into(),
        tiller: ModelDetails {
            family: info.family.clone(),
            default: default == Some(s.name.as_str()),
            default_size: format!("{w}x{h}"),
            default_width: w,
            default_height: h,
            scheduler: s.default_scheduler,
            scheduler_class: info.scheduler.class_name.clone(),
            prediction_type: prediction,
            guidance_embedding: info.guidance_embedding,
            latent_channels: info.latent_channels,
            vae_scale_factor: info.vae_scale_factor,
            max_prompt_tokens: info.max_prompt_tokens,
        },
    }
}

/// List the loaded models.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses(
        (status = 200, description = "Loaded models (empty while loading)", body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let default = state.engine.default_model();
    let data = state.engine.models().iter().map(|s| model_entry(s, default.as_deref())).collect();
    Json(ModelList { object: "list".into(), data })
}

/// Describe one model.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "models",
    params(("model" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model", body = Model),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn get_model(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<Model>, ApiError> {
    let default = state.engine.default_model();
    state
        .engine
        .models()
        .iter()
        .find(|s| s.name == model)
        .map(|s| Json(model_entry(s, default.as_deref())))
        .ok_or_else(|| ApiError::model_not_found(&model))
}

/// List the rewards requests can steer towards.
#[utoipa::path(
    get,
    path = "/v1/rewards",
    tag = "rewards",
    responses(
        (status = 200, description = "Built-in and configured rewards", body = RewardList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn list_rewards(State(state): State<AppState>) -> Json<RewardList> {
    Json(RewardList { object: "list".into(), data: state.rewards.infos() })
}

fn health_status(state: &AppState) -> (bool, HealthStatus) {
    let models = state.engine.models().into_iter().map(|s| s.name).collect();
    match state.engine.state() {
        EngineState::Ready => (true, HealthStatus { status: "ok".into(), models, message: None }),
        EngineState::Loading => {
            (false, HealthStatus { status: "loading".into(), models, message: Some("models are loading".into()) })
        }
        EngineState::Failed(msg) => (false, HealthStatus { status: "failed".into(), models, message: Some(msg) }),
    }
}

/// Liveness: 200 while the process serves HTTP (whatever the model state).
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, description = "The server is alive; `status` tells the model state", body = HealthStatus))
)]
pub async fn health(State(state): State<AppState>) -> Json<HealthStatus> {
    Json(health_status(&state).1)
}

/// Readiness: 200 only when the models are loaded.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "health",
    responses(
        (status = 200, description = "Models loaded; requests will be served", body = HealthStatus),
        (status = 503, description = "Models loading, or loading failed", body = HealthStatus),
    )
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<HealthStatus>) {
    let (ok, body) = health_status(&state);
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or wrong admin key (when `server.admin_key` is set)", body = ErrorResponse),
    ),
    security((), ("admin_key" = []))
)]
pub async fn metrics() -> impl IntoResponse {
    let text = crate::util::metrics::prometheus().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("No route for {}", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("Method {method} is not allowed on {}", uri.path()),
    )
}
