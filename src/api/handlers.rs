//! Route handlers.

use std::time::{Duration, Instant};

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
use crate::engine::{
    CancelOnDrop, EngineState, GeneratedImage, Job, JobError, JobEvent, JobOutput, ModelSummary, SubmitError,
};

use crate::util::unix_now;

pub(crate) fn submit_error(e: SubmitError, engine: &crate::engine::Engine) -> ApiError {
    match e {
        SubmitError::QueueFull { depth, retry_after_secs } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("The server is busy ({depth} jobs queued); retry after {retry_after_secs} s"),
        )
        .with_retry_after(retry_after_secs),
        SubmitError::TooLarge { needed_mib, budget_mib, field } => ApiError::new(
            StatusCode::BAD_REQUEST,
            "insufficient_memory",
            format!(
                "This request would need about {needed_mib} MiB, more than the server's memory budget of \
                 {budget_mib} MiB (limits.memory_budget_mib); ask for a smaller size, fewer images or fewer \
                 particles"
            ),
        )
        .with_param(field)
        .no_retry(),
        SubmitError::NotReady(msg) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("Models are not ready: {msg}"))
                .with_retry_after(5)
        }
        SubmitError::UnknownModel(name) => ApiError::model_not_found(&name),
        SubmitError::ShuttingDown => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "The server is shutting down")
                .with_retry_after(engine.retry_after_secs().max(5))
        }
    }
}

pub(crate) fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Invalid(f) => ApiError::from(f),
        JobError::Upstream(msg) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "reward_upstream_error", msg).with_param("reward")
        }
        JobError::UpstreamTimeout(msg) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "reward_upstream_timeout", msg).with_param("reward")
        }
        JobError::Cancelled => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled", "The job was cancelled").no_retry()
        }
        // A retry would run the same inputs into the same failure.
        JobError::Failed(msg) => ApiError::internal(format!("Generation failed: {msg}")).no_retry(),
        JobError::WorkerGone => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "The engine stopped"),
    }
}

/// A validated request, ready for the engine, with what the answer needs to describe it.
pub(crate) struct Prepared {
    pub job: Job,
    pub applied: Vec<AppliedAdapter>,
    pub request_seed: u64,
    pub trace: bool,
    pub stream: bool,
    pub stream_progress: bool,
    /// Names the stream's events: `image_generation` (`.partial_image`, `.completed`) or
    /// `image_edit`, as OpenAI's two endpoints do.
    pub event_prefix: &'static str,
    /// The experiment and arm the request joined.
    pub experiment: Option<super::experiments::Joined>,
}

/// Parse and validate a generation body (400/413/404 as the fields say); `label` gets the
/// model's name as soon as it is known (the `model` label of request metrics).
pub(crate) fn prepare(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    request_id: Option<String>,
    label: &mut Option<String>,
) -> Result<Prepared, ApiError> {
    let bytes = body.map_err(|rej| body_error(rej, state.limits.max_body_bytes))?;
    let req = validate::parse_body(&bytes)?;
    if req.experiment.is_some() || req.arm.is_some() {
        return Err(ApiError::invalid(
            "experiment",
            "experiments take requests on POST /v1/images/generations (not /v1/jobs) for now",
        ));
    }
    prepare_parsed(state, req, None, request_id, label)
}

