//! The engine: one dedicated worker thread owns the loaded models and runs generation jobs
//! from a bounded queue, so model work never blocks the async runtime.
//!
//! * [`Engine::submit`] enqueues a job or refuses at once ([`SubmitError::QueueFull`]).
//! * The returned [`JobTicket`] resolves to the job's result. Dropping the ticket (the HTTP
//!   client disconnected, or the request timed out) cancels the job: a queued job is skipped,
//!   a running one stops at the next denoising step.
//! * Models are loaded on the worker thread at start-up; until then the engine is not ready.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::adapters::registry::{MergePolicy, VariantCache, VariantInfo};
use crate::adapters::AdapterSet;
use crate::models::{DiffusionModel, ModelInfo};
use crate::pipeline::{GenerationError, GenerationParams, ResolvedParams};
use crate::reward::RewardError;
use crate::sampling::SamplerKind;
use crate::steering::{PhaseTimings, SteeringRequest, TraceEvent};
use crate::util::metrics as m;

/// A model handed to the engine.
pub struct LoadedModel {
    pub name: String,
    pub model: Arc<dyn DiffusionModel>,
    /// Unix seconds reported as the model's `created` time (e.g. the directory's mtime).
    pub created: u64,
}

impl LoadedModel {
    pub fn new(name: impl Into<String>, model: Arc<dyn DiffusionModel>) -> Self {
        Self { name: name.into(), model, created: 0 }
    }
}

/// What the HTTP layer may know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub name: String,
    pub info: ModelInfo,
    pub created: u64,
    /// The sampler used when a request names none.
    pub default_scheduler: SamplerKind,
}

/// Loads the models; runs on the worker thread.
pub type Loader = Box<dyn FnOnce() -> Result<Vec<LoadedModel>, String> + Send>;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Jobs that may wait behind the running one.
    pub queue_depth: usize,
    /// Model used when a job names none; `None` = the first loaded model by name.
    pub default_model: Option<String>,
    /// Memory budget of the merged-variant cache, bytes.
    pub variant_cache_bytes: usize,
    pub merge_policy: MergePolicy,
    /// Skip adapter keys that match no module (with a warning) instead of failing the request.
    pub lenient_adapters: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_depth: 16,
            default_model: None,
            variant_cache_bytes: 2 << 30,
            merge_policy: MergePolicy::Auto,
            lenient_adapters: false,
        }
    }
}

/// Loading state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineState {
    Loading,
    Ready,
    /// Loading failed; the message says why. The engine refuses jobs.
    Failed(String),
}

/// A generation request for the worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// Model name; `None` = the default model.
    pub model: Option<String>,
    pub params: GenerationParams,
    /// Strategy and reward (default: plain sampling, no reward).
    pub steering: SteeringRequest,
    /// LoRA adapters with their weights (default: none).
    pub adapters: AdapterSet,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub seed: u64,
    /// Reward of this image, when the job had a reward.
    pub reward: Option<f32>,
    /// Steering trace (when asked for).
    pub trace: Vec<TraceEvent>,
    /// ReNO's optimised initial noise (1, C, h, w), when asked for.
    pub optimized_noise: Option<candle_core::Tensor>,
}

/// A finished job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub model: String,
    pub images: Vec<GeneratedImage>,
    pub params: ResolvedParams,
    pub denoiser_evals: usize,
    /// Images scored by the reward (all particles, candidates and iterates).
    pub reward_evals: usize,
    pub timings: PhaseTimings,
    /// Time the job waited in the queue.
    pub queue_ms: f64,
    pub prompt_truncated: bool,
    /// Steering method that ran (`none` for plain sampling).
    pub method: &'static str,
    /// Name of the reward, if any.
    pub reward: Option<String>,
    /// How the adapter variant was obtained, when the job had adapters.
    pub variant: Option<VariantInfo>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("the job was cancelled")]
    Cancelled,
    /// The job's parameters were rejected by the pipeline (e.g. init_latents shape).
    #[error("invalid value for `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("generation failed: {0}")]
    Failed(String),
    /// An external reward scorer failed (502).
    #[error("{0}")]
    Upstream(String),
    /// An external reward scorer timed out (504).
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("the engine worker stopped")]
    WorkerGone,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the queue is full ({depth} jobs waiting)")]
    QueueFull { depth: usize, retry_after_secs: u64 },
    #[error("models are not ready: {0}")]
    NotReady(String),
    #[error("model `{0}` not found")]
    UnknownModel(String),
    #[error("the engine worker stopped")]
    WorkerGone,
}

