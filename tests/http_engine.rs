//! The engine's HTTP surface against a mock model: OpenAI-style streaming with previews, async
//! jobs (status, resumable events, cancel, idempotency, expiry), memory admission, per-model
//! size limits, content types, and servers whose model directories do not all load.

mod http_support;

use std::time::{Duration, Instant};

use http_support::*;
use serde_json::{json, Value};
use tiller::config::Config;

/// Parse a text/event-stream body into (event, id, data) triples.
fn sse(text: &str) -> Vec<(String, Option<String>, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut event, mut id, mut data) = (String::new(), None, String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((event, id, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

async fn post_text(s: &TestServer, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let r = s.post_json(path, body).await;
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    (st, h, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_previews_then_the_same_image_as_the_plain_answer() {
    let s = mock_server(Duration::ZERO, Config::default()).await;
    let body = json!({"prompt": "a red circle", "size": "64x64", "seed": 9, "steps": 8});
    let (st, plain) = s.generate(body.clone()).await;
    assert_eq!(st, 200);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["partial_images"] = json!(3);
    streamed["stream_progress"] = json!(true);
    let (st, headers, text) = post_text(&s, "/v1/images/generations", &streamed).await;
    assert_eq!(st, 200, "{text}");
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse(&text);
    // OpenAI's stream carries no ids (the official client mis-parses them).
    assert!(events.iter().all(|(_, id, _)| id.is_none()), "{text}");
    let partials: Vec<&Value> =
        events.iter().filter(|(e, _, _)| e == "image_generation.partial_image").map(|(_, _, d)| d).collect();
    assert_eq!(partials.iter().map(|d| d["partial_image_index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    for d in &partials {
        assert_eq!(d["type"], "image_generation.partial_image");
        assert_eq!(d["size"], "64x64");
        let (w, h, _) = decode_png(d["b64_json"].as_str().unwrap());
        assert_eq!((w, h), (64, 64));
    }
    let progress = events.iter().filter(|(e, _, _)| e == "tiller.progress").count();
    assert_eq!(progress, 8, "one progress event per step");
    let (last, _, done) = events.last().unwrap();
    assert_eq!(last, "image_generation.completed");
    assert_eq!(done["type"], "image_generation.completed");
    assert_eq!(done["b64_json"], plain["data"][0]["b64_json"], "streamed and plain images differ");
    assert_eq!(done["tiller"]["seed"], 9);
    assert!(done["usage"]["total_tokens"].as_u64().is_some());
    // Without stream_progress, only previews and the image.
    streamed["stream_progress"] = json!(false);
    streamed["partial_images"] = json!(0);
    streamed["n"] = json!(2);
    let (_, _, text) = post_text(&s, "/v1/images/generations", &streamed).await;
    let kinds: Vec<String> = sse(&text).into_iter().map(|(e, _, _)| e).collect();
    assert_eq!(kinds, ["image_generation.completed", "image_generation.completed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_leaves_cancels_its_job() {
    let s = mock_server(Duration::from_millis(30), Config::default()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let r = client
        .post(format!("{}/v1/images/generations", s.url))
        .json(&json!({"prompt": "p", "steps": 140, "stream": true, "size": "16x16"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.is_err(), "the client gives up mid-stream");
    let t0 = Instant::now();
    while s.engine().stats().cancelled_running == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the job was not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(s.engine().stats().steps < 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_asynchronously_with_resumable_events() {
    let s = mock_server(Duration::ZERO, Config::default()).await;
    let body = json!({"prompt": "a blue square", "size": "32x32", "seed": 3, "steps": 5, "n": 2});
    let (st, plain) = s.generate(body.clone()).await;
    assert_eq!(st, 200);
    let r = s.post_json("/v1/jobs", &body).await;
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("job_") && id.len() == 36, "{id}");
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert!(["queued", "running", "succeeded"].contains(&job["status"].as_str().unwrap()));
    // Poll until done; the result is the same images as the synchronous answer.
    let t0 = Instant::now();
    let done = loop {
        let j: Value = s.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
        if j["status"] == "succeeded" {
            break j;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{j}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(done["progress"], json!({"step": 5, "total": 5}));
    assert_eq!(done["result"]["data"][1]["b64_json"], plain["data"][1]["b64_json"]);
    // The event log replays in full, numbered...
    let text = s.get(&format!("/v1/jobs/{id}/events")).await.text().await.unwrap();
    let events = sse(&text);
    let kinds: Vec<&str> = events.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(&kinds[..3], ["tiller.queued", "tiller.started", "tiller.progress"]);
    assert_eq!(&kinds[kinds.len() - 2..], ["image_generation.completed", "image_generation.completed"]);
    let ids: Vec<String> = events.iter().map(|(_, id, _)| id.clone().unwrap()).collect();
    assert_eq!(ids[0], "0");
    assert_eq!(&ids[ids.len() - 2..], ["7.0", "7.1"]);
    // ...and resumes after Last-Event-ID, including between the images of one position.
    let resumed = s.client.get(format!("{}/v1/jobs/{id}/events", s.url)).header("Last-Event-ID", "6").send().await;
    let resumed = sse(&resumed.unwrap().text().await.unwrap());
    assert_eq!(resumed.iter().map(|(_, id, _)| id.clone().unwrap()).collect::<Vec<_>>(), ["7.0", "7.1"]);
    let resumed = s.client.get(format!("{}/v1/jobs/{id}/events", s.url)).header("Last-Event-ID", "7.0").send().await;
    let resumed = sse(&resumed.unwrap().text().await.unwrap());
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].2["b64_json"], plain["data"][1]["b64_json"]);
    // A finished job cannot be cancelled; unknown ids are 404.
    let r = s.client.delete(format!("{}/v1/jobs/{id}", s.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let r = s.get("/v1/jobs/job_00000000000000000000000000000000").await;
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cancels_a_running_job_within_a_step() {
    let s = mock_server(Duration::from_millis(20), Config::default()).await;
    let job: Value =
        s.post_json("/v1/jobs", &json!({"prompt": "p", "steps": 140, "size": "16x16"})).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let t0 = Instant::now();
    while s.engine().stats().steps < 3 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = s.client.delete(format!("{}/v1/jobs/{id}", s.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let at_cancel = s.engine().stats().steps;
    let t0 = Instant::now();
    let j = loop {
        let j: Value = s.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
        if j["status"] == "cancelled" {
            break j;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{j}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(j["error"]["code"], "cancelled");
    assert!(s.engine().stats().steps <= at_cancel + 1, "ran more than one step after DELETE");
    assert_eq!(s.engine().stats().in_flight, 0);
    let text = s.get(&format!("/v1/jobs/{id}/events")).await.text().await.unwrap();
    assert_eq!(sse(&text).last().unwrap().0, "tiller.cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_same_job_and_jobs_expire() {
    let mut cfg = Config::default();
    cfg.jobs.ttl_secs = 1;
    let s = mock_server(Duration::ZERO, cfg).await;
    let body = json!({"prompt": "p", "steps": 2, "size": "16x16", "seed": 1});
    let post = |body: Value, key: &'static str| {
        let req = s.client.post(format!("{}/v1/jobs", s.url)).header("Idempotency-Key", key).json(&body);
        async move { req.send().await.unwrap() }
    };
    let a = post(body.clone(), "k-1").await;
    assert_eq!(a.status().as_u16(), 202);
    let a: Value = a.json().await.unwrap();
    let b = post(body.clone(), "k-1").await;
    assert_eq!(b.status().as_u16(), 200, "a repeat returns the existing job");
    let b: Value = b.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let c = post(json!({"prompt": "other", "steps": 2, "size": "16x16"}), "k-1").await;
    assert_eq!(c.status().as_u16(), 400, "same key, different body");
    let d: Value = post(body.clone(), "k-2").await.json().await.unwrap();
    assert_ne!(a["id"], d["id"]);
    assert_eq!(s.engine().stats().submitted, 2);
    // Concurrent requests with one new key make one job between them.
    let racers: Vec<_> = (0..8).map(|_| post(body.clone(), "k-3")).collect();
    let answers = futures_util::future::join_all(racers).await;
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for r in answers {
        created += usize::from(r.status().as_u16() == 202);
        ids.insert(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    assert_eq!((created, ids.len()), (1, 1), "one job for one key");
    assert_eq!(s.engine().stats().submitted, 3);
    // Gone ttl_secs after it finished.
    let id = a["id"].as_str().unwrap();
    let t0 = Instant::now();
    loop {
        let r = s.get(&format!("/v1/jobs/{id}")).await;
        if r.status().as_u16() == 404 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "job still there after its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_memory_budget_or_the_model_size_are_400() {
    let mut cfg = Config::default();
    cfg.limits.memory_budget_mib = Some(20);
    let s = mock_server(Duration::ZERO, cfg).await;
    // The mock model is 64×64 natively: 128×128 is the largest size by default.
    let (st, body) = s.generate(json!({"prompt": "p", "size": "136x136", "steps": 1})).await;
    assert_error(st, &body, 400, Some("size"));
    // 64 particles × 10 images at 128×128 do not fit 20 MiB; a retry would not either, and the
    // openai client is told so.
    let r = s
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "p", "size": "128x128", "n": 10, "steps": 1,
                "steering": {"method": "best_of_n", "n": 64}, "reward": "brightness"}),
        )
        .await;
    assert_eq!(r.headers()["x-should-retry"], "false");
    let (st, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
    assert_error(st, &body, 400, Some("steering"));
    assert_eq!(body["error"]["code"], "insufficient_memory");
    let (st, _) = s.generate(json!({"prompt": "p", "size": "64x64", "steps": 1})).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_edges_found_by_attacking_the_api() {
    let s = mock_server(Duration::ZERO, Config::default()).await;
    // A body that is not declared JSON is 415, whatever it holds.
    for ct in [None, Some("text/plain")] {
        let mut req = s.client.post(format!("{}/v1/images/generations", s.url)).body(r#"{"prompt":"p"}"#);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 415, "{ct:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unsupported_media_type");
    }
    // seed + n − 1 must not wrap around.
    let (st, body) = s.generate(json!({"prompt": "p", "seed": u64::MAX, "n": 2, "steps": 1})).await;
    assert_error(st, &body, 400, Some("seed"));
    let (st, _) = s.generate(json!({"prompt": "p", "seed": u64::MAX, "n": 1, "steps": 1, "size": "16x16"})).await;
    assert_eq!(st, 200);
    // n up to 10, as OpenAI allows.
    let (st, body) = s.generate(json!({"prompt": "p", "n": 10, "steps": 1, "size": "16x16"})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = s.generate(json!({"prompt": "p", "n": 11, "steps": 1})).await;
    assert_error(st, &body, 400, Some("n"));
    // An oversized adapter registration is 413, not 400.
    let big = json!({"path": "x".repeat(100_000)});
    let r = s.post_json("/v1/adapters", &big).await;
    assert_eq!(r.status().as_u16(), 413);
    // A long URI is a 414 with an OpenAI-shaped body (it was an empty one).
    let r = s.get(&format!("/v1/models/{}", "m".repeat(10_000))).await;
    assert_eq!(r.status().as_u16(), 414);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "uri_too_long");
    let (st, body) = s.generate(json!({"prompt": "p", "partial_images": 4})).await;
    assert_error(st, &body, 400, Some("partial_images"));
    // A reward weight that is finite in f64 but would overflow the f32 scores.
    let (st, body) =
        s.generate(json!({"prompt": "p", "steps": 1, "reward": [{"name": "brightness", "weight": 1e300}]})).await;
    assert_error(st, &body, 400, Some("reward[0].weight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_leaves_the_others_served() {
    let root = tempfile::tempdir().unwrap();
    let copy = |name: &str, to: &str| {
        let dst = root.path().join(to);
        copy_dir(&fixture_dir(name), &dst);
        dst
    };
    copy("sd15-tiny", "good");
    let bad = copy("sd15-tiny", "bad-scheduler");
    let sched = bad.join("scheduler/scheduler_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&sched).unwrap()).unwrap();
    cfg["_class_name"] = json!("MadeUpScheduler");
    std::fs::write(&sched, cfg.to_string()).unwrap();
    let broken = root.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model_index.json"), r#"{"_class_name": "NoSuchPipeline"}"#).unwrap();

    let mut config = Config::default();
    config.models.root = root.path().to_path_buf();
    config.models.device = tiller::config::DeviceSpec::Cpu;
    let engine = tiller::api::engine_from_config(&config).unwrap();
    engine.wait_ready_blocking(Duration::from_secs(60));
    let s = start(engine, &config).await;
    let r = s.get("/ready").await;
    assert_eq!(r.status().as_u16(), 200);
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["models"], json!(["good"]));
    let failed = health["failed_models"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{health}");
    let msg = |name: &str| failed.iter().find(|f| f["name"] == name).unwrap()["error"].as_str().unwrap().to_string();
    assert!(msg("bad-scheduler").contains("MadeUpScheduler"), "{}", msg("bad-scheduler"));
    assert!(msg("broken").contains("NoSuchPipeline"), "{}", msg("broken"));
    let models: Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(models["failed"].as_array().unwrap().len(), 2);
    let (st, _) = s.generate(json!({"prompt": "p", "steps": 1})).await;
    assert_eq!(st, 200);
}
