//! The HTTP API: OpenAI-compatible image generation plus model listing, health, metrics and
//! the OpenAPI document.
//!
//! [`router`] builds the whole axum `Router` from an [`AppState`], so tests can bind it to
//! `127.0.0.1:0`; [`serve`] is what `tiller serve` runs.

pub mod adapters;
pub mod edits;
pub mod error;
pub mod experiments;
pub mod handlers;
pub mod jobs;
pub mod middleware;
pub mod openapi;
pub mod stream;
pub mod types;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, patch, post};
use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::adapters::registry::AdapterRegistry;
use crate::config::{Config, Limits};
use crate::engine::Engine;
use crate::reward::RewardRegistry;

pub use error::ApiError;
pub use openapi::{openapi_json, ApiDoc};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub limits: Arc<Limits>,
    /// Bearer token required on `/v1/*`, if any.
    pub api_key: Option<Arc<str>>,
    /// Bearer token required on `/metrics` and on registering/removing adapters, if any.
    pub admin_key: Option<Arc<str>>,
    /// Rewards requests can steer towards.
    pub rewards: Arc<RewardRegistry>,
    /// LoRA adapters requests can apply.
    pub adapters: Arc<AdapterRegistry>,
    /// `adapters.root` as configured (for messages when it does not exist).
    pub adapters_root: Arc<std::path::Path>,
    /// Asynchronous jobs (`/v1/jobs`).
    pub jobs: Arc<jobs::JobStore>,
    /// `server.cors_origins`.
    pub cors_origins: Arc<[String]>,
    /// The experiments store (`[storage]`), opened on first use.
    pub experiments: Arc<experiments::ExperimentStore>,
}

impl AppState {
    /// State with the built-in rewards plus the configured `[rewards.*]` (CLIP models load
    /// here, on `device`).
    pub fn new(engine: Engine, config: &Config, device: &candle_core::Device) -> crate::error::Result<Self> {
        let configs = crate::reward::registry::with_shipped(&config.rewards, &config.models.root);
        let rewards = RewardRegistry::new(&configs, device)?;
        let adapters = AdapterRegistry::open(&config.adapters.root)
            .map_err(|e| crate::error::TillerError::field("adapters.root", e.to_string()))?;
        Ok(Self::with_parts(engine, config, rewards, adapters))
    }

    pub fn with_parts(engine: Engine, config: &Config, rewards: RewardRegistry, adapters: AdapterRegistry) -> Self {
        Self {
            engine,
            limits: Arc::new(config.limits.clone()),
            api_key: config.server.api_key.as_deref().map(Arc::from),
            admin_key: config.server.admin_key.as_deref().map(Arc::from),
            rewards: Arc::new(rewards),
            adapters: Arc::new(adapters),
            adapters_root: Arc::from(config.adapters.root.as_path()),
            jobs: jobs::store(&config.jobs),
            cors_origins: config.server.cors_origins.clone().into(),
            experiments: Arc::new(experiments::ExperimentStore::new(config.storage.database_url())),
        }
    }
}

/// The full router: API routes, `/openapi.json`, Swagger UI at `/docs`, JSON 404/405, request
/// metrics.
pub fn router(state: AppState) -> Router {
    crate::util::metrics::prometheus();
    let body_limit = state.limits.max_body_bytes;
    let cors_origins = state.cors_origins.clone();
    let v1 = Router::new()
        .route(
            "/v1/images/generations",
            post(handlers::create_image)
                .layer(DefaultBodyLimit::max(body_limit))
                .layer(axum::middleware::from_fn(middleware::require_json)),
        )
        // Multipart, so no JSON check; the form's own reader answers 415 for anything else.
        .route("/v1/images/edits", post(edits::edit_image).layer(DefaultBodyLimit::max(body_limit)))
        .route(
            "/v1/jobs",
            post(jobs::create_job)
                .layer(DefaultBodyLimit::max(body_limit))
                .layer(axum::middleware::from_fn(middleware::require_json)),
        )
        .route("/v1/jobs/{id}", get(jobs::get_job).delete(jobs::delete_job))
        .route("/v1/jobs/{id}/events", get(jobs::job_events))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{model}", get(handlers::get_model))
        .route("/v1/rewards", get(handlers::list_rewards))
        .route("/v1/experiments", get(experiments::list_experiments))
        .route("/v1/experiments/{name}", get(experiments::get_experiment))
        .route("/v1/experiments/{name}/results", get(experiments::experiment_results))
        .route(
            "/v1/feedback",
            post(experiments::post_feedback)
                .layer(DefaultBodyLimit::max(experiments::BODY_LIMIT))
                .layer(axum::middleware::from_fn(middleware::require_json)),
        )
        .route("/v1/adapters", get(adapters::list_adapters))
        .route("/v1/adapters/{name}", get(adapters::get_adapter))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::require_api_key));
    // Registering and removing adapters changes what every client gets: the admin key.
    let manage = Router::new()
        .route(
            "/v1/adapters",
            post(adapters::register_adapter)
                .layer(DefaultBodyLimit::max(adapters::ADAPTER_BODY_LIMIT))
                .layer(axum::middleware::from_fn(middleware::require_json)),
        )
        .route("/v1/adapters/{name}", delete(adapters::delete_adapter))
        .route(
            "/v1/experiments",
            post(experiments::create_experiment)
                .layer(DefaultBodyLimit::max(experiments::BODY_LIMIT))
                .layer(axum::middleware::from_fn(middleware::require_json)),
        )
        .route(
            "/v1/experiments/{name}",
            patch(experiments::patch_experiment)
                .layer(DefaultBodyLimit::max(experiments::BODY_LIMIT))
                .delete(experiments::delete_experiment),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::require_manage_key));
    let metrics = Router::new()
        .route("/metrics", get(handlers::metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), middleware::require_admin_key));
    Router::new()
        .merge(v1)
        .merge(manage)
        .merge(metrics)
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/playground", get(handlers::playground))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn(middleware::record_metrics))
        .layer(axum::middleware::from_fn(middleware::request_context))
        .layer(tower::util::option_layer(middleware::cors(&cors_origins)))
        .with_state(state)
}

