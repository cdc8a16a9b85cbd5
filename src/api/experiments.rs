//! `/v1/experiments` and `/v1/feedback`: A/B experiments over HTTP, and how a generation request
//! joins one (`experiment`, `arm`): the arm is assigned, its fields override the request's, the
//! experiment's metrics are evaluated on each image, and every image is recorded before the
//! answer is sent.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::handlers::{prepare_parsed, Prepared};
use super::types::{Image, ImageGenerationRequest};
use super::AppState;
use crate::engine::{JobOutput, Metrics};
use crate::experiments::store::{Feedback, Record, Store, StoreError};
use crate::experiments::{Experiment, ExperimentList, ExperimentPatch, ExperimentResults, ExperimentSpec, Status};
use crate::reward::RewardSpec;

/// The store, opened on first use (so a server without experiments never touches the disk).
pub struct ExperimentStore {
    url: String,
    store: tokio::sync::OnceCell<Store>,
}

impl ExperimentStore {
    pub fn new(url: String) -> Self {
        Self { url, store: tokio::sync::OnceCell::new() }
    }

    pub async fn get(&self) -> Result<&Store, ApiError> {
        self.store.get_or_try_init(|| Store::open(&self.url)).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                format!("The experiments store is unavailable: {e}"),
            )
            .with_retry_after(5)
        })
    }
}

fn store_error(e: StoreError, what: &str) -> ApiError {
    match e {
        StoreError::NotFound(name) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("No {what} `{name}`")).with_param(what)
        }
        StoreError::Exists(name) => ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("An experiment named `{name}` exists (names stay taken after DELETE, which archives)"),
        )
        .with_param("name"),
        StoreError::Db(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", m).with_retry_after(5)
        }
    }
}

struct Loaded {
    spec: ExperimentSpec,
    status: Status,
    created_at: i64,
}

async fn load(store: &Store, name: &str) -> Result<Loaded, ApiError> {
    let row = store.get_experiment(name).await.map_err(|e| store_error(e, "experiment"))?;
    let spec: ExperimentSpec = serde_json::from_str(&row.spec)
        .map_err(|e| ApiError::internal(format!("stored experiment is malformed: {e}")))?;
    let status = Status::parse(&row.status).unwrap_or(Status::Stopped);
    Ok(Loaded { spec, status, created_at: row.created_at })
}

fn view(l: Loaded) -> Experiment {
    Experiment { object: "experiment".into(), spec: l.spec, status: l.status, created_at: l.created_at }
}

/// The experiment and arm a request joined.
#[derive(Debug, Clone)]
pub struct Joined {
    pub name: String,
    pub arm: String,
    pub user_hash: Option<String>,
}

/// Validate a generation request, joining its experiment first when it names one.
pub(crate) async fn prepare_request(
    state: &AppState,
    mut req: ImageGenerationRequest,
    request_id: Option<String>,
    label: &mut Option<String>,
) -> Result<Prepared, ApiError> {
    let Some(name) = req.experiment.clone() else {
        if req.arm.is_some() {
            return Err(ApiError::invalid("arm", "`arm` picks an arm of an `experiment`; name the experiment too"));
        }
        return prepare_parsed(state, req, None, request_id, label);
    };
    let store = state.experiments.get().await?;
    let exp = load(store, &name).await.map_err(|e| e.with_param("experiment"))?;
    if exp.status != Status::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "experiment_not_running",
            format!("Experiment `{name}` is {}; PATCH its status to running to resume it", exp.status.name()),
        )
        .with_param("experiment"));
    }
    let index = exp.spec.assign(req.user.as_deref(), req.arm.as_deref())?;
    let arm = &exp.spec.arms[index];
    // The arm's fields over the request's, then parsed again like any request.
    let mut body = match serde_json::to_value(&req) {
        Ok(Value::Object(m)) => m,
        _ => return Err(ApiError::internal("cannot re-serialise the request")),
    };
    body.retain(|_, v| !v.is_null());
    for (k, v) in &arm.request {
        body.insert(k.clone(), v.clone());
    }
    req = crate::util::json::parse_value(Value::Object(body))?;
    let mut p = prepare_parsed(state, req.clone(), None, request_id, label)?;
    p.job.metrics = metric_rewards(state, &exp.spec)?;
    p.experiment = Some(Joined {
        name: exp.spec.name.clone(),
        arm: arm.name.clone(),
        user_hash: req.user.as_deref().map(crate::experiments::user_hash),
    });
    Ok(p)
}

pub(crate) fn metric_rewards(state: &AppState, spec: &ExperimentSpec) -> Result<Metrics, ApiError> {
    let mut out = Vec::with_capacity(spec.metrics.len());
    for (i, m) in spec.metrics.iter().enumerate() {
        let r = state.rewards.build(&RewardSpec::Name(m.clone())).map_err(|e| {
            ApiError::invalid(&format!("metrics[{i}]"), format!("metric `{m}` is not a reward this server offers: {e}"))
        })?;
        out.push((m.clone(), r));
    }
    Ok(Metrics(out))
}

