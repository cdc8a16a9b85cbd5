//! Admission's memory estimates against the memory jobs really use: for each job, the peak
//! resident set is reset (`/proc/self/clear_refs`), the job runs alone, and the growth of the
//! peak over the resident set before it must stay under the estimate.
//!
//! Ignored by default (it measures the whole process, so it must run alone, and it takes about
//! a minute): `cargo test --release --test engine_memory -- --ignored --nocapture`.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};
use tiller::engine::{Engine, EngineOptions, Job, JobEvent, LoadedModel};
use tiller::pipeline::GenerationParams;
use tiller::reward::RewardRegistry;
use tiller::steering::SteeringRequest;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn steered(spec: serde_json::Value, reward: &str, size: usize, n: usize, steps: usize) -> Job {
    let rewards = RewardRegistry::new(&Default::default(), &Device::Cpu).unwrap();
    let reward = rewards.build(&serde_json::from_value(serde_json::json!(reward)).unwrap()).unwrap();
    Job {
        params: GenerationParams {
            prompt: "a red circle above a blue square".into(),
            n,
            width: Some(size),
            height: Some(size),
            steps: Some(steps),
            seed: 1,
            ..Default::default()
        },
        steering: SteeringRequest { spec: serde_json::from_value(spec).unwrap(), reward: Some(reward), trace: false },
        ..Default::default()
    }
}

fn cases() -> Vec<(&'static str, Job)> {
    let none = serde_json::json!({"method": "none"});
    let reno = serde_json::json!({"method": "reno", "iterations": 2});
    vec![
        ("plain 64×64", steered(none.clone(), "brightness", 64, 1, 10)),
        ("plain 128×128", steered(none.clone(), "brightness", 128, 1, 10)),
        ("plain 256×256", steered(none.clone(), "brightness", 256, 1, 4)),
        ("plain 384×384", steered(none.clone(), "brightness", 384, 1, 2)),
        ("n = 10 at 128×128", steered(none, "brightness", 128, 10, 4)),
        (
            "FK 16 particles 128×128",
            steered(serde_json::json!({"method": "fk", "particles": 16}), "brightness", 128, 1, 10),
        ),
        (
            "FK 64 particles 128×128",
            steered(serde_json::json!({"method": "fk", "particles": 64}), "brightness", 128, 1, 5),
        ),
        ("ReNO 4 steps 128×128", steered(reno.clone(), "brightness", 128, 1, 4)),
        ("ReNO 12 steps 128×128", steered(reno, "brightness", 128, 1, 12)),
    ]
}

/// Run case `i` alone in this process; prints `estimate_bytes measured_bytes`.
async fn measure(i: usize) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/shapes");
    let model = tiller::models::loader::load_model("shapes", &dir, &Device::Cpu, DType::F32).unwrap();
    let engine = Engine::with_models(vec![LoadedModel::new("shapes", model)], EngineOptions::default());
    engine.wait_ready_blocking(Duration::from_secs(60));
    let (name, job) = cases().swap_remove(i);
    let est = engine.estimate(&job).unwrap();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmRSS:");
    match engine.submit(job).unwrap().wait().await {
        JobEvent::Completed(_) => {}
        other => panic!("{name}: {other:?}"),
    }
    let growth = status_kib("VmHWM:").saturating_sub(before) * 1024;
    println!("MEASURED {} {growth}", est.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures the whole process's memory: run alone with --ignored"]
async fn estimates_cover_the_measured_peaks() {
    // Each case in a fresh process, so that memory freed by an earlier case (and kept by the
    // allocator) does not hide a later one's growth.
    if let Ok(i) = std::env::var("TILLER_MEMORY_CASE") {
        return measure(i.parse().unwrap()).await;
    }
    println!("| job | estimate MiB | measured peak growth MiB | measured / estimate |");
    println!("|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for (i, (name, _)) in cases().iter().enumerate() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "estimates_cover_the_measured_peaks", "--nocapture"])
            .env("TILLER_MEMORY_CASE", i.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with("MEASURED ")).unwrap_or_else(|| panic!("{name}: {stdout}"));
        let v: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
        let (est, got) = (v[0] / (1 << 20) as f64, v[1] / (1 << 20) as f64);
        worst = worst.max(got / est);
        println!("| {name} | {est:.0} | {got:.0} | {:.2} |", got / est);
    }
    assert!(worst <= 1.0, "a job used more memory than admission estimated (worst ratio {worst:.2})");
}
