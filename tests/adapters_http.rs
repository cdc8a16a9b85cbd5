//! `/v1/adapters` and the `adapters` field of generation requests over HTTP: registration inside
//! the adapters root only, malformed files as 400 with the reader's message, the admin key,
//! and generation with an adapter on the sd15-tiny fixture (merged variants and their cache).

mod adapters_support;
mod http_support;

use std::path::Path;
use std::time::Duration;

use adapters_support::*;
use http_support::*;
use serde_json::{json, Value};
use tiller::config::Config;
use tiller::engine::{Engine, EngineOptions, EngineState, LoadedModel};

fn config_with_root(root: &Path) -> Config {
    let mut c = Config::default();
    c.adapters.root = root.to_path_buf();
    c
}

async fn send(s: &TestServer, req: reqwest::RequestBuilder) -> (u16, Value) {
    let _ = s;
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn register(s: &TestServer, body: Value) -> (u16, Value) {
    send(s, s.client.post(format!("{}/v1/adapters", s.url)).json(&body)).await
}

async fn delete(s: &TestServer, name: &str) -> u16 {
    s.client.delete(format!("{}/v1/adapters/{name}", s.url)).send().await.unwrap().status().as_u16()
}

async fn list_names(s: &TestServer) -> Vec<String> {
    let v: Value = s.get("/v1/adapters").await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    v["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_files_are_400_with_the_readers_message() {
    let root = tempfile::tempdir().unwrap();
    let cases = malformed_cases();
    // Bad files already in the root at start-up are skipped (logged), not fatal.
    std::fs::write(root.path().join("startup_bad.safetensors"), &cases[1].1).unwrap();
    std::fs::write(root.path().join("good.safetensors"), sd15_lora()).unwrap();
    let s = mock_server(Duration::ZERO, config_with_root(root.path())).await;
    assert_eq!(list_names(&s).await, ["good"]);
    for (i, (case, bytes, words)) in cases.iter().enumerate() {
        let file = format!("bad_{i}.safetensors");
        std::fs::write(root.path().join(&file), bytes).unwrap();
        let (st, body) = register(&s, json!({"path": file})).await;
        assert_error(st, &body, 400, Some("path"));
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{case}: message `{msg}` lacks `{words}`");
        assert!(msg.contains(&file), "{case}: message names the file: {msg}");
    }
    let (st, body) = register(&s, json!({"path": "startup_bad.safetensors"})).await;
    assert_error(st, &body, 400, Some("path"));
    assert_eq!(list_names(&s).await, ["good"], "nothing malformed was registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_must_resolve_inside_the_root() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("evil.safetensors"), sd15_lora()).unwrap();
    std::fs::create_dir(root.path().join("sub")).unwrap();
    std::fs::write(root.path().join("sub/ok.safetensors"), sd15_lora()).unwrap();
    let s = mock_server(Duration::ZERO, config_with_root(root.path())).await;

    let outside_file = outside.path().join("evil.safetensors");
    let escapes = [
        ("../evil.safetensors", "must not contain `..`"),
        ("sub/../../evil.safetensors", "must not contain `..`"),
        (outside_file.to_str().unwrap(), "outside the adapters root"),
        ("missing.safetensors", "paths are relative to the adapters root"),
    ];
    for (path, words) in escapes {
        let (st, body) = register(&s, json!({"path": path})).await;
        assert_error(st, &body, 400, Some("path"));
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{path}: `{msg}` lacks `{words}`");
    }
    // Symlinks inside the root that lead out of it, to a file or a directory.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside_file, root.path().join("link.safetensors")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("linkdir")).unwrap();
        for path in ["link.safetensors", "linkdir/evil.safetensors", "linkdir"] {
            let (st, body) = register(&s, json!({"path": path})).await;
            assert_error(st, &body, 400, Some("path"));
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(msg.contains("outside the adapters root") || msg.contains("holds no"), "{path}: {msg}");
        }
        // A symlink that stays inside the root is fine.
        std::os::unix::fs::symlink(root.path().join("sub/ok.safetensors"), root.path().join("alias.safetensors"))
            .unwrap();
        let (st, body) = register(&s, json!({"path": "alias.safetensors"})).await;
        assert_eq!(st, 201, "{body}");
        assert_eq!(body["name"], "alias");
        // The start-up scan confines the same way: a server started on this root finds `alias`
        // but not the links that lead out of it.
        let s2 = mock_server(Duration::ZERO, config_with_root(root.path())).await;
        let list: serde_json::Value = s2.get("/v1/adapters").await.json().await.unwrap();
        let names: Vec<&str> = list["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"alias"), "{names:?}");
        assert!(!names.contains(&"link") && !names.contains(&"linkdir"), "{names:?}");
    }
    // Subdirectories and absolute paths inside the root are fine.
    let (st, body) = register(&s, json!({"path": "sub/ok.safetensors"})).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!((body["name"].as_str(), body["path"].as_str()), (Some("ok"), Some("sub/ok.safetensors")));
    let abs = root.path().join("sub/ok.safetensors");
    let (st, body) = register(&s, json!({"path": abs, "name": "ok2"})).await;
    assert_eq!(st, 201, "{body}");
    // A PEFT-style directory takes the directory's name.
    std::fs::create_dir(root.path().join("peftdir")).unwrap();
    std::fs::write(root.path().join("peftdir/pytorch_lora_weights.safetensors"), sd15_lora()).unwrap();
    let (st, body) = register(&s, json!({"path": "peftdir"})).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["name"], "peftdir");
    std::fs::create_dir(root.path().join("emptydir")).unwrap();
    let (st, body) = register(&s, json!({"path": "emptydir"})).await;
    assert_error(st, &body, 400, Some("path"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_conflict_delete() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("a.safetensors"), sd15_lora()).unwrap();
    std::fs::write(root.path().join("b.safetensors"), kohya_lora(SD15_TO_Q, 3, 16, 16, 5)).unwrap();
    let s = mock_server(Duration::ZERO, config_with_root(root.path())).await;
    assert_eq!(list_names(&s).await, ["a", "b"], "found at start-up");
    let v: Value = s.get("/v1/adapters").await.json().await.unwrap();
    let a = &v["data"][0];
    assert_eq!(a["object"], "adapter");
    assert_eq!(a["format"], "kohya");
    assert_eq!(a["rank"], 2);
    assert_eq!(a["modules"], 1);
    assert_eq!(a["components"]["unet"], 1);
    assert_eq!(a["module_keys"][0], SD15_TO_Q);
    assert_eq!(a["size_bytes"], sd15_lora().len());
    assert_eq!(a["path"], "a.safetensors");
    assert!(a["base_model"].is_null(), "a 16-wide adapter names no family: {a}");

    // Register under another name; Location points at it.
    let resp = s.client.post(format!("{}/v1/adapters", s.url)).json(&json!({"path": "b.safetensors", "name": "c"}));
    let resp = resp.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.headers()["location"], "/v1/adapters/c");
    let c: Value = resp.json().await.unwrap();
    assert_eq!((c["name"].as_str(), c["rank"].as_u64()), (Some("c"), Some(3)));
    let got: Value = s.get("/v1/adapters/c").await.json().await.unwrap();
    assert_eq!(got["name"], "c");
    let (st, body) = send(&s, s.client.get(format!("{}/v1/adapters/zz", s.url))).await;
    assert_error(st, &body, 404, Some("name"));

    // An existing name: 409 unless replace.
    let (st, body) = register(&s, json!({"path": "a.safetensors", "name": "c"})).await;
    assert_error(st, &body, 409, Some("name"));
    assert_eq!(body["error"]["code"], "adapter_exists");
    let (st, body) = register(&s, json!({"path": "a.safetensors", "name": "c", "replace": true})).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["rank"], 2);

    // Field checks.
    for (body, param) in [
        (json!({"path": "a.safetensors", "name": "../x"}), "name"),
        (json!({"path": "a.safetensors", "name": ".hidden"}), "name"),
        (json!({"path": "a.safetensors", "name": ""}), "name"),
        (json!({"path": 3}), "path"),
        (json!({"name": "x"}), "path"),
        (json!({"path": "a.safetensors", "replace": "yes"}), "replace"),
        (json!({"path": "a.safetensors", "paht": 1}), "paht"),
    ] {
        let (st, resp) = register(&s, body.clone()).await;
        assert_error(st, &resp, 400, Some(param));
    }
    let (st, _) = send(
        &s,
        s.client.post(format!("{}/v1/adapters", s.url)).header("content-type", "application/json").body("{nope"),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = send(&s, s.client.post(format!("{}/v1/adapters", s.url)).body(r#"{"path": "a.safetensors"}"#)).await;
    assert_eq!(st, 415, "a body not declared JSON");
    let (st, _) = send(&s, s.client.put(format!("{}/v1/adapters", s.url))).await;
    assert_eq!(st, 405);

    // Generation naming a registered adapter passes validation (the mock model takes no
    // adapters, so the engine refuses it with 400 naming `adapters`).
    let (st, body) = s.generate(json!({"prompt": "x", "steps": 1, "adapters": [{"name": "c"}]})).await;
    assert_error(st, &body, 400, Some("adapters"));
    assert!(body["error"]["message"].as_str().unwrap().contains("does not take LoRA adapters"), "{body}");

    // DELETE, then the name is unknown everywhere.
    assert_eq!(delete(&s, "c").await, 204);
    assert_eq!(delete(&s, "c").await, 404);
    assert_eq!(list_names(&s).await, ["a", "b"]);
    let (st, body) = s.generate(json!({"prompt": "x", "steps": 1, "adapters": [{"name": "a"}, {"name": "c"}]})).await;
    assert_error(st, &body, 404, Some("adapters[1].name"));
    assert_eq!(body["error"]["code"], "adapter_not_found");
    assert!(root.path().join("b.safetensors").is_file(), "DELETE keeps the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapters_field_is_validated() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("a.safetensors"), sd15_lora()).unwrap();
    std::fs::write(root.path().join("b.safetensors"), sd15_lora()).unwrap();
    let s = mock_server(Duration::ZERO, config_with_root(root.path())).await;
    let nine: Vec<Value> = (0..9).map(|i| json!({"name": format!("a{i}")})).collect();
    let cases = [
        (json!("a"), 400, "adapters"),
        (json!({"name": "a"}), 400, "adapters"),
        (json!(["a"]), 400, "adapters[0]"),
        (json!([{"scale": 1}]), 400, "adapters[0].name"),
        (json!([{"name": 1}]), 400, "adapters[0].name"),
        (json!([{"name": "a", "scale": "1"}]), 400, "adapters[0].scale"),
        (json!([{"name": "a", "weight": 1}]), 400, "adapters[0].weight"),
        (json!([{"name": "a"}, {"name": "b", "scale": 10.5}]), 400, "adapters[1].scale"),
        (json!([{"name": "a", "scale": -11}]), 400, "adapters[0].scale"),
        (json!([{"name": "a"}, {"name": "b"}, {"name": "a", "scale": 0.5}]), 400, "adapters[2].name"),
        (json!(nine), 400, "adapters"),
        (json!([{"name": "a"}, {"name": "zzz"}]), 404, "adapters[1].name"),
    ];
    for (adapters, status, param) in cases {
        let (st, body) = s.generate(json!({"prompt": "x", "steps": 1, "adapters": adapters})).await;
        assert_error(st, &body, status, Some(param));
    }
    // null and [] mean no adapters.
    for adapters in [json!(null), json!([])] {
        let (st, body) = s.generate(json!({"prompt": "x", "steps": 1, "seed": 1, "adapters": adapters})).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["data"][0]["tiller"]["adapters"], json!([]));
        assert!(body["data"][0]["tiller"].get("adapter_variant").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_key_guards_registering_and_removing() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("a.safetensors"), sd15_lora()).unwrap();
    let mut config = config_with_root(root.path());
    config.server.api_key = Some("user-key".into());
    config.server.admin_key = Some("admin-key".into());
    let s = mock_server(Duration::ZERO, config).await;
    let post = |key: Option<&str>| {
        let r = s.client.post(format!("{}/v1/adapters", s.url)).json(&json!({"path": "a.safetensors", "name": "x"}));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    };
    for key in [None, Some("user-key"), Some("wrong")] {
        let (st, body) = send(&s, post(key)).await;
        assert_error(st, &body, 401, None);
        assert!(body["error"]["message"].as_str().unwrap().contains("admin key"), "{body}");
    }
    let (st, body) = send(&s, post(Some("admin-key"))).await;
    assert_eq!(st, 201, "{body}");
    // Listing is a /v1 route: the API key.
    let (st, _) = send(&s, s.client.get(format!("{}/v1/adapters", s.url))).await;
    assert_eq!(st, 401);
    let (st, body) = send(&s, s.client.get(format!("{}/v1/adapters", s.url)).bearer_auth("user-key")).await;
    assert_eq!(st, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let del = |key: Option<&str>| {
        let r = s.client.delete(format!("{}/v1/adapters/x", s.url));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    };
    assert_eq!(del(None).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(del(Some("user-key")).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(del(Some("admin-key")).send().await.unwrap().status().as_u16(), 204);
    assert_eq!(del(Some("admin-key")).send().await.unwrap().status().as_u16(), 404);

    // With only an API key, managing adapters needs that key.
    let mut config = config_with_root(root.path());
    config.server.api_key = Some("user-key".into());
    let s2 = mock_server(Duration::ZERO, config).await;
    let url = format!("{}/v1/adapters", s2.url);
    let (st, _) = send(&s2, s2.client.post(&url).json(&json!({"path": "a.safetensors", "name": "y"}))).await;
    assert_eq!(st, 401);
    let req = s2.client.post(&url).bearer_auth("user-key").json(&json!({"path": "a.safetensors", "name": "y"}));
    let (st, body) = send(&s2, req).await;
    assert_eq!(st, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_root_disables_registration() {
    let dir = tempfile::tempdir().unwrap();
    let s = mock_server(Duration::ZERO, config_with_root(&dir.path().join("nope"))).await;
    assert!(list_names(&s).await.is_empty());
    let (st, body) = register(&s, json!({"path": "a.safetensors"})).await;
    assert_error(st, &body, 503, None);
    assert_eq!(body["error"]["code"], "adapters_disabled");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("adapters.root") && msg.contains("nope"), "{msg}");
    let (st, body) = s.generate(json!({"prompt": "x", "adapters": [{"name": "a"}]})).await;
    assert_error(st, &body, 404, Some("adapters[0].name"));
}

async fn sd15_server(root: &Path) -> TestServer {
    let engine = Engine::start(
        Box::new(|| {
            tiller::models::loader::load_model(
                "sd15-tiny",
                &fixture_dir("sd15-tiny"),
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )
            .map(|m| vec![LoadedModel::new("sd15-tiny", m)])
            .map_err(|e| e.to_string())
        }),
        EngineOptions { queue_depth: 4, ..Default::default() },
    );
    assert_eq!(engine.wait_ready_blocking(Duration::from_secs(60)), EngineState::Ready);
    start(engine, &config_with_root(root)).await
}

fn pixels(body: &Value) -> Vec<u8> {
    decode_png(body["data"][0]["b64_json"].as_str().unwrap()).2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_with_an_adapter_on_the_fixture_model() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("q.safetensors"), kohya_lora(SD15_TO_Q, 2, 16, 16, 11)).unwrap();
    std::fs::write(root.path().join("xl.safetensors"), kohya_lora(SDXL_TE2_Q, 2, 32, 32, 1)).unwrap();
    let s = sd15_server(root.path()).await;
    assert_eq!(list_names(&s).await, ["q", "xl"]);
    let req =
        |adapters: Value| json!({"prompt": "a cat", "size": "32x32", "steps": 2, "seed": 5, "adapters": adapters});

    let (st, plain) = s.generate(req(json!(null))).await;
    assert_eq!(st, 200, "{plain}");
    // merge = auto: the first request runs unmerged, the second merges and caches, the third
    // finds the cached variant.
    let mut images = Vec::new();
    for (merged, cached) in [(false, false), (true, false), (true, true)] {
        let (st, body) = s.generate(req(json!([{"name": "q", "scale": 2.0}]))).await;
        assert_eq!(st, 200, "{body}");
        let meta = &body["data"][0]["tiller"];
        assert_eq!(meta["adapters"], json!([{"name": "q", "scale": 2.0}]));
        let v = &meta["adapter_variant"];
        assert_eq!((v["merged"].as_bool(), v["cached"].as_bool()), (Some(merged), Some(cached)), "{meta}");
        assert!(v["build_ms"].as_f64().unwrap() >= 0.0);
        images.push(pixels(&body));
    }
    assert_ne!(pixels(&plain), images[0], "the adapter changes the image");
    for img in &images[1..] {
        let max = img.iter().zip(&images[0]).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(max <= 2, "merged and unmerged images differ by {max} levels");
    }
    assert_eq!(images[1], images[2], "the cached variant is the merged one");

    // Scale 0 is the base model (up to rounding of the merge).
    let (_, zero) = s.generate(req(json!([{"name": "q", "scale": 0.0}]))).await;
    let max = pixels(&zero).iter().zip(&pixels(&plain)).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max <= 1, "{max}");

    // An adapter for another family (SDXL's second text encoder) is 400 naming `adapters`.
    let (st, body) = s.generate(req(json!([{"name": "xl"}]))).await;
    assert_error(st, &body, 400, Some("adapters"));
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("text_encoder_2") && msg.contains("another model family"), "{msg}");
    let v: Value = s.get("/v1/adapters/xl").await.json().await.unwrap();
    assert_eq!(v["base_model"], "sdxl");

    // Removed: 404 before the engine sees it.
    assert_eq!(delete(&s, "q").await, 204);
    let (st, body) = s.generate(req(json!([{"name": "q"}]))).await;
    assert_error(st, &body, 404, Some("adapters[0].name"));

    // The committed PEFT and kohya fixtures register and generate, when present.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
    for f in ["lora_c_kohya.safetensors", "lora_b_peft.safetensors"] {
        if !fixtures.join(f).is_file() {
            continue;
        }
        std::fs::copy(fixtures.join(f), root.path().join(f)).unwrap();
        let (st, body) = register(&s, json!({"path": f})).await;
        assert_eq!(st, 201, "{body}");
        let name = body["name"].as_str().unwrap().to_string();
        let (st, body) = s.generate(req(json!([{"name": name, "scale": 0.5}]))).await;
        assert_eq!(st, 200, "{f}: {body}");
    }
}