/// Record every image of a finished experiment request (committed before the answer) and put
/// the image ids into the answer.
pub(crate) async fn record(
    state: &AppState,
    joined: &Joined,
    p: &Prepared,
    out: &JobOutput,
    data: &mut [Image],
    total_ms: f64,
) -> Result<(), ApiError> {
    let ids = record_images(state, joined, p, out, total_ms).await?;
    for (answer, id) in data.iter_mut().zip(ids) {
        answer.tiller.image_id = Some(id);
    }
    Ok(())
}

/// Record every image of a finished experiment request, committed; their ids in order.
pub(crate) async fn record_images(
    state: &AppState,
    joined: &Joined,
    p: &Prepared,
    out: &JobOutput,
    total_ms: f64,
) -> Result<Vec<String>, ApiError> {
    let store = state.experiments.get().await?;
    let records =
        Record::of_job(&joined.name, &joined.arm, joined.user_hash.as_deref(), &p.job.params.prompt, out, total_ms);
    for record in &records {
        store.insert_record(record).await.map_err(|e| store_error(e, "record"))?;
    }
    Ok(records.into_iter().map(|r| r.image_id).collect())
}

/// Largest body of the experiment and feedback endpoints.
pub const BODY_LIMIT: usize = 1024 * 1024;

fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rej| super::handlers::body_error(rej, BODY_LIMIT))?;
    Ok(crate::util::json::parse_slice(&bytes)?)
}

/// Prefix a field error from validating an arm's request with the arm's path.
fn in_arm(e: ApiError, i: usize) -> ApiError {
    let param = match &e.param {
        Some(p) => format!("arms[{i}].request.{p}"),
        None => format!("arms[{i}].request"),
    };
    let mut e = e;
    e.message = format!("arm {i}: {}", e.message);
    e.param = Some(param);
    e
}