/// Discover and load models as `config.models` says (on the engine thread), after checking
/// synchronously that the models root and the default model exist.
pub fn engine_from_config(config: &Config) -> crate::error::Result<Engine> {
    use crate::error::TillerError;
    let mc = &config.models;
    let found = crate::models::loader::discover_models(&mc.root)?;
    if found.is_empty() {
        return Err(TillerError::file(
            &mc.root,
            "no model directories (subdirectories holding model_index.json) found",
        ));
    }
    let names: Vec<String> = found.iter().map(|(n, _)| n.clone()).collect();
    let selected: Vec<(String, std::path::PathBuf)> = if mc.load.is_empty() {
        found
    } else {
        for want in &mc.load {
            if !names.contains(want) {
                return Err(TillerError::field(
                    "models.load",
                    format!("model `{want}` not found under {} (found: {})", mc.root.display(), names.join(", ")),
                ));
            }
        }
        found.into_iter().filter(|(n, _)| mc.load.contains(n)).collect()
    };
    if let Some(d) = &mc.default {
        if !selected.iter().any(|(n, _)| n == d) {
            return Err(TillerError::field(
                "models.default",
                format!(
                    "default model `{d}` not found under {} (found: {})",
                    mc.root.display(),
                    selected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    let device = mc.device.open()?;
    let dtype = mc.dtype.check_device(&device)?;
    let loader = move || -> Result<crate::engine::Loaded, String> {
        let mut out = crate::engine::Loaded::default();
        // Load what loads: one broken directory is reported, not fatal to the others.
        for (name, dir) in selected {
            let t0 = std::time::Instant::now();
            let model = match crate::models::loader::load_model(&name, &dir, &device, dtype) {
                Ok(m) => m,
                Err(e) => {
                    out.failures.push(crate::engine::ModelFailure { name, error: e.to_string() });
                    continue;
                }
            };
            tracing::info!("loaded model `{name}` from {} in {:.1}s", dir.display(), t0.elapsed().as_secs_f64());
            let marker = ["model_index.json", crate::models::gaussian_mixture::CONFIG_FILE]
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.is_file())
                .unwrap_or_else(|| dir.join("model_index.json"));
            let created = std::fs::metadata(marker)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            out.models.push(crate::engine::LoadedModel { name, model, created });
        }
        Ok(out)
    };
    Ok(Engine::start(loader, engine_options(config)))
}

/// The engine settings `config` asks for.
pub fn engine_options(config: &Config) -> crate::engine::EngineOptions {
    let l = &config.limits;
    crate::engine::EngineOptions {
        queue_depth: l.queue_depth,
        default_model: config.models.default.clone(),
        variant_cache_bytes: config.adapters.cache_mib << 20,
        merge_policy: config.adapters.merge,
        lenient_adapters: config.adapters.lenient,
        memory_budget_bytes: l.memory_budget_bytes(),
        max_running_jobs: l.max_running_jobs,
        decode_chunk: 4,
        scheduler: crate::engine::SchedulerOptions {
            max_batch_rows: l.max_batch_rows,
            gather_window: Duration::from_millis(l.batch_wait_ms),
        },
    }
}

/// Run the server until Ctrl-C / SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let addr = config.bind_addr()?;
    let engine = engine_from_config(&config)?;
    let state = AppState::new(engine.clone(), &config, &config.models.device.open()?)?;
    let app = router(state);
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(
        "tiller listening on http://{} (models root {}, docs at /docs)",
        listener.local_addr()?,
        config.models.root.display()
    );
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            crate::util::metrics::prometheus().run_upkeep();
        }
    });
    // SIGTERM: stop accepting (readiness turns 503 at once), let running and queued jobs finish
    // for up to `limits.shutdown_grace_secs`, then cancel the rest; a second signal cancels at
    // once. HTTP connections close after the engine has drained, so streams end with their jobs.
    let grace = Duration::from_secs(config.limits.shutdown_grace_secs);
    let drain_engine = engine.clone();
    let drained = async move {
        shutdown_signal().await;
        tracing::info!("draining: refusing new jobs, waiting up to {} s for running ones", grace.as_secs());
        tokio::select! {
            finished = drain_engine.drain(grace) => {
                if !finished {
                    tracing::warn!("grace period over: cancelled the remaining jobs");
                }
            }
            _ = shutdown_signal() => {
                tracing::warn!("second signal: cancelling every job now");
                drain_engine.cancel_all();
            }
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(drained).await?;
    engine.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