/// Counters since start-up (for tests and logs; Prometheus has the same numbers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub submitted: u64,
    pub rejected: u64,
    pub completed: u64,
    pub failed: u64,
    /// Cancelled while waiting in the queue (never started).
    pub cancelled_queued: u64,
    /// Cancelled between denoising steps.
    pub cancelled_running: u64,
    /// Denoising steps run, all jobs.
    pub steps: u64,
    pub denoiser_evals: u64,
    pub queued: u64,
    pub in_flight: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    rejected: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled_queued: AtomicU64,
    cancelled_running: AtomicU64,
    steps: AtomicU64,
    denoiser_evals: AtomicU64,
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    /// Exponential moving average of job run time, f64 seconds as bits.
    avg_job_secs: AtomicU64,
}

struct Registry {
    models: BTreeMap<String, ModelSummary>,
    default: String,
}

struct Inner {
    tx: Mutex<Option<SyncSender<QueuedJob>>>,
    state: RwLock<EngineState>,
    registry: RwLock<Option<Arc<Registry>>>,
    counters: Counters,
    opts: EngineOptions,
}

struct QueuedJob {
    model: String,
    params: GenerationParams,
    steering: SteeringRequest,
    adapters: AdapterSet,
    cancel: Arc<AtomicBool>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// Handle to the engine; cheap to clone. The worker stops when the last handle is dropped (or
/// on [`Engine::shutdown`]) after finishing the queued jobs.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A submitted job. Await [`JobTicket::wait`]; dropping the ticket first cancels the job.
pub struct JobTicket {
    rx: oneshot::Receiver<Result<JobOutput, JobError>>,
    cancel: Arc<AtomicBool>,
}

impl JobTicket {
    /// Wait for the result.
    pub async fn wait(mut self) -> Result<JobOutput, JobError> {
        let r = (&mut self.rx).await;
        r.unwrap_or(Err(JobError::WorkerGone))
    }

    /// Ask the worker to stop this job.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

impl Drop for JobTicket {
    fn drop(&mut self) {
        // Finished jobs ignore the flag; for anything else this is a client going away.
        self.cancel.store(true, Ordering::SeqCst);
    }
}

impl Engine {
    /// Start the worker thread; it runs `loader` first, then serves jobs.
    pub fn start(loader: Loader, opts: EngineOptions) -> Engine {
        m::prometheus();
        let (tx, rx) = sync_channel(opts.queue_depth.max(1));
        let inner = Arc::new(Inner {
            tx: Mutex::new(Some(tx)),
            state: RwLock::new(EngineState::Loading),
            registry: RwLock::new(None),
            counters: Counters::default(),
            opts,
        });
        metrics::gauge!(m::QUEUE_DEPTH).set(0.0);
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(0.0);
        let worker_inner = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("tiller-engine".into())
            .spawn(move || worker(worker_inner, loader, rx))
            .expect("spawn the engine thread");
        Engine { inner }
    }

    /// Start with models that are already loaded.
    pub fn with_models(models: Vec<LoadedModel>, opts: EngineOptions) -> Engine {
        Self::start(Box::new(move || Ok(models)), opts)
    }

    pub fn state(&self) -> EngineState {
        self.inner.state.read().unwrap().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.state() == EngineState::Ready
    }

