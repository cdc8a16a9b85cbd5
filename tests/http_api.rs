//! HTTP API tests against a mock model (fast, no fixtures): responses, validation of every
//! field, errors, queueing, cancellation, health, metrics, docs.

mod http_support;

use std::time::{Duration, Instant};

use http_support::*;
use serde_json::json;
use tiller::config::Config;

fn config() -> Config {
    Config::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_returns_pngs_of_the_requested_size_with_metadata() {
    let s = mock_server(Duration::ZERO, config()).await;
    let (status, body) = s
        .generate(json!({"prompt": "a red circle", "size": "64x32", "n": 2, "seed": 5, "steps": 3, "user": "u1"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, img) in data.iter().enumerate() {
        let (w, h, _) = decode_png(img["b64_json"].as_str().unwrap());
        assert_eq!((w, h), (64, 32));
        let t = &img["tiller"];
        assert_eq!(t["seed"], 5 + i as u64);
        assert_eq!(t["request_seed"], 5);
        assert_eq!(t["steps"], 3);
        assert_eq!(t["scheduler"], "ddim");
        assert_eq!(t["guidance_scale"], 7.5);
        assert_eq!(t["width"], 64);
        assert_eq!(t["height"], 32);
        assert_eq!(t["model"], "mock");
        assert_eq!(t["prompt_truncated"], false);
        // 2 latents x 3 steps x 2 CFG branches.
        assert_eq!(t["denoiser_evals"], 12);
        for k in ["queue_ms", "encode_ms", "denoise_ms", "decode_ms", "total_ms"] {
            assert!(t["timings"][k].as_f64().unwrap() >= 0.0, "{k}: {t}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_and_random_seed() {
    let s = mock_server(Duration::ZERO, config()).await;
    let (status, body) = s.generate(json!({"prompt": "x", "steps": 2, "guidance_scale": 1.0})).await;
    assert_eq!(status, 200, "{body}");
    let img = &body["data"][0];
    let (w, h, _) = decode_png(img["b64_json"].as_str().unwrap());
    assert_eq!((w, h), (64, 64), "model default size");
    assert!(img["tiller"]["seed"].as_u64().unwrap() < (1u64 << 53));
    // guidance 1 = no CFG: one evaluation per step.
    assert_eq!(img["tiller"]["denoiser_evals"], 2);
    // `auto` size and explicit nulls are defaults too.
    let (status, body) = s.generate(json!({"prompt": "x", "steps": 1, "size": "auto", "n": null, "model": null})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_bytes_and_per_image_seeds() {
    let s = mock_server(Duration::ZERO, config()).await;
    let req = |seed: u64, n: u32| json!({"prompt": "p", "seed": seed, "n": n, "steps": 4, "size": "32x32", "scheduler": "euler-ancestral"});
    let (_, a) = s.generate(req(11, 2)).await;
    let (_, b) = s.generate(req(11, 2)).await;
    let (_, c) = s.generate(req(12, 1)).await;
    let png = |v: &serde_json::Value, i: usize| v["data"][i]["b64_json"].as_str().unwrap().to_string();
    assert_eq!(png(&a, 0), png(&b, 0));
    assert_eq!(png(&a, 1), png(&b, 1));
    assert_ne!(png(&a, 0), png(&a, 1));
    // Image 1 of seed 11 is image 0 of seed 12.
    assert_eq!(png(&a, 1), png(&c, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_latents_replay_the_seed() {
    use base64::Engine as _;
    use tiller::sampling::NoiseSource;
    let s = mock_server(Duration::ZERO, config()).await;
    let base = json!({"prompt": "p", "seed": 9, "steps": 3, "size": "32x16", "scheduler": "ddpm"});
    let (_, a) = s.generate(base.clone()).await;
    // The noise seed 9 draws first: (1, 4, 16/8, 32/8).
    let noise = tiller::pipeline::PerImageNoise::new(9, 1)
        .next(&candle_core::Shape::from((1, 4, 2, 4)), &candle_core::Device::Cpu)
        .unwrap();
    let bytes = tiller::util::tensor_io::to_safetensors_bytes(&[("latents", &noise)]).unwrap();
    let mut req = base.clone();
    req["init_latents"] = json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
    let (status, b) = s.generate(req.clone()).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(a["data"][0]["b64_json"], b["data"][0]["b64_json"]);
    // Different noise, different image.
    let other = (noise * -1.0).unwrap();
    let bytes = tiller::util::tensor_io::to_safetensors_bytes(&[("latents", &other)]).unwrap();
    req["init_latents"] = json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
    let (_, c) = s.generate(req.clone()).await;
    assert_ne!(a["data"][0]["b64_json"], c["data"][0]["b64_json"]);
    // Wrong shape names the field.
    req["size"] = json!("32x32");
    let (status, body) = s.generate(req).await;
    assert_error(status, &body, 400, Some("init_latents"));
    assert!(body["error"]["message"].as_str().unwrap().contains("expected [1, 4, 4, 4]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_is_a_4xx_naming_it() {
    let mut cfg = config();
    cfg.limits.max_n = 3;
    cfg.limits.max_steps = 20;
    cfg.limits.max_prompt_chars = 10;
    cfg.limits.max_width = Some(128);
    cfg.limits.max_height = Some(128);
    cfg.limits.max_pixels = Some(128 * 64);
    let s = mock_server(Duration::ZERO, cfg).await;
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({}), 400, "prompt"),
        (json!({"prompt": 3}), 400, "prompt"),
        (json!({"prompt": "this prompt is too long"}), 400, "prompt"),
        (json!({"prompt": "p", "negative_prompt": "far too long negative"}), 400, "negative_prompt"),
        (json!({"prompt": "p", "negative_prompt": ["x"]}), 400, "negative_prompt"),
        (json!({"prompt": "p", "n": 0}), 400, "n"),
        (json!({"prompt": "p", "n": 4}), 400, "n"),
        (json!({"prompt": "p", "n": -1}), 400, "n"),
        (json!({"prompt": "p", "n": 1.5}), 400, "n"),
        (json!({"prompt": "p", "n": "2"}), 400, "n"),
        (json!({"prompt": "p", "size": "big"}), 400, "size"),
        (json!({"prompt": "p", "size": "64"}), 400, "size"),
        (json!({"prompt": "p", "size": "60x64"}), 400, "size"),
        (json!({"prompt": "p", "size": "0x64"}), 400, "size"),
        (json!({"prompt": "p", "size": "256x64"}), 400, "size"),
        (json!({"prompt": "p", "size": "128x128"}), 400, "size"),
        (json!({"prompt": "p", "size": 64}), 400, "size"),
        (json!({"prompt": "p", "response_format": "url"}), 400, "response_format"),
        (json!({"prompt": "p", "response_format": "jpeg"}), 400, "response_format"),
        (json!({"prompt": "p", "output_format": "gif"}), 400, "output_format"),
        (json!({"prompt": "p", "output_compression": 50}), 400, "output_compression"),
        (json!({"prompt": "p", "output_format": "jpeg", "output_compression": 101}), 400, "output_compression"),
        (json!({"prompt": "p", "output_format": "jpeg", "output_compression": -1}), 400, "output_compression"),
        (json!({"prompt": "p", "model": 7}), 400, "model"),
        (json!({"prompt": "p", "user": 7}), 400, "user"),
        (json!({"prompt": "p", "steps": 0}), 400, "steps"),
        (json!({"prompt": "p", "steps": 21}), 400, "steps"),
        (json!({"prompt": "p", "steps": "ten"}), 400, "steps"),
        (json!({"prompt": "p", "scheduler": "lcm", "steps": 20, "guidance_scale": 1.0}), 200, ""),
        (json!({"prompt": "p", "guidance_scale": -1}), 400, "guidance_scale"),
        (json!({"prompt": "p", "guidance_scale": 1000}), 400, "guidance_scale"),
        (json!({"prompt": "p", "guidance_scale": "high"}), 400, "guidance_scale"),
        (json!({"prompt": "p", "scheduler": "dpm++"}), 400, "scheduler"),
        (json!({"prompt": "p", "scheduler": 1}), 400, "scheduler"),
        (json!({"prompt": "p", "eta": 1.5}), 400, "eta"),
        (json!({"prompt": "p", "eta": -0.1}), 400, "eta"),
        (json!({"prompt": "p", "eta": true}), 400, "eta"),
        (json!({"prompt": "p", "seed": -5}), 400, "seed"),
        (json!({"prompt": "p", "seed": 1.5}), 400, "seed"),
        (json!({"prompt": "p", "seed": "42"}), 400, "seed"),
        (json!({"prompt": "p", "init_latents": "!!!not base64!!!"}), 400, "init_latents"),
        (json!({"prompt": "p", "init_latents": "aGVsbG8="}), 400, "init_latents"),
        (json!({"prompt": "p", "init_latents": 5}), 400, "init_latents"),
        (json!({"prompt": "p", "guidance": 5}), 400, "guidance"),
    ];
    for (body, want, param) in cases {
        let (status, resp) = s.generate(body.clone()).await;
        if want == 200 {
            assert_eq!(status, 200, "{body} -> {resp}");
            continue;
        }
        assert_error(status, &resp, want, Some(param));
        let msg = resp["error"]["message"].as_str().unwrap();
        assert!(msg.contains(param), "message should name `{param}`: {msg} (request {body})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_json_errors() {
    let mut cfg = config();
    cfg.limits.max_body_bytes = 1000;
    let s = mock_server(Duration::ZERO, cfg).await;
    let url = format!("{}/v1/images/generations", s.url);
    let send = |body: Vec<u8>, ct: &'static str| {
        let c = s.client.clone();
        let url = url.clone();
        async move {
            let r = c.post(url).header("content-type", ct).body(body).send().await.unwrap();
            let st = r.status().as_u16();
            (st, r.json::<serde_json::Value>().await.expect("error body is JSON"))
        }
    };
    let (st, body) = send(b"{\"prompt\": ".to_vec(), "application/json").await;
    assert_error(st, &body, 400, None);
    assert_eq!(body["error"]["code"], "invalid_json");
    let (st, body) = send(b"[1, 2]".to_vec(), "application/json").await;
    assert_error(st, &body, 400, None);
    // The body must be declared JSON: curl's -d default (form encoding) is 415, naming the fix.
    let (st, body) = send(br#"{"prompt": "p", "steps": 1}"#.to_vec(), "application/x-www-form-urlencoded").await;
    assert_error(st, &body, 415, None);
    assert!(body["error"]["message"].as_str().unwrap().contains("application/json"));
    let (st, body) =
        send(br#"{"prompt": "p", "steps": 1, "size": "16x16"}"#.to_vec(), "application/json; charset=utf-8").await;
    assert_eq!(st, 200, "{body}");
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2000));
    let (st, body) = send(big.into_bytes(), "application/json").await;
    assert_error(st, &body, 413, None);
    assert_eq!(body["error"]["code"], "payload_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404_and_routes_are_json() {
    let s = mock_server(Duration::ZERO, config()).await;
    let (st, body) = s.generate(json!({"prompt": "p", "model": "dall-e-3"})).await;
    assert_error(st, &body, 404, Some("model"));
    assert_eq!(body["error"]["code"], "model_not_found");
    let r = s.get("/v1/models/nope").await;
    assert_eq!(r.status().as_u16(), 404);
    let r = s.get("/no/such/route").await;
    assert_eq!(r.status().as_u16(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_error(404, &body, 404, None);
    let r = s.get("/v1/images/generations").await;
    assert_eq!(r.status().as_u16(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_error(405, &body, 405, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_has_openai_shape() {
    let s = mock_server(Duration::ZERO, config()).await;
    let r = s.get("/v1/models").await;
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let m = &body["data"][0];
    assert_eq!(m["id"], "mock");
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "tiller");
    assert!(m["created"].is_u64());
    assert_eq!(m["tiller"]["family"], "mock");
    assert_eq!(m["tiller"]["default"], true);
    assert_eq!(m["tiller"]["default_size"], "64x64");
    assert_eq!(m["tiller"]["scheduler"], "ddim");
    assert_eq!(m["tiller"]["prediction_type"], "epsilon");
    let r = s.get("/v1/models/mock").await;
    assert_eq!(r.status().as_u16(), 200);
    let one: serde_json::Value = r.json().await.unwrap();
    assert_eq!(&one, m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_is_429_with_retry_after() {
    let mut cfg = config();
    cfg.limits.queue_depth = 1;
    // One job runs at a time, so the second one queues.
    cfg.limits.max_running_jobs = 1;
    // 30 steps x 50 ms = 1.5 s per job.
    let s = mock_server(Duration::from_millis(50), cfg).await;
    let slow = json!({"prompt": "p", "steps": 30, "guidance_scale": 1.0, "size": "16x16"});
    let spawn = |body: serde_json::Value| {
        let c = s.client.clone();
        let url = format!("{}/v1/images/generations", s.url);
        tokio::spawn(async move { c.post(url).json(&body).send().await.map(|r| r.status().as_u16()) })
    };
    let first = spawn(slow.clone());
    wait_for(|| s.engine().stats().in_flight == 1).await;
    let second = spawn(slow.clone());
    wait_for(|| s.engine().stats().queued == 1).await;
    let r = s.post_json("/v1/images/generations", &slow).await;
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_error(429, &body, 429, None);
    assert_eq!(body["error"]["code"], "queue_full");
    assert!(s.engine().stats().rejected >= 1);
    // Stop the slow jobs early.
    first.abort();
    second.abort();
    wait_for(|| {
        let st = s.engine().stats();
        st.in_flight == 0 && st.queued == 0
    })
    .await;
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_job() {
    // 140 steps x 30 ms = 4.2 s if it ran to the end.
    let s = mock_server(Duration::from_millis(30), config()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let r = client
        .post(format!("{}/v1/images/generations", s.url))
        .json(&json!({"prompt": "p", "steps": 140, "guidance_scale": 1.0, "size": "16x16"}))
        .send()
        .await;
    assert!(r.is_err(), "the client should time out");
    let t0 = Instant::now();
    wait_for(|| s.engine().stats().cancelled_running == 1).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "cancellation took {:?}", t0.elapsed());
    let st = s.engine().stats();
    assert!(st.steps < 70, "the job should stop early, ran {} steps", st.steps);
    assert_eq!(st.completed, 0);
    // A queued job whose client left is skipped without running.
    let metrics = s.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("tiller_jobs_total{model=\"mock\",outcome=\"cancelled\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_job_of_a_gone_client_is_skipped() {
    let mut cfg = config();
    cfg.limits.max_running_jobs = 1;
    let s = mock_server(Duration::from_millis(20), cfg).await;
    let c = s.client.clone();
    let url = format!("{}/v1/images/generations", s.url);
    let blocker = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            c.post(url).json(&json!({"prompt": "p", "steps": 25, "guidance_scale": 1.0, "size": "16x16"})).send().await
        })
    };
    wait_for(|| s.engine().stats().in_flight == 1).await;
    let quitter = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap();
    let r = quitter.post(url).json(&json!({"prompt": "q", "steps": 25, "size": "16x16"})).send().await;
    assert!(r.is_err());
    let done = blocker.await.unwrap().unwrap();
    assert_eq!(done.status().as_u16(), 200);
    wait_for(|| s.engine().stats().cancelled_queued == 1).await;
    let st = s.engine().stats();
    assert_eq!(st.completed, 1);
    assert_eq!(st.steps, 25, "the skipped job ran no steps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_is_504_and_cancels() {
    let mut cfg = config();
    cfg.limits.request_timeout_secs = 1;
    let s = mock_server(Duration::from_millis(30), cfg).await;
    let t0 = Instant::now();
    let (st, body) = s.generate(json!({"prompt": "p", "steps": 140, "guidance_scale": 1.0, "size": "16x16"})).await;
    assert_error(st, &body, 504, None);
    assert_eq!(body["error"]["code"], "timeout");
    assert!(t0.elapsed() < Duration::from_secs(3));
    wait_for(|| s.engine().stats().cancelled_running == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_follow_loading() {
    use std::sync::mpsc;
    use tiller::engine::{Engine, EngineOptions, LoadedModel};
    let (go, wait) = mpsc::channel::<()>();
    let engine = Engine::start(
        Box::new(move || {
            wait.recv().ok();
            Ok(vec![LoadedModel::new("mock", MockModel::arc("mock", Duration::ZERO))])
        }),
        EngineOptions::default(),
    );
    let s = start(engine, &config()).await;
    let r = s.get("/health").await;
    assert_eq!(r.status().as_u16(), 200);
    let r = s.get("/ready").await;
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "loading");
    let (st, body) = s.generate(json!({"prompt": "p"})).await;
    assert_error(st, &body, 503, None);
    go.send(()).unwrap();
    wait_for(|| s.engine().is_ready()).await;
    let r = s.get("/ready").await;
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body, json!({"status": "ok", "models": ["mock"]}));

    // A failed load is reported and never ready.
    let engine = Engine::start(
        Box::new(|| Err::<Vec<LoadedModel>, String>("unet/config.json: missing".into())),
        EngineOptions::default(),
    );
    let s = start(engine, &config()).await;
    wait_for(|| s.engine().state() != tiller::engine::EngineState::Loading).await;
    let r = s.get("/ready").await;
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert!(body["message"].as_str().unwrap().contains("unet/config.json"));
    assert_eq!(s.get("/health").await.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_requests_jobs_and_queue() {
    let s = mock_server(Duration::ZERO, config()).await;
    let (st, _) = s.generate(json!({"prompt": "p", "steps": 2, "size": "16x16"})).await;
    assert_eq!(st, 200);
    let (st, _) = s.generate(json!({"prompt": "p", "steps": 0})).await;
    assert_eq!(st, 400);
    let r = s.get("/metrics").await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for needle in [
        "tiller_http_requests_total{route=\"/v1/images/generations\",method=\"POST\",status=\"200\",model=\"mock\"}",
        "tiller_http_requests_total{route=\"/v1/images/generations\",method=\"POST\",status=\"400\",model=\"mock\"}",
        "tiller_http_request_duration_seconds_bucket{route=\"/v1/images/generations\"",
        "tiller_denoiser_evaluations_total{model=\"mock\"}",
        "tiller_jobs_total{model=\"mock\",outcome=\"completed\"}",
        "tiller_job_duration_seconds_bucket{model=\"mock\",outcome=\"completed\"",
        "tiller_queue_depth ",
        "tiller_jobs_in_flight ",
        "tiller_images_generated_total{model=\"mock\"}",
        "tiller_models_loaded ",
        // The engine: rows per batched forward, tick latency, queued work, work per job.
        "tiller_batch_rows_bucket",
        "tiller_tick_seconds_bucket",
        "tiller_queued_cost ",
        "tiller_job_denoiser_evaluations_bucket",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_admin_keys() {
    let mut cfg = config();
    cfg.server.api_key = Some("sk-test".into());
    cfg.server.admin_key = Some("admin".into());
    let s = mock_server(Duration::ZERO, cfg).await;
    let (st, body) = s.generate(json!({"prompt": "p", "steps": 1})).await;
    assert_error(st, &body, 401, None);
    let r = s
        .client
        .post(format!("{}/v1/images/generations", s.url))
        .bearer_auth("sk-test")
        .json(&json!({"prompt": "p", "steps": 1, "size": "16x16"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(s.get("/v1/models").await.status().as_u16(), 401);
    assert_eq!(s.get("/metrics").await.status().as_u16(), 401);
    let r = s.client.get(format!("{}/metrics", s.url)).bearer_auth("admin").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Health, readiness and docs stay open.
    assert_eq!(s.get("/health").await.status().as_u16(), 200);
    assert_eq!(s.get("/ready").await.status().as_u16(), 200);
    assert_eq!(s.get("/openapi.json").await.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_and_offline_docs_are_served() {
    let s = mock_server(Duration::ZERO, config()).await;
    let r = s.get("/openapi.json").await;
    assert_eq!(r.status().as_u16(), 200);
    let served: serde_json::Value = r.json().await.unwrap();
    let committed: serde_json::Value = serde_json::from_str(&tiller::api::openapi_json()).unwrap();
    assert_eq!(served, committed);
    assert!(served["paths"]["/v1/images/generations"]["post"].is_object());
    // Swagger UI, served from the binary (no CDN).
    let r = s.get("/docs/").await;
    assert_eq!(r.status().as_u16(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(!html.contains("unpkg.com") && !html.contains("cdn."), "docs must not load from a CDN");
    let r = s.get("/docs/swagger-initializer.js").await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("/openapi.json"));
    let r = s.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(r.status().as_u16(), 200);
    // The playground is a page inside the binary, calling the API from the browser.
    let r = s.get("/playground").await;
    assert_eq!(r.status().as_u16(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("tiller playground") && html.contains("/v1/images/generations"), "{html}");
    assert!(!html.contains("https://"), "the playground loads nothing from the network");
    // /docs redirects to /docs/ (reqwest follows).
    assert_eq!(s.get("/docs").await.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_formats_and_the_png_parameters_chunk() {
    use base64::Engine as _;
    let s = mock_server(Duration::ZERO, config()).await;
    let base = json!({"prompt": "a red circle", "negative_prompt": "blur", "size": "32x16", "seed": 11, "steps": 3});
    let get = |body: serde_json::Value| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(body["data"][0]["b64_json"].as_str().unwrap());
        bytes.unwrap()
    };
    let with = |extra: serde_json::Value| {
        let mut req = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    };
    let (st, body) = s.generate(base.clone()).await;
    assert_eq!(st, 200, "{body}");
    let png_bytes = get(body);
    let pixels = image::load_from_memory(&png_bytes).unwrap().to_rgb8();
    // The PNG carries the parameters a web UI's "PNG Info" reads.
    let reader = png::Decoder::new(std::io::Cursor::new(&png_bytes)).read_info().unwrap();
    let text = &reader.info().uncompressed_latin1_text;
    let params = text.iter().find(|c| c.keyword == "parameters").expect("a parameters chunk").text.clone();
    let lines: Vec<&str> = params.lines().collect();
    assert_eq!(lines[0], "a red circle");
    assert_eq!(lines[1], "Negative prompt: blur");
    for want in ["Steps: 3", "Seed: 11", "Size: 32x16", "Model: mock", "CFG scale: "] {
        assert!(lines[2].contains(want), "{want} missing from {params}");
    }

    // WebP is lossless: the same pixels.
    let (st, body) = s.generate(with(json!({"output_format": "webp"}))).await;
    assert_eq!(st, 200, "{body}");
    let webp = get(body);
    assert_eq!(image::guess_format(&webp).unwrap(), image::ImageFormat::WebP);
    assert_eq!(image::load_from_memory(&webp).unwrap().to_rgb8().as_raw(), pixels.as_raw());

    // JPEG: close to the same pixels, smaller at lower quality.
    let mut sizes = vec![];
    for q in [100, 10] {
        let (st, body) = s.generate(with(json!({"output_format": "jpeg", "output_compression": q}))).await;
        assert_eq!(st, 200, "{body}");
        let jpeg = get(body);
        assert_eq!(image::guess_format(&jpeg).unwrap(), image::ImageFormat::Jpeg);
        let back = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (32, 16));
        let mad = back.as_raw().iter().zip(pixels.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>()
            / pixels.as_raw().len() as f64;
        assert!(mad < 20.0, "quality {q}: mean abs diff {mad}");
        sizes.push(jpeg.len());
    }
    assert!(sizes[1] < sizes[0], "{sizes:?}");
}
