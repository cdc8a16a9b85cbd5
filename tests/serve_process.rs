//! `tiller serve` as a process: request ids in JSON log lines and responses, the access log,
//! CORS from the config, and SIGTERM draining (readiness 503 at once, running jobs finish,
//! new ones are refused, the process exits cleanly).

mod http_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: Child,
    url: String,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `tiller serve --log-format json` on the sd15-tiny fixture with `extra` config lines.
fn serve(extra: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    http_support::copy_dir(&http_support::fixture_dir("sd15-tiny"), &models.join("sd15-tiny"));
    let config = dir.path().join("tiller.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n{extra}\n[models]\nroot = \"{}\"\ndevice = \"cpu\"\n",
            models.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiller"))
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let url = loop {
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("the server said nothing");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if let Some(rest) = msg.strip_prefix("tiller listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    };
    Server { child, url, lines, _dir: dir }
}

async fn wait_ready(client: &reqwest::Client, url: &str) {
    let t0 = Instant::now();
    while client.get(format!("{url}/ready")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(t0.elapsed() < Duration::from_secs(60), "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_reach_responses_and_json_logs_and_cors_follows_the_config() {
    let s = serve("cors_origins = [\"https://app.example\"]");
    let client = reqwest::Client::new();
    wait_ready(&client, &s.url).await;
    let r = client
        .post(format!("{}/v1/images/generations", s.url))
        .header("x-request-id", "req-abc-123")
        .header("origin", "https://app.example")
        .json(&json!({"prompt": "p", "steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-abc-123");
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
    // Without an id, one is made up; another origin gets no CORS grant.
    let r = client.get(format!("{}/v1/models", s.url)).header("origin", "https://evil.example").send().await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 24, "{made}");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // The access log has a JSON line per request, carrying the request id.
    let t0 = Instant::now();
    let mut seen = (false, false);
    while !(seen.0 && seen.1) {
        let line = s.lines.recv_timeout(Duration::from_secs(5)).expect("no access log line");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["target"] == "tiller::access" {
            let id = v["span"]["request_id"].as_str().unwrap_or_default();
            if id == "req-abc-123" {
                assert_eq!(v["fields"]["status"], 200);
                assert_eq!(v["fields"]["path"], "/v1/images/generations");
                seen.0 = true;
            }
            if id == made {
                seen.1 = true;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_jobs_and_refuses_new_ones() {
    let mut s = serve("[limits]\nshutdown_grace_secs = 60\nmax_steps = 1000");
    let client = reqwest::Client::new();
    wait_ready(&client, &s.url).await;
    // A job that runs for a while.
    let url = s.url.clone();
    let c = client.clone();
    let running = tokio::spawn(async move {
        c.post(format!("{url}/v1/images/generations")).json(&json!({"prompt": "p", "steps": 600})).send().await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Readiness turns 503 and new work is refused while the running job goes on.
    let t0 = Instant::now();
    loop {
        let r = client.get(format!("{}/ready", s.url)).send().await.unwrap();
        if r.status().as_u16() == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["status"], "draining");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!running.is_finished(), "the job ended before the signal: the test proves nothing");
    let r = client
        .post(format!("{}/v1/images/generations", s.url))
        .json(&json!({"prompt": "p", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shutting_down");
    // The running job still finishes, then the process exits cleanly.
    let done = running.await.unwrap();
    assert_eq!(done.status().as_u16(), 200, "the running job was not allowed to finish");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the process did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cancels_at_once() {
    let mut s = serve("[limits]\nshutdown_grace_secs = 600\nmax_steps = 1000");
    let client = reqwest::Client::new();
    wait_ready(&client, &s.url).await;
    let job: Value = client
        .post(format!("{}/v1/jobs", s.url))
        .json(&json!({"prompt": "p", "steps": 1000, "scheduler": "ddpm"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(job["id"].is_string(), "{job}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = s.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let t0 = Instant::now();
    while s.child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the second signal did not stop the server");
        std::thread::sleep(Duration::from_millis(20));
    }
}
