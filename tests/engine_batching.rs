//! The engine on the shipped default model (`models/shapes`): denoiser rows of concurrent
//! requests share forwards, a request's bytes do not depend on what shared them, a short request
//! is not held behind a long steered job, cancellation stops a job within one step, and
//! admission refuses what would not fit the memory budget.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use tiller::engine::{Engine, EngineOptions, Job, JobEvent, JobHandle, LoadedModel, SubmitError};
use tiller::pipeline::GenerationParams;
use tiller::reward::RewardRegistry;
use tiller::steering::{SteeringRequest, SteeringSpec};

fn shapes_engine(opts: EngineOptions) -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/shapes");
    let model = tiller::models::loader::load_model("shapes", &dir, &Device::Cpu, DType::F32).unwrap();
    let engine = Engine::with_models(vec![LoadedModel::new("shapes", model)], opts);
    engine.wait_ready_blocking(Duration::from_secs(60));
    engine
}

fn job(prompt: &str, steps: usize, seed: u64) -> Job {
    Job {
        model: None,
        params: GenerationParams { prompt: prompt.into(), n: 1, steps: Some(steps), seed, ..Default::default() },
        ..Default::default()
    }
}

fn fk_job(prompt: &str, particles: usize, steps: usize, seed: u64) -> Job {
    let rewards = RewardRegistry::new(&Default::default(), &Device::Cpu).unwrap();
    let reward = rewards.build(&serde_json::from_value(serde_json::json!("brightness")).unwrap()).unwrap();
    let spec: SteeringSpec = serde_json::from_value(
        serde_json::json!({"method": "fk", "particles": particles, "resample": {"every": 5, "start": 0, "end": 1}}),
    )
    .unwrap();
    Job { steering: SteeringRequest { spec, reward: Some(reward), trace: false }, ..job(prompt, steps, seed) }
}

async fn pngs(h: &Arc<JobHandle>) -> Vec<Vec<u8>> {
    match h.wait().await {
        JobEvent::Completed(out) => out.images.iter().map(|i| i.encoded.clone()).collect(),
        other => panic!("job ended with {other:?}"),
    }
}

const PROMPTS: [&str; 8] = [
    "a red circle",
    "a blue square",
    "two green triangles",
    "a yellow circle above a red square",
    "three blue circles",
    "a green square left of a red circle",
    "a purple triangle",
    "an orange circle",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_forwards_and_keep_their_bytes() {
    let engine = shapes_engine(EngineOptions::default());
    // Alone, one at a time.
    let mut alone = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let h = engine.submit(job(p, 8, 100 + i as u64)).unwrap();
        alone.push(pngs(&h).await);
    }
    let before = engine.stats();
    assert_eq!(before.shared_ticks, 0, "requests one at a time never share a forward");
    // All eight at once: their rows share forwards.
    let handles: Vec<_> =
        PROMPTS.iter().enumerate().map(|(i, p)| engine.submit(job(p, 8, 100 + i as u64)).unwrap()).collect();
    for (h, want) in handles.iter().zip(&alone) {
        assert_eq!(&pngs(h).await, want, "an image changed when its rows shared forwards with others");
    }
    let after = engine.stats();
    let shared = after.shared_ticks - before.shared_ticks;
    assert!(shared > 0, "no forward held rows of two requests: {after:?}");
    assert!(after.max_batch_rows > 2, "largest forward had {} rows", after.max_batch_rows);
    assert!(after.max_batch_rows <= 16, "limits.max_batch_rows (16) exceeded: {}", after.max_batch_rows);
    // Fewer forwards than one per request per step (8 requests × 8 steps = 64 alone).
    let ticks = after.ticks - before.ticks;
    assert!(ticks < 64, "{ticks} forwards for 64 request-steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_request_is_not_held_behind_a_long_steered_job() {
    let engine = shapes_engine(EngineOptions::default());
    let fk_alone = pngs(&engine.submit(fk_job("a red circle", 4, 30, 7)).unwrap()).await;
    let short_alone = pngs(&engine.submit(job("a blue square", 4, 9)).unwrap()).await;

    let fk = engine.submit(fk_job("a red circle", 4, 30, 7)).unwrap();
    // Let the FK job get going, then send the short one.
    while fk.progress().is_none_or(|(s, _)| s < 3) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let short = engine.submit(job("a blue square", 4, 9)).unwrap();
    let short_png = pngs(&short).await;
    let (fk_step, fk_total) = fk.progress().unwrap();
    assert!(fk_step < fk_total, "the short request waited for the whole FK job ({fk_step}/{fk_total})");
    assert_eq!(short_png, short_alone, "the short request's image changed under load");
    assert_eq!(pngs(&fk).await, fk_alone, "the FK job's image changed when a short request joined it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_steered_job_within_one_step() {
    let engine = shapes_engine(EngineOptions::default());
    let h = engine.submit(fk_job("a red circle", 8, 50, 1)).unwrap();
    while h.progress().is_none_or(|(s, _)| s < 2) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    engine.cancel(&h);
    let at_cancel = h.progress().unwrap().0;
    assert!(matches!(h.wait().await, JobEvent::Cancelled));
    let last = h.progress().unwrap().0;
    assert!(last <= at_cancel + 1, "ran from step {at_cancel} to {last} after the cancel");
    let st = engine.stats();
    assert_eq!((st.cancelled_running, st.in_flight), (1, 0));
    // The forwards it ran still count: 8 particles × 2 CFG branches per completed step.
    assert!(st.denoiser_evals >= (last as u64) * 16, "{} evaluations for {last} steps", st.denoiser_evals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_what_cannot_fit_and_queues_what_can_later() {
    // 64 MiB: an FK job with 64 particles at 128×128 cannot fit; plain requests can.
    let engine = shapes_engine(EngineOptions { memory_budget_bytes: 64 << 20, ..Default::default() });
    let mut big = fk_job("a red circle", 64, 10, 1);
    big.params.width = Some(128);
    big.params.height = Some(128);
    let est = engine.estimate(&big).unwrap();
    assert!(est.bytes > 64 << 20, "{est:?}");
    match engine.submit(big) {
        Err(SubmitError::TooLarge { needed_mib, budget_mib: 64, field: "steering" }) => assert!(needed_mib > 64),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let small = engine.estimate(&job("a red circle", 4, 1)).unwrap();
    assert!(small.bytes < 64 << 20, "{small:?}");
    let hs: Vec<_> = (0..6).map(|i| engine.submit(job("a red circle", 4, i)).unwrap()).collect();
    for h in &hs {
        pngs(h).await;
    }
}

#[test]
fn memory_estimates_grow_with_size_and_rows() {
    let engine = shapes_engine(EngineOptions::default());
    let at = |size: usize, n: usize| {
        let mut j = job("x", 1, 1);
        j.params.width = Some(size);
        j.params.height = Some(size);
        j.params.n = n;
        engine.estimate(&j).unwrap().bytes
    };
    // The 1024×1024 request that used to abort the process: attention scores alone are
    // 4 heads × 16384² tokens × 4 bytes = 4 GiB per row, two rows with guidance.
    assert!(at(1024, 1) > 8 << 30, "{}", at(1024, 1));
    assert!(at(1024, 4) > at(1024, 1));
    assert!(at(128, 1) > at(64, 1));
}
