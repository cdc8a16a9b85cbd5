//! The process-wide Prometheus recorder and the names of tiller's metrics.
//!
//! `metrics` allows one global recorder per process, but tests start several servers in one
//! process, so the recorder is installed at most once ([`prometheus`]) and shared.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP requests by `route`, `method`, `status` and `model` (counter).
pub const HTTP_REQUESTS: &str = "tiller_http_requests_total";
/// HTTP request latency in seconds, same labels (histogram).
pub const HTTP_DURATION: &str = "tiller_http_request_duration_seconds";
/// Jobs waiting in the engine queue (gauge).
pub const QUEUE_DEPTH: &str = "tiller_queue_depth";
/// Jobs being generated right now (gauge).
pub const JOBS_IN_FLIGHT: &str = "tiller_jobs_in_flight";
/// Finished jobs by `model` and `outcome` = completed | cancelled | failed (counter).
pub const JOBS: &str = "tiller_jobs_total";
/// Requests refused because the queue was full (counter).
pub const QUEUE_REJECTED: &str = "tiller_queue_rejected_total";
/// Job run time on the worker by `model` and `outcome`, in seconds (histogram).
pub const JOB_DURATION: &str = "tiller_job_duration_seconds";
/// Time jobs waited in the queue, in seconds (histogram).
pub const QUEUE_WAIT: &str = "tiller_queue_wait_seconds";
/// Denoiser (UNet) evaluations by `model`, counting each CFG branch (counter).
pub const DENOISER_EVALS: &str = "tiller_denoiser_evaluations_total";
pub const REWARD_EVALS: &str = "tiller_reward_evaluations_total";
pub const ADAPTER_VARIANT_SECONDS: &str = "tiller_adapter_variant_seconds";
/// Denoising steps run by `model` (counter).
pub const DENOISING_STEPS: &str = "tiller_denoising_steps_total";
/// Images returned by `model` (counter).
pub const IMAGES: &str = "tiller_images_generated_total";
/// Models loaded and ready (gauge).
pub const MODELS_LOADED: &str = "tiller_models_loaded";
/// Denoiser rows in each engine tick (histogram).
pub const TICK_ROWS: &str = "tiller_batch_rows";
/// Wall time of each engine tick's forward, in seconds (histogram).
pub const TICK_SECONDS: &str = "tiller_tick_seconds";
/// Estimated work waiting for admission: denoiser rows × latent elements × steps (gauge).
pub const QUEUED_COST: &str = "tiller_queued_cost";
/// Estimated peak memory of the running jobs, bytes (gauge).
pub const RUNNING_BYTES: &str = "tiller_running_memory_bytes";
/// Denoiser evaluations per finished job, counting each CFG branch (histogram).
pub const JOB_DENOISER_EVALS: &str = "tiller_job_denoiser_evaluations";
/// Requests refused because their memory estimate exceeds the budget (counter).
pub const MEMORY_REJECTED: &str = "tiller_memory_rejected_total";

const ROW_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const EVAL_BUCKETS: &[f64] = &[1.0, 4.0, 10.0, 40.0, 100.0, 400.0, 1000.0, 4000.0, 10000.0];

const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The shared Prometheus handle, installing the global recorder on first use. If another
/// recorder is already installed (tiller embedded in a larger program), a private recorder is
/// built instead; `/metrics` then renders only what it sees (nothing).
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(TICK_ROWS.into()), ROW_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(JOB_DENOISER_EVALS.into()), EVAL_BUCKETS))
                .expect("non-empty buckets")
        };
        match builder().install_recorder() {
            Ok(handle) => {
                describe();
                handle
            }
            Err(e) => {
                tracing::warn!("a global metrics recorder is already installed ({e}); /metrics will be empty");
                builder().build_recorder().handle()
            }
        }
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route, method, status and model");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request latency");
    describe_gauge!(QUEUE_DEPTH, "Jobs waiting in the engine queue");
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs being generated");
    describe_counter!(JOBS, "Finished jobs by model and outcome (completed, cancelled, failed)");
    describe_counter!(QUEUE_REJECTED, "Requests refused because the queue was full");
    describe_histogram!(JOB_DURATION, Unit::Seconds, "Job run time on the worker");
    describe_histogram!(QUEUE_WAIT, Unit::Seconds, "Time jobs waited in the queue");
    describe_counter!(DENOISER_EVALS, "Denoiser evaluations, counting each CFG branch");
    describe_counter!(REWARD_EVALS, "Images scored by steering rewards");
    metrics::describe_histogram!(
        ADAPTER_VARIANT_SECONDS,
        "Time to obtain an adapter variant (cached = lookup, else merge or unmerged build)"
    );
    describe_counter!(DENOISING_STEPS, "Denoising steps run");
    describe_counter!(IMAGES, "Images generated");
    describe_gauge!(MODELS_LOADED, "Models loaded and ready");
    describe_histogram!(TICK_ROWS, "Denoiser rows per engine tick (one batched forward)");
    describe_histogram!(TICK_SECONDS, Unit::Seconds, "Wall time of each engine tick's forward");
    describe_gauge!(QUEUED_COST, "Work waiting for admission (rows x latent elements x steps)");
    describe_gauge!(RUNNING_BYTES, "Estimated peak memory of the running jobs");
    describe_histogram!(JOB_DENOISER_EVALS, "Denoiser evaluations per finished job");
    describe_counter!(MEMORY_REJECTED, "Requests refused because they would not fit the memory budget");
}
