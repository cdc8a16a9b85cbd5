//! The engine: admission, step-level batching and the event stream of every job.
//!
//! * [`Engine::submit`] estimates a job's peak memory and work, then queues it or refuses it at
//!   once (too large for `limits.memory_budget_mib`, or the queue is full). It returns the job's
//!   [`JobHandle`]: its id, cancel flag and event log.
//! * A dispatcher thread admits queued jobs in FIFO order while their estimates fit the budget
//!   ([`queue`]); each admitted job runs its strategy on a thread of its own, and every
//!   denoiser call of every running job goes through the scheduler thread ([`scheduler`]),
//!   which batches rows of different jobs into shared forwards.
//! * A job stops within one denoiser call after [`JobHandle::cancel`] (DELETE, a client that
//!   hung up, a timeout).
//! * Models are loaded on a background thread at start-up; until the default model is loaded
//!   the engine is not ready. A model that fails to load is reported, the others are served.

pub mod events;
pub mod queue;
pub mod scheduler;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::adapters::registry::{MergePolicy, VariantCache, VariantInfo};
use crate::adapters::AdapterSet;
use crate::models::{DiffusionModel, ModelInfo};
use crate::pipeline::{GenerationError, GenerationParams, ResolvedParams};
use crate::reward::RewardError;
use crate::sampling::SamplerKind;
use crate::steering::{PhaseTimings, SteeringRequest, SteeringSpec, TraceEvent};
use crate::util::metrics as m;

pub use events::{CancelOnDrop, JobEvent, JobHandle, JobStatus};
pub use scheduler::SchedulerOptions;

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

/// A model directory that did not load, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ModelFailure {
    pub name: String,
    pub error: String,
}

/// What a loader produced: the models that loaded and the ones that did not.
#[derive(Default)]
pub struct Loaded {
    pub models: Vec<LoadedModel>,
    pub failures: Vec<ModelFailure>,
}

impl From<Vec<LoadedModel>> for Loaded {
    fn from(models: Vec<LoadedModel>) -> Self {
        Self { models, failures: Vec::new() }
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

/// Loads the models; runs on a background thread.
pub type Loader = Box<dyn FnOnce() -> Result<Loaded, String> + Send>;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Jobs that may wait for admission; more are refused (429).
    pub queue_depth: usize,
    /// Model used when a job names none; `None` = the embedded default, else the first by name.
    pub default_model: Option<String>,
    /// Memory budget of the merged-variant cache, bytes.
    pub variant_cache_bytes: usize,
    pub merge_policy: MergePolicy,
    /// Skip adapter keys that match no module (with a warning) instead of failing the request.
    pub lenient_adapters: bool,
    /// Peak memory the running jobs may use together (their estimates), bytes.
    pub memory_budget_bytes: u64,
    /// Jobs running at once (each has a thread; their denoiser calls are batched).
    pub max_running_jobs: usize,
    /// Images decoded at once by one job (bounds decode memory for large particle counts).
    pub decode_chunk: usize,
    pub scheduler: SchedulerOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_depth: 16,
            default_model: None,
            variant_cache_bytes: 2 << 30,
            merge_policy: MergePolicy::Auto,
            lenient_adapters: false,
            memory_budget_bytes: default_memory_budget(),
            max_running_jobs: 16,
            decode_chunk: 4,
            scheduler: SchedulerOptions::default(),
        }
    }
}

/// Half of the machine's memory (from /proc/meminfo), or 8 GiB where that cannot be read.
pub fn default_memory_budget() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    total_kib.map(|k| k * 1024 / 2).unwrap_or(8 << 30)
}

/// Loading state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineState {
    Loading,
    Ready,
    /// Loading failed; the message says why. The engine refuses jobs.
    Failed(String),
}

/// A generation request.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// Model name; `None` = the default model.
    pub model: Option<String>,
    pub params: GenerationParams,
    /// Strategy and reward (default: plain sampling, no reward).
    pub steering: SteeringRequest,
    /// LoRA adapters with their weights (default: none).
    pub adapters: AdapterSet,
    /// Previews of x̂0 to decode while the job runs (0–3, OpenAI's `partial_images`).
    pub partial_images: usize,
    /// The HTTP request's id, carried into the job's log lines.
    pub request_id: Option<String>,
    /// File format of the images (and previews); PNGs carry a `parameters` chunk.
    pub encoding: crate::util::encode::Encoding,
    /// Rewards evaluated on every final image, reported by name (an experiment's metrics).
    pub metrics: Metrics,
}

