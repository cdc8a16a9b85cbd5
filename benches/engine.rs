//! The engine under concurrent load on the shipped default model (`models/shapes`, 64×64,
//! DDIM, guidance 7.5), everything measured in one run so the ratios compare like with like:
//!
//! 1. Eight different prompts (20 steps, n = 1): one after another, as one request with n = 8,
//!    and as eight concurrent requests. Throughput ratios against the sequential run.
//! 2. Throughput with 1, 2, 4, 8 and 16 concurrent clients (each client sends requests back to
//!    back; 16 requests in all), against the same 16 requests one at a time.
//! 3. Mixed load: 4-step requests sent one after another while a 50-step FK job with 8
//!    particles runs; their p50 / max latency against the same requests alone.
//! 4. Scheduler overhead: time per tick outside the model's forward, on the analytic
//!    Gaussian-mixture model (whose forward is nearly free) with 16 concurrent jobs.
//!
//! `cargo bench --bench engine` prints markdown tables; `-- quick` runs smaller sizes (CI smoke).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tiller::engine::{Engine, EngineOptions, Job, JobEvent, JobHandle, LoadedModel};
use tiller::pipeline::GenerationParams;
use tiller::reward::RewardRegistry;
use tiller::steering::{SteeringRequest, SteeringSpec};

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

fn load(name: &str) -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
    let model = tiller::models::loader::load_model(name, &dir, &Device::Cpu, DType::F32).unwrap();
    let engine = Engine::with_models(vec![LoadedModel::new(name, model)], EngineOptions::default());
    engine.wait_ready_blocking(Duration::from_secs(60));
    engine
}

fn job(prompt: &str, steps: usize, n: usize, seed: u64) -> Job {
    Job {
        params: GenerationParams { prompt: prompt.into(), n, steps: Some(steps), seed, ..Default::default() },
        ..Default::default()
    }
}

fn fk(prompt: &str, particles: usize, steps: usize) -> Job {
    let rewards = RewardRegistry::new(&Default::default(), &Device::Cpu).unwrap();
    let reward = rewards.build(&serde_json::from_value(serde_json::json!("brightness")).unwrap()).unwrap();
    let spec: SteeringSpec =
        serde_json::from_value(serde_json::json!({"method": "fk", "particles": particles})).unwrap();
    Job { steering: SteeringRequest { spec, reward: Some(reward), trace: false }, ..job(prompt, steps, 1, 1) }
}

async fn finish(h: Arc<JobHandle>) {
    let out = match h.wait().await {
        JobEvent::Completed(out) => out,
        other => panic!("job ended with {other:?}"),
    };
    let t = &out.timings;
    let mut p = PHASES.lock().unwrap();
    p.0 += t.encode_ms;
    p.1 += t.decode_ms;
}

/// Prompt encoding and final decoding, ms, summed over the jobs finished since the last reset.
static PHASES: std::sync::Mutex<(f64, f64)> = std::sync::Mutex::new((0.0, 0.0));

fn take_phases() -> (f64, f64) {
    std::mem::take(&mut *PHASES.lock().unwrap())
}