/// Create an experiment (admin key).
#[utoipa::path(
    post,
    path = "/v1/experiments",
    tag = "experiments",
    request_body = ExperimentSpec,
    responses(
        (status = 201, description = "Created", body = Experiment),
        (status = 400, description = "An invalid field (`error.param` names it: `arms[1].request.steering.particles`, `metrics[0]`, ...); each arm's request is validated like a generation request", body = ErrorResponse),
        (status = 401, description = "Missing or wrong admin key", body = ErrorResponse),
        (status = 404, description = "An arm names an unknown model or adapter", body = ErrorResponse),
        (status = 409, description = "An experiment of that name exists", body = ErrorResponse),
        (status = 413, description = "Body larger than 1 MiB", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 503, description = "The store is unavailable", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn create_experiment(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let spec: ExperimentSpec = parse(body)?;
        spec.check()?;
        metric_rewards(&state, &spec)?;
        for (i, arm) in spec.arms.iter().enumerate() {
            let mut probe = arm.request.clone();
            probe.insert("prompt".into(), Value::String("probe".into()));
            let req: ImageGenerationRequest =
                crate::util::json::parse_value(Value::Object(probe)).map_err(|e| in_arm(e.into(), i))?;
            let mut label = None;
            prepare_parsed(&state, req, None, None, &mut label).map_err(|e| in_arm(e, i))?;
        }
        let store = state.experiments.get().await?;
        let text = serde_json::to_string(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        store.create_experiment(&spec.name, &text).await.map_err(|e| store_error(e, "experiment"))?;
        Ok::<_, ApiError>(view(load(store, &spec.name).await?))
    }
    .await;
    match result {
        Ok(e) => (StatusCode::CREATED, Json(e)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// List experiments (archived ones are left out).
#[utoipa::path(get, path = "/v1/experiments", tag = "experiments",
    responses((status = 200, body = ExperimentList), (status = 401, body = ErrorResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn list_experiments(State(state): State<AppState>) -> Result<Json<ExperimentList>, ApiError> {
    let store = state.experiments.get().await?;
    let mut data = Vec::new();
    for row in store.list_experiments().await.map_err(|e| store_error(e, "experiment"))? {
        // One unreadable row (written by another version) must not hide the others.
        match load(store, &row.name).await {
            Ok(l) if l.status != Status::Archived => data.push(view(l)),
            Ok(_) => {}
            Err(e) => tracing::warn!(experiment = %row.name, "skipping an unreadable experiment: {}", e.message),
        }
    }
    Ok(Json(ExperimentList { object: "list".into(), data }))
}

/// One experiment (archived ones too).
#[utoipa::path(get, path = "/v1/experiments/{name}", tag = "experiments",
    params(("name" = String, Path, description = "Experiment name")),
    responses((status = 200, body = Experiment), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn get_experiment(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Experiment>, ApiError> {
    let store = state.experiments.get().await?;
    Ok(Json(view(load(store, &name).await?)))
}

/// Pause, resume or stop an experiment, or change its arms' weights (admin key).
#[utoipa::path(patch, path = "/v1/experiments/{name}", tag = "experiments",
    params(("name" = String, Path, description = "Experiment name")),
    request_body = ExperimentPatch,
    responses((status = 200, body = Experiment), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse), (status = 409, description = "Archived", body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn patch_experiment(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Experiment>, ApiError> {
    let patch: ExperimentPatch = parse(body)?;
    let store = state.experiments.get().await?;
    let mut l = load(store, &name).await?;
    if l.status == Status::Archived {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "experiment_archived",
            format!("Experiment `{name}` is archived"),
        ));
    }
    patch.apply(&mut l.spec, &mut l.status)?;
    save(store, &name, &l.spec, l.status).await
}

/// Stores an experiment's spec and status, and answers with what the store now holds.
async fn save(store: &Store, name: &str, spec: &ExperimentSpec, status: Status) -> Result<Json<Experiment>, ApiError> {
    let text = serde_json::to_string(spec).map_err(|e| ApiError::internal(e.to_string()))?;
    store.update_experiment(name, &text, status.name()).await.map_err(|e| store_error(e, "experiment"))?;
    Ok(Json(view(load(store, name).await?)))
}

/// Archive an experiment (admin key): it takes no more requests and leaves the list; its records
/// and results stay.
#[utoipa::path(delete, path = "/v1/experiments/{name}", tag = "experiments",
    params(("name" = String, Path, description = "Experiment name")),
    responses((status = 200, body = Experiment), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn delete_experiment(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Experiment>, ApiError> {
    let store = state.experiments.get().await?;
    let l = load(store, &name).await?;
    save(store, &name, &l.spec, Status::Archived).await
}

/// Per-arm results: metrics with intervals and differences against the control (fixed-sample
/// and always-valid), feedback scores, Bradley–Terry strengths, cost.
#[utoipa::path(get, path = "/v1/experiments/{name}/results", tag = "experiments",
    params(("name" = String, Path, description = "Experiment name")),
    responses((status = 200, body = ExperimentResults), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn experiment_results(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ExperimentResults>, ApiError> {
    let store = state.experiments.get().await?;
    let l = load(store, &name).await?;
    let records = store.records(&name).await.map_err(|e| store_error(e, "experiment"))?;
    let feedback = store.feedback(&name).await.map_err(|e| store_error(e, "experiment"))?;
    Ok(Json(crate::experiments::results(&l.spec, l.status, &records, &feedback)))
}

/// `POST /v1/feedback` body: a score for an image, or a preference of it over another image of
/// the same experiment.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"image_id": "5f0c…", "preferred_over": "9ab1…"}))]
pub struct FeedbackRequest {
    /// `tiller.image_id` of an image generated under an experiment.
    pub image_id: String,
    /// A rating of the image (any finite number; the results average it per arm).
    #[serde(default)]
    pub score: Option<f64>,
    /// Another image of the same experiment that this one was preferred over.
    #[serde(default)]
    pub preferred_over: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedbackCreated {
    /// Always `feedback`.
    pub object: String,
    pub id: String,
}

/// Record feedback on an image of an experiment.
#[utoipa::path(post, path = "/v1/feedback", tag = "experiments",
    request_body = FeedbackRequest,
    responses((status = 201, body = FeedbackCreated), (status = 400, body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown image_id", body = ErrorResponse),
        (status = 413, description = "Body larger than 1 MiB", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 503, description = "The store is unavailable", body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn post_feedback(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let f: FeedbackRequest = parse(body)?;
        match (f.score, &f.preferred_over) {
            (None, None) | (Some(_), Some(_)) => {
                return Err(ApiError::invalid("score", "send either `score` or `preferred_over`"))
            }
            (Some(s), None) if !s.is_finite() => return Err(ApiError::invalid("score", "`score` must be finite")),
            _ => {}
        }
        let store = state.experiments.get().await?;
        let image = store.record(&f.image_id).await.map_err(|e| store_error(e, "image_id"))?;
        if let Some(other) = &f.preferred_over {
            let o = store.record(other).await.map_err(|e| store_error(e, "preferred_over"))?;
            if o.experiment != image.experiment || other == &f.image_id {
                return Err(ApiError::invalid(
                    "preferred_over",
                    "`preferred_over` names another image of the same experiment",
                ));
            }
        }
        let id = store
            .insert_feedback(&Feedback { image_id: f.image_id, score: f.score, preferred_over: f.preferred_over })
            .await
            .map_err(|e| store_error(e, "feedback"))?;
        Ok::<_, ApiError>(FeedbackCreated { object: "feedback".into(), id })
    }
    .await;
    match result {
        Ok(f) => (StatusCode::CREATED, Json(f)).into_response(),
        Err(e) => e.into_response(),
    }
}