    /// Block until loading finished (or `timeout` passed); returns the state then.
    pub fn wait_ready_blocking(&self, timeout: Duration) -> EngineState {
        let t0 = Instant::now();
        loop {
            let s = self.state();
            if s != EngineState::Loading || t0.elapsed() >= timeout {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Loaded models by name (empty until ready).
    pub fn models(&self) -> Vec<ModelSummary> {
        match &*self.inner.registry.read().unwrap() {
            Some(r) => r.models.values().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// The summary of `name` (`None` = the default model).
    pub fn model(&self, name: Option<&str>) -> Result<ModelSummary, SubmitError> {
        let reg = self.registry()?;
        let name = name.unwrap_or(&reg.default);
        reg.models.get(name).cloned().ok_or_else(|| SubmitError::UnknownModel(name.to_string()))
    }

    /// Name of the default model, once loaded.
    pub fn default_model(&self) -> Option<String> {
        self.inner.registry.read().unwrap().as_ref().map(|r| r.default.clone())
    }

    fn registry(&self) -> Result<Arc<Registry>, SubmitError> {
        if let Some(r) = &*self.inner.registry.read().unwrap() {
            return Ok(r.clone());
        }
        Err(SubmitError::NotReady(match self.state() {
            EngineState::Failed(msg) => msg,
            _ => "models are still loading".into(),
        }))
    }

    /// Queue a job; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<JobTicket, SubmitError> {
        let summary = self.model(job.model.as_deref())?;
        let c = &self.inner.counters;
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply, rx) = oneshot::channel();
        let queued = QueuedJob {
            model: summary.name,
            params: job.params,
            steering: job.steering,
            adapters: job.adapters,
            cancel: cancel.clone(),
            enqueued: Instant::now(),
            reply,
        };
        let depth = c.queued.fetch_add(1, Ordering::SeqCst) + 1;
        let sent = match &*self.inner.tx.lock().unwrap() {
            Some(tx) => tx.try_send(queued),
            None => Err(TrySendError::Disconnected(queued)),
        };
        match sent {
            Ok(()) => {
                c.submitted.fetch_add(1, Ordering::Relaxed);
                metrics::gauge!(m::QUEUE_DEPTH).set(depth as f64);
                Ok(JobTicket { rx, cancel })
            }
            Err(e) => {
                let depth = c.queued.fetch_sub(1, Ordering::SeqCst) - 1;
                match e {
                    TrySendError::Full(_) => {
                        c.rejected.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::QUEUE_REJECTED).increment(1);
                        Err(SubmitError::QueueFull { depth, retry_after_secs: self.retry_after(depth) })
                    }
                    TrySendError::Disconnected(_) => Err(SubmitError::WorkerGone),
                }
            }
        }
    }

    /// Seconds a refused client should wait: the queued work at the average job time, 1–60 s.
    fn retry_after(&self, depth: usize) -> u64 {
        let avg = f64::from_bits(self.inner.counters.avg_job_secs.load(Ordering::Relaxed));
        let est = avg * (depth as f64 + 1.0);
        (est.ceil() as u64).clamp(1, 60)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        EngineStats {
            submitted: l(&c.submitted),
            rejected: l(&c.rejected),
            completed: l(&c.completed),
            failed: l(&c.failed),
            cancelled_queued: l(&c.cancelled_queued),
            cancelled_running: l(&c.cancelled_running),
            steps: l(&c.steps),
            denoiser_evals: l(&c.denoiser_evals),
            queued: c.queued.load(Ordering::SeqCst) as u64,
            in_flight: c.in_flight.load(Ordering::SeqCst) as u64,
        }
    }

    /// Stop accepting jobs; the worker exits after the queued ones.
    pub fn shutdown(&self) {
        self.inner.tx.lock().unwrap().take();
    }

    pub fn options(&self) -> &EngineOptions {
        &self.inner.opts
    }
}

fn worker(inner: std::sync::Weak<Inner>, loader: Loader, rx: Receiver<QueuedJob>) {
    let loaded =
        std::panic::catch_unwind(AssertUnwindSafe(loader)).unwrap_or_else(|_| Err("the model loader panicked".into()));
    let models: BTreeMap<String, Arc<dyn DiffusionModel>> = {
        let Some(inner) = inner.upgrade() else { return };
        match register(&inner, loaded) {
            Ok(models) => models,
            Err(msg) => {
                tracing::error!("model loading failed: {msg}");
                *inner.state.write().unwrap() = EngineState::Failed(msg);
                return;
            }
        }
    };
    let mut variants = {
        let Some(inner) = inner.upgrade() else { return };
        let o = &inner.opts;
        VariantCache::new(o.variant_cache_bytes, o.merge_policy, o.lenient_adapters)
    };
    while let Ok(job) = rx.recv() {
        let Some(inner) = inner.upgrade() else { return };
        run_job(&inner, &models, &mut variants, job);
    }
}

fn register(
    inner: &Inner,
    loaded: Result<Vec<LoadedModel>, String>,
) -> Result<BTreeMap<String, Arc<dyn DiffusionModel>>, String> {
    let loaded = loaded?;
    if loaded.is_empty() {
        return Err("no models were loaded".into());
    }
    let mut models = BTreeMap::new();
    let mut summaries = BTreeMap::new();
    for lm in loaded {
        let summary = ModelSummary {
            name: lm.name.clone(),
            info: lm.model.info().clone(),
            created: lm.created,
            default_scheduler: crate::pipeline::default_sampler(lm.model.as_ref()),
        };
        summaries.insert(lm.name.clone(), summary);
        models.insert(lm.name, lm.model);
    }
    let default = match &inner.opts.default_model {
        Some(d) if summaries.contains_key(d) => d.clone(),
        Some(d) => {
            return Err(format!(
                "default model `{d}` is not among the loaded models ({})",
                summaries.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        }
        // The embedded shapes-world model when it is there, else the first by name.
        None if summaries.contains_key(crate::config::EMBEDDED_DEFAULT_MODEL) => {
            crate::config::EMBEDDED_DEFAULT_MODEL.to_string()
        }
        None => summaries.keys().next().cloned().expect("non-empty"),
    };
    tracing::info!(
        "loaded {} model(s): {} (default: {default})",
        summaries.len(),
        summaries.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    metrics::gauge!(m::MODELS_LOADED).set(summaries.len() as f64);
    *inner.registry.write().unwrap() = Some(Arc::new(Registry { models: summaries, default }));
    *inner.state.write().unwrap() = EngineState::Ready;
    Ok(models)
}

fn run_job(
    inner: &Inner,
    models: &BTreeMap<String, Arc<dyn DiffusionModel>>,
    variants: &mut VariantCache,
    job: QueuedJob,
) {
    let c = &inner.counters;
    let left = c.queued.fetch_sub(1, Ordering::SeqCst) - 1;
    metrics::gauge!(m::QUEUE_DEPTH).set(left as f64);
    let label = job.model.clone();
    let queue_wait = job.enqueued.elapsed();
    metrics::histogram!(m::QUEUE_WAIT).record(queue_wait.as_secs_f64());

    if job.cancel.load(Ordering::SeqCst) {
        c.cancelled_queued.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::JOBS, "model" => label, "outcome" => "cancelled").increment(1);
        let _ = job.reply.send(Err(JobError::Cancelled));
        return;
    }
    let Some(base) = models.get(&job.model) else {
        c.failed.fetch_add(1, Ordering::Relaxed);
        let _ = job.reply.send(Err(JobError::Failed(format!("model `{}` is not loaded", job.model))));
        return;
    };
    let steps = crate::pipeline::resolve(base.as_ref(), &job.params).steps;
    let (model, variant) = match variants.get_for_steps(&job.model, base, &job.adapters, Some(steps)) {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!(m::JOBS, "model" => label, "outcome" => "invalid").increment(1);
            let _ = job.reply.send(Err(JobError::Invalid { field: "adapters".into(), message: e.to_string() }));
            return;
        }
    };
    if let Some(v) = &variant {
        metrics::histogram!(m::ADAPTER_VARIANT_SECONDS, "cached" => if v.cached { "true" } else { "false" })
            .record(v.build_ms / 1e3);
    }
    let model = &model;

    c.in_flight.fetch_add(1, Ordering::SeqCst);
    metrics::gauge!(m::JOBS_IN_FLIGHT).increment(1.0);
    let t0 = Instant::now();
    let per_step =
        (crate::pipeline::evals_per_step(model.as_ref(), &job.params) * job.steering.spec.latents_per_image()) as u64;
    let mut steps_done = 0u64;
    let cancel = job.cancel.clone();
    let steps_label = label.clone();
    let mut progress = |_p: crate::pipeline::Progress| {
        steps_done += 1;
        c.steps.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DENOISING_STEPS, "model" => steps_label.clone()).increment(1);
        !cancel.load(Ordering::SeqCst)
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let out = crate::steering::generate(model.as_ref(), &job.params, &job.steering, &mut progress)?;
        let pngs = crate::util::png::encode_batch(&out.steered.decoded)
            .map_err(|e| GenerationError::Candle(candle_core::Error::Msg(e.to_string())))?;
        Ok::<_, GenerationError>((out, pngs))
    }));
    let elapsed = t0.elapsed().as_secs_f64();
    c.in_flight.fetch_sub(1, Ordering::SeqCst);
    metrics::gauge!(m::JOBS_IN_FLIGHT).decrement(1.0);