/// Validate a parsed request, with an edit's files when it came from `/v1/images/edits`.
pub(crate) fn prepare_parsed(
    state: &AppState,
    mut req: crate::api::types::ImageGenerationRequest,
    edit: Option<super::edits::EditForm>,
    request_id: Option<String>,
    label: &mut Option<String>,
) -> Result<Prepared, ApiError> {
    let model = state.engine.model(req.model.as_deref()).map_err(|e| submit_error(e, &state.engine))?;
    *label = Some(model.name.clone());
    let stream = req.stream.unwrap_or(false);
    let stream_progress = req.stream_progress.unwrap_or(false);
    let inpainting_only = |param: &str, what: &str| {
        ApiError::invalid(
            param,
            format!("`{}` is an inpainting model: it edits an image where a mask says; {what}", model.name),
        )
    };
    if model.info.inpainting && edit.is_none() {
        return Err(inpainting_only("model", "use /v1/images/edits with an `image` and a `mask`"));
    }
    let decoded = match &edit {
        None => None,
        Some(form) => {
            let size = req.size.as_deref().map(validate::parse_size).transpose()?.flatten();
            let d = form.decode(model.info.size_multiple(), size)?;
            if model.info.inpainting && d.input.mask.is_none() {
                return Err(inpainting_only("mask", "send a `mask` (or an image with transparency)"));
            }
            // The image's own size unless the request names one; checked like any size.
            req.size = Some(format!("{}x{}", d.width, d.height));
            Some(d)
        }
    };
    let mut validated = validate::check(req, &state.limits, &model, &state.rewards, &state.adapters)?;
    if let Some(d) = decoded {
        let steps = crate::steering::resolve(&model.info, &validated.params, &validated.steering.spec).steps;
        if crate::sampling::edit_start(steps, d.input.strength).is_none() {
            return Err(ApiError::invalid(
                "strength",
                format!(
                    "`strength` {} runs ⌊strength × steps⌋ = 0 of the {steps} steps; raise `strength` or `steps`",
                    d.input.strength
                ),
            ));
        }
        validated.params.edit = Some(d.input);
    }
    let applied: Vec<AppliedAdapter> = validated
        .adapters
        .items
        .iter()
        .map(|(a, scale)| AppliedAdapter { name: a.name.clone(), scale: *scale })
        .collect();
    let request_seed = validated.params.seed;
    let trace = validated.steering.trace;
    let job = Job {
        model: Some(model.name.clone()),
        params: validated.params,
        steering: validated.steering,
        adapters: validated.adapters,
        partial_images: if stream { validated.partial_images } else { 0 },
        request_id,
        encoding: validated.encoding,
        metrics: Default::default(),
    };
    let event_prefix = if edit.is_some() { "image_edit" } else { "image_generation" };
    Ok(Prepared { job, applied, request_seed, trace, stream, stream_progress, event_prefix, experiment: None })
}

pub(crate) fn body_error(rej: BytesRejection, limit: usize) -> ApiError {
    if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The request body exceeds {limit} bytes (limits.max_body_bytes)"),
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("Cannot read the request body: {rej}"))
    }
}