/// Run `jobs` with `clients` concurrent clients, each taking the next job when its last one
/// finished; returns the wall time.
async fn closed_loop(engine: &Engine, jobs: Vec<Job>, clients: usize) -> f64 {
    let queue = Arc::new(std::sync::Mutex::new(jobs));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (engine, queue) = (engine.clone(), queue.clone());
            tokio::spawn(async move {
                loop {
                    let Some(j) = queue.lock().unwrap().pop() else { break };
                    finish(engine.submit(j).unwrap()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    t0.elapsed().as_secs_f64()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn run(quick: bool) {
    let engine = load("shapes");
    let steps = if quick { 4 } else { 20 };
    // Warm-up (first-touch allocations, rayon pool).
    finish(engine.submit(job("a red circle", 2, 1, 0)).unwrap()).await;

    // 1. Eight prompts: sequential, n = 8, concurrent.
    let eight = |seed: u64| -> Vec<Job> { PROMPTS.iter().map(|p| job(p, steps, 1, seed)).collect() };
    take_phases();
    let seq = closed_loop(&engine, eight(1), 1).await;
    let seq_phases = take_phases();
    // The n = 8 request and the eight concurrent requests alternate for three rounds, so slow
    // drift of the machine (forward time varies by a few per cent from run to run) falls on both.
    let rounds = if quick { 1 } else { 3 };
    let (mut n8s, mut concs, mut n8_fwd, mut conc_fwd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut n8_phases, mut conc_phases) = ((0.0, 0.0), (0.0, 0.0));
    let (mut ticks, mut rows) = (0, 0);
    for _ in 0..rounds {
        let before = engine.stats();
        let t0 = Instant::now();
        finish(engine.submit(job(PROMPTS[0], steps, 8, 1)).unwrap()).await;
        n8s.push(t0.elapsed().as_secs_f64());
        n8_fwd.push(engine.stats().forward_secs - before.forward_secs);
        n8_phases = take_phases();
        let before = engine.stats();
        concs.push(closed_loop(&engine, eight(1), 8).await);
        let after = engine.stats();
        conc_fwd.push(after.forward_secs - before.forward_secs);
        conc_phases = take_phases();
        ticks = after.ticks - before.ticks;
        rows = after.batch_rows - before.batch_rows;
    }
    let ratios: Vec<f64> = n8s.iter().zip(&concs).map(|(a, b)| a / b).collect();
    let (n8, conc) = (percentile(n8s.clone(), 0.5), percentile(concs.clone(), 0.5));
    println!("\n### Eight requests ({steps} DDIM steps, n = 1, CFG 7.5, 64×64)\n");
    println!("| run | wall s | images/s | vs sequential |");
    println!("|---|---|---|---|");
    println!("| one after another | {seq:.2} | {:.2} | 1.00× |", 8.0 / seq);
    println!("| one request, n = 8 (median of {rounds}) | {n8:.2} | {:.2} | {:.2}× |", 8.0 / n8, seq / n8);
    println!("| eight concurrent (median of {rounds}) | {conc:.2} | {:.2} | {:.2}× |", 8.0 / conc, seq / conc);
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    println!(
        "\nRounds, wall s: n = 8 {}; concurrent {}; concurrent throughput / n = 8 throughput {} (median {:.2}).",
        list(&n8s),
        list(&concs),
        list(&ratios),
        percentile(ratios.clone(), 0.5)
    );
    println!(
        "Seconds inside forwards: n = 8 {}; concurrent {}. Last concurrent round: {ticks} forwards, {:.1} rows per \
         forward on average.",
        list(&n8_fwd),
        list(&conc_fwd),
        rows as f64 / ticks.max(1) as f64,
    );
    println!(
        "Prompt encoding / final decoding, ms summed over the jobs (last round): sequential {:.0} / {:.0}, n = 8 \
         {:.0} / {:.0}, concurrent {:.0} / {:.0}.",
        seq_phases.0, seq_phases.1, n8_phases.0, n8_phases.1, conc_phases.0, conc_phases.1
    );
    if std::env::args().any(|a| a == "eight") {
        return;
    }

    // 2. Concurrency sweep.
    let total = if quick { 8 } else { 16 };
    let jobs = |seed: u64| -> Vec<Job> { (0..total).map(|i| job(PROMPTS[i % 8], steps, 1, seed + i as u64)).collect() };
    let base = closed_loop(&engine, jobs(100), 1).await;
    println!("\n### Throughput by concurrency ({total} requests, {steps} steps each)\n");
    println!("| clients | wall s | images/s | vs one at a time | batching |");
    println!("|---|---|---|---|---|");
    println!("| 1 | {base:.2} | {:.2} | 1.00× | |", total as f64 / base);
    for c in [2, 4, 8, 16] {
        if c > total {
            break;
        }
        let before = engine.stats();
        let w = closed_loop(&engine, jobs(100), c).await;
        let after = engine.stats();
        let ticks = (after.ticks - before.ticks).max(1);
        println!(
            "| {c} | {w:.2} | {:.2} | {:.2}× | {:.1} rows/forward, {:.0}% of the time in forwards |",
            total as f64 / w,
            base / w,
            (after.batch_rows - before.batch_rows) as f64 / ticks as f64,
            100.0 * (after.forward_secs - before.forward_secs) / w
        );
    }

    // 3. Mixed load: short requests while a long FK job runs.
    let shorts = if quick { 3 } else { 8 };
    let (fk_steps, particles) = if quick { (20, 4) } else { (50, 8) };
    let mut alone = Vec::new();
    for i in 0..shorts {
        let t0 = Instant::now();
        finish(engine.submit(job(PROMPTS[i % 8], 4, 1, 500 + i as u64)).unwrap()).await;
        alone.push(t0.elapsed().as_secs_f64());
    }
    let t0 = Instant::now();
    let long = engine.submit(fk(PROMPTS[0], particles, fk_steps)).unwrap();
    while long.progress().is_none_or(|(s, _)| s < 2) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut loaded = Vec::new();
    for i in 0..shorts {
        let t = Instant::now();
        finish(engine.submit(job(PROMPTS[i % 8], 4, 1, 500 + i as u64)).unwrap()).await;
        loaded.push(t.elapsed().as_secs_f64());
    }
    let fk_done_at = long.progress().map(|p| p.0).unwrap_or(0);
    finish(long).await;
    let fk_wall = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    finish(engine.submit(fk(PROMPTS[0], particles, fk_steps)).unwrap()).await;
    let fk_alone = t0.elapsed().as_secs_f64();
    let (a50, l50) = (percentile(alone.clone(), 0.5), percentile(loaded.clone(), 0.5));
    let (amax, lmax) = (percentile(alone, 1.0), percentile(loaded, 1.0));
    println!("\n### Mixed load: 4-step requests during a {fk_steps}-step FK job with {particles} particles\n");
    println!("| | p50 s | max s |");
    println!("|---|---|---|");
    println!("| 4-step request alone | {a50:.3} | {amax:.3} |");
    println!("| 4-step request during the FK job | {l50:.3} | {lmax:.3} |");
    println!("| ratio | {:.2}× | {:.2}× |", l50 / a50, lmax / amax);
    println!(
        "\nThe FK job was at step {fk_done_at}/{fk_steps} when the last short request finished; it took \
         {fk_wall:.2} s with them and {fk_alone:.2} s alone."
    );

    // 4. Scheduler overhead on a nearly free model.
    let gmm = load("toy-gmm");
    let n_jobs = 16;
    let gmm_steps = if quick { 50 } else { 200 };
    let before = gmm.stats();
    let t0 = Instant::now();
    let hs: Vec<_> = (0..n_jobs).map(|i| gmm.submit(job("x", gmm_steps, 1, i)).unwrap()).collect();
    for h in hs {
        finish(h).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let after = gmm.stats();
    let ticks = (after.ticks - before.ticks).max(1);
    let overhead = (after.tick_secs - before.tick_secs) - (after.forward_secs - before.forward_secs);
    println!("\n### Scheduler overhead ({n_jobs} concurrent jobs × {gmm_steps} steps on the analytic model)\n");
    println!(
        "{ticks} ticks in {wall:.2} s; per tick {:.1} µs outside the forward (gathering, stacking, splitting, \
         answering), {:.1} µs in it.",
        overhead / ticks as f64 * 1e6,
        (after.forward_secs - before.forward_secs) / ticks as f64 * 1e6
    );
}

fn main() {
    tiller::models::cpu_kernels::tune_process();
    let quick = std::env::args().any(|a| a == "quick") || std::env::var("TILLER_BENCH_QUICK").is_ok_and(|v| v == "1");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let t0 = Instant::now();
    rt.block_on(run(quick));
    println!("\n(total {:.1} s)", t0.elapsed().as_secs_f64());
}