    let (outcome, reply) = match result {
        Ok(Ok((out, pngs))) => {
            c.completed.fetch_add(1, Ordering::Relaxed);
            let st = out.steered;
            c.denoiser_evals.fetch_add(st.denoiser_evals as u64, Ordering::Relaxed);
            metrics::counter!(m::DENOISER_EVALS, "model" => label.clone()).increment(st.denoiser_evals as u64);
            metrics::counter!(m::REWARD_EVALS, "model" => label.clone()).increment(st.reward_evals as u64);
            metrics::counter!(m::IMAGES, "model" => label.clone()).increment(pngs.len() as u64);
            // Exponential moving average of completed job times for Retry-After.
            let prev = f64::from_bits(c.avg_job_secs.load(Ordering::Relaxed));
            let avg = if prev == 0.0 { elapsed } else { 0.8 * prev + 0.2 * elapsed };
            c.avg_job_secs.store(avg.to_bits(), Ordering::Relaxed);
            let images = pngs
                .into_iter()
                .zip(out.seeds.iter())
                .zip(st.images)
                .map(|((png, &seed), img)| GeneratedImage {
                    png,
                    seed,
                    reward: img.reward,
                    trace: img.trace,
                    optimized_noise: img.optimized_noise,
                })
                .collect();
            let output = JobOutput {
                model: label.clone(),
                images,
                params: out.params,
                denoiser_evals: st.denoiser_evals,
                reward_evals: st.reward_evals,
                timings: st.timings,
                queue_ms: queue_wait.as_secs_f64() * 1e3,
                prompt_truncated: st.prompt_truncated,
                method: job.steering.spec.method(),
                reward: job.steering.reward.as_ref().map(|r| r.name().to_string()),
                variant,
            };
            ("completed", Ok(output))
        }
        Ok(Err(GenerationError::Cancelled(step))) => {
            c.cancelled_running.fetch_add(1, Ordering::Relaxed);
            let evals = per_step * steps_done;
            c.denoiser_evals.fetch_add(evals, Ordering::Relaxed);
            metrics::counter!(m::DENOISER_EVALS, "model" => label.clone()).increment(evals);
            tracing::info!("job on `{label}` cancelled after step {step}");
            ("cancelled", Err(JobError::Cancelled))
        }
        Ok(Err(GenerationError::InvalidInput { field, message })) => {
            ("invalid", Err(JobError::Invalid { field: field.to_string(), message }))
        }
        Ok(Err(GenerationError::Reward(e))) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("job on `{label}`: {e}");
            let reply = match e {
                RewardError::Invalid { field, message } => JobError::Invalid { field, message },
                RewardError::Upstream { .. } => JobError::Upstream(e.to_string()),
                RewardError::Timeout { .. } => JobError::UpstreamTimeout(e.to_string()),
                RewardError::Candle(e) => JobError::Failed(e.to_string()),
            };
            ("failed", Err(reply))
        }
        Ok(Err(GenerationError::Candle(e))) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("job on `{label}` failed: {e}");
            ("failed", Err(JobError::Failed(e.to_string())))
        }
        Err(panic) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!("job on `{label}` panicked: {msg}");
            ("failed", Err(JobError::Failed(format!("internal error: {msg}"))))
        }
    };
    metrics::counter!(m::JOBS, "model" => label.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!(m::JOB_DURATION, "model" => label, "outcome" => outcome).record(elapsed);
    let _ = job.reply.send(reply);
}