/// Generate images from a prompt.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "images",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "Generated images (PNG, base64) with tiller metadata; with `stream: true`, \
            a `text/event-stream` of `image_generation.partial_image` and `image_generation.completed` events \
            (an `error` event if the job fails after the stream started)", body = ImagesResponse,
            content((ImagesResponse = "application/json"), (SseEvent = "text/event-stream"))),
        (status = 400, description = "Malformed JSON, or an invalid, unknown or missing field: `error.param` names its path (`steering.particles`, `adapters[0].scale`; `adapters` for an adapter that does not fit the model), `error.code` says what is wrong (`invalid_type`, `invalid_value`, `unknown_parameter`, `missing_required_parameter`, `insufficient_memory` when the request would exceed `limits.memory_budget_mib`)", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key (when `server.api_key` is set)", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 413, description = "Body larger than `limits.max_body_bytes`", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 429, description = "Queue full; see the Retry-After header", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 500, description = "Internal error", body = ErrorResponse),
        (status = 502, description = "An `http` reward's scorer answered badly", body = ErrorResponse),
        (status = 503, description = "Models not loaded yet, or the server is shutting down", body = ErrorResponse),
        (status = 504, description = "Not finished within `limits.request_timeout_secs` (the job was cancelled), or an `http` reward's scorer timed out", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn create_image(
    State(state): State<AppState>,
    id: Option<axum::Extension<super::middleware::RequestId>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let mut label = None;
    let prepared = async {
        let bytes = body.map_err(|rej| body_error(rej, state.limits.max_body_bytes))?;
        let req = validate::parse_body(&bytes)?;
        super::experiments::prepare_request(&state, req, id.map(|i| i.0 .0), &mut label).await
    }
    .await;
    respond(state, prepared, t0, label).await
}

/// Run a prepared image request and answer: an event stream with `stream: true`, else the
/// images; the response carries the model's name for the request metrics.
pub(crate) async fn respond(
    state: AppState,
    prepared: Result<Prepared, ApiError>,
    t0: Instant,
    label: Option<String>,
) -> Response {
    let mut resp = match prepared {
        Err(e) => e.into_response(),
        Ok(p) if p.stream => super::stream::images_stream(state, p, t0).await,
        Ok(p) => match create_image_inner(&state, p, t0).await {
            Ok(r) => Json(r).into_response(),
            Err(e) => e.into_response(),
        },
    };
    if let Some(model) = label {
        resp.extensions_mut().insert(ModelLabel(model));
    }
    resp
}

pub(crate) async fn create_image_inner(state: &AppState, p: Prepared, t0: Instant) -> Result<ImagesResponse, ApiError> {
    let handle = state.engine.submit(p.job.clone()).map_err(|e| submit_error(e, &state.engine))?;
    // Dropping the guard (timeout, or this future dropped because the client went away)
    // cancels the job before its next denoiser call.
    let _guard = CancelOnDrop(handle.clone());
    let timeout = Duration::from_secs(state.limits.request_timeout_secs);
    let outcome = match tokio::time::timeout(timeout, handle.wait()).await {
        Ok(ev) => ev,
        Err(_) => return Err(timeout_error(state)),
    };
    let out = match outcome {
        JobEvent::Completed(out) => out,
        JobEvent::Failed(e) => return Err(job_error(e)),
        _ => return Err(job_error(JobError::Cancelled)),
    };
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut data = Vec::with_capacity(out.images.len());
    for img in &out.images {
        data.push(Image {
            b64_json: base64::engine::general_purpose::STANDARD.encode(&img.encoded),
            tiller: metadata(&p, &out, img, total_ms)?,
        });
    }
    // An experiment's images are recorded (committed) before the answer: what was answered is
    // in the results.
    if let Some(joined) = &p.experiment {
        super::experiments::record(state, joined, &p, &out, &mut data, total_ms).await?;
    }
    Ok(ImagesResponse { created: unix_now(), data })
}

pub(crate) fn timeout_error(state: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!(
            "The request did not finish within {} s (limits.request_timeout_secs) and was cancelled",
            state.limits.request_timeout_secs
        ),
    )
    // The same request would take as long again.
    .no_retry()
}

/// The tiller metadata of one image of a finished job.
pub(crate) fn metadata(
    p: &Prepared,
    out: &JobOutput,
    img: &GeneratedImage,
    total_ms: f64,
) -> Result<ImageMetadata, ApiError> {
    let optimized_noise = match &img.optimized_noise {
        Some(t) => Some(
            base64::engine::general_purpose::STANDARD.encode(
                crate::util::tensor_io::to_safetensors_bytes(&[("latents", t)])
                    .map_err(|e| ApiError::internal(format!("cannot serialise the optimised noise: {e}")))?,
            ),
        ),
        None => None,
    };
    let r = &out.params;
    Ok(ImageMetadata {
        seed: img.seed,
        request_seed: p.request_seed,
        model: out.model.clone(),
        width: r.width,
        height: r.height,
        steps: r.steps,
        scheduler: r.scheduler,
        guidance_scale: r.guidance_scale,
        eta: r.eta,
        denoiser_evals: out.denoiser_evals,
        prompt_truncated: out.prompt_truncated,
        timings: TimingsMs {
            queue_ms: out.queue_ms,
            encode_ms: out.timings.encode_ms,
            denoise_ms: out.timings.denoise_ms,
            decode_ms: out.timings.decode_ms,
            total_ms,
        },
        steering: SteeringMetadata {
            method: out.method.to_string(),
            reward_name: out.reward.clone(),
            reward: img.reward,
            reward_evals: out.reward_evals,
            backward_evals: out.backward_evals,
            phases: out.timings.clone(),
            optimized_noise,
            trace: p.trace.then(|| img.trace.clone()),
        },
        adapters: p.applied.clone(),
        adapter_variant: out.variant.as_ref().map(|v| AdapterVariant {
            merged: v.merged,
            cached: v.cached,
            build_ms: v.build_ms,
        }),
        experiment: p
            .experiment
            .as_ref()
            .map(|j| crate::api::types::ExperimentTag { name: j.name.clone(), arm: j.arm.clone() }),
        image_id: None,
        metrics: img.metrics.iter().cloned().collect(),
    })
}

fn model_entry(s: &ModelSummary, default: Option<&str>) -> Model {
    let info = &s.info;
    let (h, w) = info.default_size;
    let prediction = info.scheduler.prediction_name().to_string();
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
            scheduler_class: info.scheduler.class_name().to_string(),
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
    Json(ModelList { object: "list".into(), data, failed: state.engine.failures() })
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
        (status = 414, description = "URI longer than 8192 bytes", body = ErrorResponse),
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
    let failed_models = state.engine.failures();
    let status = |s: &str, message: Option<String>| HealthStatus {
        status: s.into(),
        models,
        failed_models: failed_models.clone(),
        message,
    };
    if state.engine.is_closed() {
        return (false, status("draining", Some("the server is shutting down and takes no new jobs".into())));
    }
    match state.engine.state() {
        EngineState::Ready => (true, status("ok", None)),
        EngineState::Loading => (false, status("loading", Some("models are loading".into()))),
        EngineState::Failed(msg) => (false, status("failed", Some(msg))),
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

/// The playground page: strategies side by side (streamed previews, reward, NFE, time, the
/// per-step reward/ESS trace) and the experiments dashboard. Plain HTML and JavaScript embedded
/// in the binary; it calls the API from the browser.
pub async fn playground() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../assets/playground.html"))
}