/// Named rewards to evaluate on the final images.
#[derive(Clone, Default)]
pub struct Metrics(pub Vec<(String, Arc<dyn crate::reward::Reward>)>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(n, _)| n)).finish()
    }
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// The encoded file (`Job::encoding`).
    pub encoded: Vec<u8>,
    /// `Job::metrics` of this image, by name.
    pub metrics: Vec<(String, f32)>,
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
    /// Denoiser calls differentiated (ReNO's backward passes).
    pub backward_evals: usize,
    pub timings: PhaseTimings,
    /// Time the job waited for admission.
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
    #[error("invalid value for {0}")]
    Invalid(crate::error::FieldError),
    #[error("generation failed: {0}")]
    Failed(String),
    /// An external reward scorer failed (502).
    #[error("{0}")]
    Upstream(String),
    /// An external reward scorer timed out (504).
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("the engine stopped")]
    WorkerGone,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the queue is full ({depth} jobs waiting)")]
    QueueFull { depth: usize, retry_after_secs: u64 },
    /// The job's memory estimate exceeds the whole budget: it can never run.
    #[error("the request needs about {needed_mib} MiB, more than the memory budget of {budget_mib} MiB")]
    TooLarge { needed_mib: u64, budget_mib: u64, field: &'static str },
    #[error("models are not ready: {0}")]
    NotReady(String),
    #[error("model `{0}` not found")]
    UnknownModel(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Counters since start-up (for tests and logs; Prometheus has the same numbers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub submitted: u64,
    pub rejected: u64,
    pub completed: u64,
    pub failed: u64,
    /// Cancelled while waiting in the queue (never started).
    pub cancelled_queued: u64,
    /// Cancelled while running.
    pub cancelled_running: u64,
    /// Denoising steps run, all jobs.
    pub steps: u64,
    pub denoiser_evals: u64,
    pub queued: u64,
    pub in_flight: u64,
    /// Batched forwards run, the rows they held, the most rows in one, and how many held rows
    /// of more than one job.
    pub ticks: u64,
    pub batch_rows: u64,
    pub max_batch_rows: u64,
    pub shared_ticks: u64,
    /// Seconds inside batched forwards, and inside whole ticks (the difference is scheduling).
    pub forward_secs: f64,
    pub tick_secs: f64,
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
}

struct Registry {
    models: BTreeMap<String, (ModelSummary, Arc<dyn DiffusionModel>)>,
    default: String,
}

/// A job waiting for admission.
struct Waiting {
    job: Job,
    model: Arc<dyn DiffusionModel>,
    model_name: String,
    handle: Arc<JobHandle>,
    estimate: Estimate,
}

/// Admission state and the jobs it holds, under one lock.
struct Dispatch {
    admission: queue::Admission,
    waiting: HashMap<u64, Waiting>,
    /// Work of the running jobs (for Retry-After).
    running_cost: u64,
    throughput: Throughput,
}

/// Completed work per second of busy time (at least one job running), for Retry-After.
#[derive(Default)]
struct Throughput {
    done_cost: u64,
    busy: Duration,
    busy_since: Option<Instant>,
}

impl Throughput {
    fn per_sec(&self) -> Option<f64> {
        let busy = self.busy + self.busy_since.map(|t| t.elapsed()).unwrap_or_default();
        (self.done_cost > 0 && busy > Duration::ZERO).then(|| self.done_cost as f64 / busy.as_secs_f64())
    }
}

struct Inner {
    state: RwLock<EngineState>,
    registry: RwLock<Option<Arc<Registry>>>,
    failures: RwLock<Vec<ModelFailure>>,
    counters: Counters,
    opts: EngineOptions,
    dispatch: Mutex<Dispatch>,
    wake: Condvar,
    /// No new jobs (draining or stopped).
    closed: AtomicBool,
    /// The dispatcher should exit once nothing is queued or running.
    stopping: AtomicBool,
    next_seq: AtomicU64,
    forward_tx: Mutex<Option<SyncSender<scheduler::ForwardCall>>>,
    gauges: Arc<scheduler::SchedulerGauges>,
    variants: Mutex<VariantCache>,
    /// Every job not yet finished, for cancel-all at the end of a drain.
    live: Mutex<HashMap<u64, Arc<JobHandle>>>,
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A job's estimated peak memory and work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub bytes: u64,
    /// Denoiser rows × latent elements × steps.
    pub cost: u64,
}

/// Estimate the peak memory of `job` on `model`: one forward of its rows (capped at the batch
/// row limit: the scheduler never runs more at once), decoding in chunks plus the decoded
/// images it keeps, its latent state, for ReNO the gradient graph of every step and for FlowChef
/// the decoder's.
pub fn estimate(model: &dyn DiffusionModel, job: &Job, opts: &EngineOptions) -> Estimate {
    // In f64: the sizes an operator's limits allow can overflow integer products, and an
    // estimate only has to be an upper bound (`as u64` saturates).
    let info = model.info();
    let r = crate::steering::resolve(info, &job.params, &job.steering.spec);
    let f = info.vae_scale_factor.max(1);
    let (lh, lw) = (r.height / f, r.width / f);
    let n = job.params.n.max(1) as f64;
    let k = job.steering.spec.latents_per_image() as f64;
    let cfg = if crate::pipeline::uses_cfg(model, r.guidance_scale) { 2.0 } else { 1.0 };
    let latents = n * k;
    let rows = latents * cfg;
    let fwd_row = model.forward_bytes_per_row(lh, lw) as f64;
    let fwd = rows.min(opts.scheduler.max_batch_rows.max(1) as f64) * fwd_row;
    let image = 3.0 * r.height as f64 * r.width as f64 * 4.0;
    let decoded_kept = if job.steering.spec.needs_reward() || job.steering.reward.is_some() { latents } else { n };
    let decode_image = model.decode_bytes_per_image(lh, lw) as f64;
    let decode = latents.min(opts.decode_chunk.max(1) as f64) * decode_image + decoded_kept * image * 2.0;
    let latent = info.latent_channels as f64 * lh as f64 * lw as f64 * 4.0;
    let state = latents * latent * 16.0;
    let steps = r.steps as f64;
    let (reno, calls) = match &job.steering.spec {
        // Backpropagation keeps every intermediate of every step, not just a forward's live set:
        // measured at about 10× a forward's estimate per row and step on the default model
        // (tests/engine_memory.rs), so 16× leaves a margin.
        SteeringSpec::Reno(s) => (steps * rows * fwd_row * 16.0 + n * decode_image * 4.0, s.iterations as f64 * steps),
        SteeringSpec::Svdd(_) => (0.0, steps * 2.0),
        // FlowChef differentiates the decoder and the reward (not the network) once per move.
        SteeringSpec::Flowchef(_) => (n * decode_image * 4.0, steps),
        _ => (0.0, steps),
    };
    let bytes = fwd + decode + state + reno + (16u64 << 20) as f64;
    let cost = rows * latent / 4.0 * calls;
    Estimate { bytes: bytes as u64, cost: cost as u64 }
}

impl Engine {
    /// Start the engine; `loader` runs on a background thread and the engine is ready once it
    /// returned a default model.
    pub fn start<F, L>(loader: F, opts: EngineOptions) -> Engine
    where
        F: FnOnce() -> Result<L, String> + Send + 'static,
        L: Into<Loaded>,
    {
        m::prometheus();
        let (tx, rx) = sync_channel::<scheduler::ForwardCall>(1024);
        let gauges = Arc::new(scheduler::SchedulerGauges::default());
        let inner = Arc::new(Inner {
            state: RwLock::new(EngineState::Loading),
            registry: RwLock::new(None),
            failures: RwLock::new(Vec::new()),
            counters: Counters::default(),
            dispatch: Mutex::new(Dispatch {
                admission: queue::Admission::new(opts.memory_budget_bytes, opts.max_running_jobs, opts.queue_depth),
                waiting: HashMap::new(),
                running_cost: 0,
                throughput: Throughput::default(),
            }),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            forward_tx: Mutex::new(Some(tx)),
            gauges: gauges.clone(),
            variants: Mutex::new(VariantCache::new(opts.variant_cache_bytes, opts.merge_policy, opts.lenient_adapters)),
            live: Mutex::new(HashMap::new()),
            opts,
        });
        metrics::gauge!(m::QUEUE_DEPTH).set(0.0);
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(0.0);
        let sched_opts = inner.opts.scheduler;
        std::thread::Builder::new()
            .name("tiller-scheduler".into())
            .spawn(move || scheduler::run(rx, sched_opts, gauges))
            .expect("spawn the scheduler thread");
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("tiller-loader".into())
            .spawn(move || {
                let loaded = std::panic::catch_unwind(AssertUnwindSafe(loader))
                    .unwrap_or_else(|_| Err("the model loader panicked".into()))
                    .map(Into::into);
                if let Some(inner) = weak.upgrade() {
                    register(&inner, loaded);
                }
            })
            .expect("spawn the loader thread");
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("tiller-dispatch".into())
            .spawn(move || dispatcher(weak))
            .expect("spawn the dispatcher thread");
        Engine { inner }
    }

    /// Start with models that are already loaded.
    pub fn with_models(models: Vec<LoadedModel>, opts: EngineOptions) -> Engine {
        Self::start(move || Ok(models), opts)
    }

    pub fn state(&self) -> EngineState {
        self.inner.state.read().unwrap().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.state() == EngineState::Ready
    }

    /// Model directories that failed to load.
    pub fn failures(&self) -> Vec<ModelFailure> {
        self.inner.failures.read().unwrap().clone()
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
            Some(r) => r.models.values().map(|(s, _)| s.clone()).collect(),
            None => Vec::new(),
        }
    }

    /// The summary of `name` (`None` = the default model).
    pub fn model(&self, name: Option<&str>) -> Result<ModelSummary, SubmitError> {
        let reg = self.registry()?;
        let name = name.unwrap_or(&reg.default);
        reg.models.get(name).map(|(s, _)| s.clone()).ok_or_else(|| SubmitError::UnknownModel(name.to_string()))
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

    /// The memory and work estimate of `job` (what admission decides on).
    pub fn estimate(&self, job: &Job) -> Result<Estimate, SubmitError> {
        let reg = self.registry()?;
        let name = job.model.as_deref().unwrap_or(&reg.default);
        let (_, model) = reg.models.get(name).ok_or_else(|| SubmitError::UnknownModel(name.to_string()))?;
        Ok(estimate(model.as_ref(), job, &self.inner.opts))
    }

    /// Queue a job; refuses at once when it can never fit the memory budget or the queue is
    /// full. The returned handle carries the job's events.
    pub fn submit(&self, job: Job) -> Result<Arc<JobHandle>, SubmitError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let reg = self.registry()?;
        let name = job.model.clone().unwrap_or_else(|| reg.default.clone());
        let (_, model) = reg.models.get(&name).ok_or_else(|| SubmitError::UnknownModel(name.clone()))?;
        let est = estimate(model.as_ref(), &job, &self.inner.opts);
        let seq = self.inner.next_seq.fetch_add(1, Ordering::SeqCst);
        let handle = JobHandle::new(seq);
        let c = &self.inner.counters;
        let mut d = self.inner.dispatch.lock().unwrap();
        match d.admission.offer(seq, est.bytes, est.cost) {
            Ok(()) => {}
            Err(queue::Refusal::TooLarge { bytes, budget }) => {
                c.rejected.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::MEMORY_REJECTED).increment(1);
                let field = if job.steering.spec.latents_per_image() > 1 {
                    "steering"
                } else if job.params.n > 1 {
                    "n"
                } else if matches!(job.steering.spec, SteeringSpec::Reno(_)) {
                    "steps"
                } else {
                    "size"
                };
                return Err(SubmitError::TooLarge {
                    needed_mib: bytes.div_ceil(1 << 20),
                    budget_mib: budget >> 20,
                    field,
                });
            }
            Err(queue::Refusal::QueueFull { queued }) => {
                c.rejected.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::QUEUE_REJECTED).increment(1);
                let retry_after_secs = retry_after(&d);
                return Err(SubmitError::QueueFull { depth: queued, retry_after_secs });
            }
        }
        handle.push(JobEvent::Queued);
        d.waiting.insert(
            seq,
            Waiting { job, model: model.clone(), model_name: name, handle: handle.clone(), estimate: est },
        );
        metrics::gauge!(m::QUEUE_DEPTH).set(d.admission.queued() as f64);
        metrics::gauge!(m::QUEUED_COST).set(d.admission.queued_cost() as f64);
        drop(d);
        self.inner.live.lock().unwrap().insert(seq, handle.clone());
        c.submitted.fetch_add(1, Ordering::Relaxed);
        self.inner.wake.notify_all();
        Ok(handle)
    }

    /// Cancel a job: a queued one is removed at once (its Cancelled event is sent now), a
    /// running one stops before its next denoiser call.
    pub fn cancel(&self, handle: &JobHandle) {
        handle.cancel();
        let mut d = self.inner.dispatch.lock().unwrap();
        if d.admission.remove(handle.seq) {
            d.waiting.remove(&handle.seq);
            metrics::gauge!(m::QUEUE_DEPTH).set(d.admission.queued() as f64);
            metrics::gauge!(m::QUEUED_COST).set(d.admission.queued_cost() as f64);
            drop(d);
            self.inner.live.lock().unwrap().remove(&handle.seq);
            self.inner.counters.cancelled_queued.fetch_add(1, Ordering::Relaxed);
            handle.push(JobEvent::Cancelled);
        }
        self.inner.wake.notify_all();
    }

    /// Seconds a client refused for load should wait: the queued and running work at the
    /// throughput measured so far (1–120 s).
    pub fn retry_after_secs(&self) -> u64 {
        retry_after(&self.inner.dispatch.lock().unwrap())
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let (queued, in_flight) = {
            let d = self.inner.dispatch.lock().unwrap();
            (d.admission.queued() as u64, d.admission.running() as u64)
        };
        EngineStats {
            submitted: l(&c.submitted),
            rejected: l(&c.rejected),
            completed: l(&c.completed),
            failed: l(&c.failed),
            cancelled_queued: l(&c.cancelled_queued),
            cancelled_running: l(&c.cancelled_running),
            steps: l(&c.steps),
            denoiser_evals: l(&c.denoiser_evals),
            queued,
            in_flight,
            ticks: l(&self.inner.gauges.ticks),
            batch_rows: l(&self.inner.gauges.rows),
            max_batch_rows: self.inner.gauges.max_rows.load(Ordering::SeqCst) as u64,
            shared_ticks: l(&self.inner.gauges.shared_ticks),
            forward_secs: l(&self.inner.gauges.forward_nanos) as f64 * 1e-9,
            tick_secs: l(&self.inner.gauges.tick_nanos) as f64 * 1e-9,
        }
    }

    /// Stop accepting jobs; queued and running ones finish (see [`Engine::drain`]).
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
    }

    /// True once [`Engine::shutdown`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Stop accepting jobs and wait up to `grace` for the queued and running ones; whatever is
    /// left then is cancelled. Returns true when everything finished in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.shutdown();
        let t0 = Instant::now();
        loop {
            if self.inner.live.lock().unwrap().is_empty() {
                return true;
            }
            if t0.elapsed() >= grace {
                self.cancel_all();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancel every queued and running job.
    pub fn cancel_all(&self) {
        let live: Vec<Arc<JobHandle>> = self.inner.live.lock().unwrap().values().cloned().collect();
        for h in live {
            self.cancel(&h);
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.inner.opts
    }
}

fn retry_after(d: &Dispatch) -> u64 {
    let work = d.admission.queued_cost() as f64 + d.running_cost as f64;
    let secs = match d.throughput.per_sec() {
        Some(rate) if rate > 0.0 => work / rate,
        _ => 1.0 + d.admission.queued() as f64,
    };
    (secs.ceil() as u64).clamp(1, 120)
}

fn register(inner: &Inner, loaded: Result<Loaded, String>) {
    let loaded = match loaded {
        Ok(l) => l,
        Err(msg) => {
            tracing::error!("model loading failed: {msg}");
            *inner.state.write().unwrap() = EngineState::Failed(msg);
            return;
        }
    };
    for f in &loaded.failures {
        tracing::error!("model `{}` failed to load: {}", f.name, f.error);
    }
    *inner.failures.write().unwrap() = loaded.failures.clone();
    if loaded.models.is_empty() {
        let msg = if loaded.failures.is_empty() {
            "no models were loaded".to_string()
        } else {
            let list: Vec<String> = loaded.failures.iter().map(|f| format!("{}: {}", f.name, f.error)).collect();
            format!("no model loaded ({})", list.join("; "))
        };
        *inner.state.write().unwrap() = EngineState::Failed(msg);
        return;
    }
    let mut models = BTreeMap::new();
    for lm in loaded.models {
        let summary = ModelSummary {
            name: lm.name.clone(),
            info: lm.model.info().clone(),
            created: lm.created,
            default_scheduler: lm.model.info().defaults.sampler,
        };
        models.insert(lm.name, (summary, lm.model));
    }
    let names = || models.keys().cloned().collect::<Vec<_>>().join(", ");
    let default = match &inner.opts.default_model {
        Some(d) if models.contains_key(d) => d.clone(),
        Some(d) => {
            let msg = match loaded.failures.iter().find(|f| &f.name == d) {
                Some(f) => format!("the default model `{d}` failed to load: {}", f.error),
                None => format!("default model `{d}` is not among the loaded models ({})", names()),
            };
            tracing::error!("{msg}");
            *inner.state.write().unwrap() = EngineState::Failed(msg);
            return;
        }
        // The embedded shapes-world model when it is there, else the first by name.
        None if models.contains_key(crate::config::EMBEDDED_DEFAULT_MODEL) => {
            crate::config::EMBEDDED_DEFAULT_MODEL.to_string()
        }
        None => models.keys().next().cloned().expect("non-empty"),
    };
    tracing::info!("loaded {} model(s): {} (default: {default})", models.len(), names());
    metrics::gauge!(m::MODELS_LOADED).set(models.len() as f64);
    *inner.registry.write().unwrap() = Some(Arc::new(Registry { models, default }));
    *inner.state.write().unwrap() = EngineState::Ready;
}

/// Admit jobs as memory frees up; each admitted job gets a thread.
fn dispatcher(weak: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let mut d = inner.dispatch.lock().unwrap();
        while let Some((seq, bytes)) = d.admission.admit_next() {
            let Some(w) = d.waiting.remove(&seq) else {
                d.admission.finish(bytes);
                continue;
            };
            metrics::gauge!(m::QUEUE_DEPTH).set(d.admission.queued() as f64);
            metrics::gauge!(m::QUEUED_COST).set(d.admission.queued_cost() as f64);
            metrics::gauge!(m::RUNNING_BYTES).set(d.admission.running_bytes() as f64);
            if d.admission.running() == 1 {
                d.throughput.busy_since = Some(Instant::now());
            }
            d.running_cost = d.running_cost.saturating_add(w.estimate.cost);
            let inner2 = inner.clone();
            // Count the job as active before its thread starts, so the scheduler waits for it.
            inner.gauges.active_jobs.fetch_add(1, Ordering::SeqCst);
            let spawned =
                std::thread::Builder::new().name(format!("tiller-job-{seq}")).spawn(move || run_job(&inner2, w, bytes));
            if let Err(e) = spawned {
                tracing::error!("cannot start a job thread: {e}");
                inner.gauges.active_jobs.fetch_sub(1, Ordering::SeqCst);
                d.admission.finish(bytes);
            }
            metrics::gauge!(m::JOBS_IN_FLIGHT).set(d.admission.running() as f64);
        }
        let idle = d.admission.queued() == 0 && d.admission.running() == 0;
        if inner.stopping.load(Ordering::SeqCst) && idle {
            // Let the scheduler exit once the last job thread drops its sender.
            inner.forward_tx.lock().unwrap().take();
            return;
        }
        let (d, _) = inner.wake.wait_timeout(d, Duration::from_millis(200)).unwrap();
        drop(d);
    }
}

/// The steps after which previews are decoded: `count` evenly spaced steps before the last.
pub fn preview_steps(count: usize, total: usize) -> Vec<usize> {
    let mut v: Vec<usize> =
        (1..=count).map(|j| (total * j).div_ceil(count + 1)).filter(|&s| s >= 1 && s < total).collect();
    v.dedup();
    v
}

fn run_job(inner: &Arc<Inner>, w: Waiting, bytes: u64) {
    let c = &inner.counters;
    let handle = w.handle.clone();
    let request_id = w.job.request_id.as_deref().unwrap_or("");
    let _span = tracing::info_span!("job", job_id = %handle.id, request_id = %request_id).entered();
    let label = w.model_name.clone();
    let queue_wait = handle.submitted.elapsed();
    metrics::histogram!(m::QUEUE_WAIT).record(queue_wait.as_secs_f64());
    let t0 = Instant::now();
    let result = if handle.is_cancelled() {
        Err(JobEnd::Cancelled(None))
    } else {
        handle.push(JobEvent::Started);
        std::panic::catch_unwind(AssertUnwindSafe(|| execute(inner, &w, queue_wait)))
            .unwrap_or_else(|p| Err(JobEnd::Panic(scheduler::panic_message(&p))))
    };
    inner.gauges.active_jobs.fetch_sub(1, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    let (outcome, event) = match result {
        Ok(out) => {
            c.completed.fetch_add(1, Ordering::Relaxed);
            c.denoiser_evals.fetch_add(out.denoiser_evals as u64, Ordering::Relaxed);
            metrics::counter!(m::DENOISER_EVALS, "model" => label.clone()).increment(out.denoiser_evals as u64);
            metrics::histogram!(m::JOB_DENOISER_EVALS).record(out.denoiser_evals as f64);
            metrics::counter!(m::REWARD_EVALS, "model" => label.clone()).increment(out.reward_evals as u64);
            metrics::counter!(m::IMAGES, "model" => label.clone()).increment(out.images.len() as u64);
            ("completed", JobEvent::Completed(Arc::new(out)))
        }
        Err(JobEnd::Cancelled(spent)) => {
            // The work a cancelled job did still counts.
            if let Some(s) = spent {
                c.denoiser_evals.fetch_add(s.denoiser_evals as u64, Ordering::Relaxed);
                metrics::counter!(m::DENOISER_EVALS, "model" => label.clone()).increment(s.denoiser_evals as u64);
                metrics::counter!(m::REWARD_EVALS, "model" => label.clone()).increment(s.reward_evals as u64);
            }
            if handle.status() == JobStatus::Queued {
                c.cancelled_queued.fetch_add(1, Ordering::Relaxed);
            } else {
                c.cancelled_running.fetch_add(1, Ordering::Relaxed);
                tracing::info!("job {} on `{label}` cancelled", handle.id);
            }
            ("cancelled", JobEvent::Cancelled)
        }
        Err(JobEnd::Error(e)) => {
            if !matches!(e, JobError::Invalid(_)) {
                c.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("job {} on `{label}` failed: {e}", handle.id);
            }
            (if matches!(e, JobError::Invalid(_)) { "invalid" } else { "failed" }, JobEvent::Failed(e))
        }
        Err(JobEnd::Panic(msg)) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("job {} on `{label}` panicked: {msg}", handle.id);
            ("failed", JobEvent::Failed(JobError::Failed(format!("internal error: {msg}"))))
        }
    };
    metrics::counter!(m::JOBS, "model" => label.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!(m::JOB_DURATION, "model" => label, "outcome" => outcome).record(elapsed);
    {
        let mut d = inner.dispatch.lock().unwrap();
        d.admission.finish(bytes);
        metrics::gauge!(m::JOBS_IN_FLIGHT).set(d.admission.running() as f64);
        d.running_cost = d.running_cost.saturating_sub(w.estimate.cost);
        if outcome == "completed" {
            d.throughput.done_cost = d.throughput.done_cost.saturating_add(w.estimate.cost);
        }
        if d.admission.running() == 0 {
            if let Some(t) = d.throughput.busy_since.take() {
                d.throughput.busy += t.elapsed();
            }
        }
        metrics::gauge!(m::RUNNING_BYTES).set(d.admission.running_bytes() as f64);
    }
    inner.live.lock().unwrap().remove(&handle.seq);
    handle.push(event);
    inner.wake.notify_all();
}

enum JobEnd {
    /// With the work done before it stopped, when it had started.
    Cancelled(Option<crate::pipeline::Spent>),
    Error(JobError),
    Panic(String),
}

fn execute(inner: &Arc<Inner>, w: &Waiting, queue_wait: Duration) -> Result<JobOutput, JobEnd> {
    let handle = &w.handle;
    let job = &w.job;
    let steps = crate::steering::resolve(w.model.info(), &job.params, &job.steering.spec).steps;
    let (variant_model, variant) = {
        let mut cache = inner.variants.lock().unwrap();
        cache.get_for_steps(&w.model_name, &w.model, &job.adapters, Some(steps)).map_err(|e| {
            JobEnd::Error(JobError::Invalid(crate::error::FieldError::invalid("adapters", e.to_string())))
        })?
    };
    if let Some(v) = &variant {
        metrics::histogram!(m::ADAPTER_VARIANT_SECONDS, "cached" => if v.cached { "true" } else { "false" })
            .record(v.build_ms / 1e3);
    }
    // ReNO records a gradient graph through its denoiser calls: it runs them on its own thread.
    let route = match (&job.steering.spec, inner.forward_tx.lock().unwrap().as_ref()) {
        (SteeringSpec::Reno(_), _) | (_, None) => scheduler::Route::Direct,
        (_, Some(tx)) => scheduler::Route::Batched(tx.clone()),
    };
    let model = scheduler::JobModel {
        inner: variant_model.clone(),
        route,
        handle: handle.clone(),
        decode_chunk: inner.opts.decode_chunk,
    };
    let previews = preview_steps(job.partial_images.min(3), steps);
    let mut next_preview = 0usize;
    let label = w.model_name.clone();
    let c = &inner.counters;
    let mut progress = |p: crate::pipeline::Progress| {
        c.steps.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DENOISING_STEPS, "model" => label.clone()).increment(1);
        handle.push(JobEvent::Step { step: p.step, total: p.total });
        if next_preview < previews.len() && previews[next_preview] <= p.step {
            if let Some(x0) = &p.x0 {
                if let Some(image) = preview(variant_model.as_ref(), x0, job.encoding) {
                    handle.push(JobEvent::Partial { index: next_preview, image: Arc::new(image) });
                }
            }
            next_preview += 1;
        }
        !handle.is_cancelled()
    };
    let out = match crate::steering::generate(&model, &job.params, &job.steering, &mut progress) {
        Ok(out) => out,
        Err(GenerationError::Cancelled(spent)) => return Err(JobEnd::Cancelled(Some(spent))),
        Err(_) if handle.is_cancelled() => return Err(JobEnd::Cancelled(None)),
        Err(e) => return Err(JobEnd::Error(job_error(e))),
    };
    let parameters = |i: usize| {
        let info = crate::util::encode::GenerationInfo {
            prompt: &job.params.prompt,
            negative_prompt: job.params.negative_prompt.as_deref(),
            steps: out.params.steps,
            sampler: out.params.scheduler,
            guidance_scale: out.params.guidance_scale,
            seed: out.seeds[i],
            width: out.params.width,
            height: out.params.height,
            eta: out.params.eta,
            model: &w.model_name,
            adapters: job.adapters.items.iter().map(|(a, scale)| (a.name.as_str(), *scale)).collect(),
            steering: match job.steering.spec {
                crate::steering::SteeringSpec::None => None,
                ref spec => serde_json::to_string(spec).ok(),
            },
            reward: job.steering.reward.as_ref().map(|r| r.name()),
        };
        Some(crate::util::encode::a1111_parameters(&info))
    };
    let files = crate::util::encode::encode_batch_as(&out.steered.decoded, job.encoding, parameters)
        .map_err(|e| JobEnd::Error(JobError::Failed(format!("cannot encode the images: {e}"))))?;
    let mut metrics: Vec<Vec<(String, f32)>> = vec![Vec::new(); out.seeds.len()];
    for (name, reward) in &job.metrics.0 {
        let scores = reward
            .score(&out.steered.decoded, &job.params.prompt)
            .map_err(|e| JobEnd::Error(job_error(GenerationError::Reward(e))))?;
        for (m, s) in metrics.iter_mut().zip(scores) {
            m.push((name.clone(), s));
        }
    }
    let st = out.steered;
    let images = files
        .into_iter()
        .zip(out.seeds.iter())
        .zip(st.images)
        .zip(metrics)
        .map(|(((encoded, &seed), img), metrics)| GeneratedImage {
            encoded,
            metrics,
            seed,
            reward: img.reward,
            trace: img.trace,
            optimized_noise: img.optimized_noise,
        })
        .collect();
    Ok(JobOutput {
        model: w.model_name.clone(),
        images,
        params: out.params,
        denoiser_evals: st.denoiser_evals,
        reward_evals: st.reward_evals,
        backward_evals: st.backward_evals,
        timings: st.timings,
        queue_ms: queue_wait.as_secs_f64() * 1e3,
        prompt_truncated: st.prompt_truncated,
        method: job.steering.spec.method(),
        reward: job.steering.reward.as_ref().map(|r| r.name().to_string()),
        variant,
    })
}

/// Decode row 0 of `x0` to an image file (a preview; failures only skip it).
fn preview(
    model: &dyn DiffusionModel,
    x0: &candle_core::Tensor,
    encoding: crate::util::encode::Encoding,
) -> Option<Vec<u8>> {
    let img = model.decode(&x0.narrow(0, 0, 1).ok()?).ok()?;
    crate::util::encode::encode_batch_as(&img, encoding, |_| None).ok()?.into_iter().next()
}

fn job_error(e: GenerationError) -> JobError {
    match e {
        GenerationError::Cancelled(_) => JobError::Cancelled,
        GenerationError::InvalidInput(f) => JobError::Invalid(f),
        GenerationError::Reward(e) => match e {
            RewardError::Invalid(f) => JobError::Invalid(f),
            RewardError::Upstream { .. } => JobError::Upstream(e.to_string()),
            RewardError::Timeout { .. } => JobError::UpstreamTimeout(e.to_string()),
            RewardError::Candle(e) => JobError::Failed(e.to_string()),
        },
        GenerationError::Candle(e) => JobError::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::preview_steps;

    #[test]
    fn previews_are_spread_before_the_last_step() {
        assert_eq!(preview_steps(0, 20), Vec::<usize>::new());
        assert_eq!(preview_steps(1, 20), vec![10]);
        assert_eq!(preview_steps(3, 20), vec![5, 10, 15]);
        assert_eq!(preview_steps(3, 4), vec![1, 2, 3]);
        assert_eq!(preview_steps(3, 2), vec![1]);
        assert_eq!(preview_steps(2, 1), Vec::<usize>::new());
    }
}
