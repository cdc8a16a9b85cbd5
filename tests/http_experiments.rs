//! A/B experiments over HTTP on the analytic `models/toy-gmm`: creation validates every arm
//! like a request, sticky users keep their arm, every answered image is recorded (also across a
//! SIGKILL of the server), results compare the arms, feedback feeds scores and Bradley–Terry,
//! and every bad input is a 4xx naming its field.

mod http_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_support::*;
use serde_json::{json, Value};
use tiller::config::Config;

fn toy_gmm() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/toy-gmm")
}

async fn server(data: &Path, admin_key: Option<&str>) -> TestServer {
    let engine = loaded_engine(&[("toy-gmm", toy_gmm())], 16);
    let mut config = Config::default();
    config.storage.data_dir = data.to_path_buf();
    config.storage.url = postgres();
    config.server.admin_key = admin_key.map(String::from);
    start(engine, &config).await
}

/// The PostgreSQL server CI starts (scripts/postgres.sh), when `TILLER_TEST_POSTGRES_URL` names
/// it: the same tests then run against it instead of the embedded SQLite file.
fn postgres() -> Option<String> {
    std::env::var("TILLER_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty())
}

/// A name no other run of these tests uses (a PostgreSQL database outlives them).
fn unique(base: &str) -> String {
    format!("{base}-{:08x}", rand::random::<u32>())
}

fn spec(name: &str) -> Value {
    json!({
        "name": name,
        "arms": [
            {"name": "plain", "request": {"steps": 10}},
            {"name": "fk", "request": {"steps": 10, "steering": {"method": "fk", "particles": 4, "beta": 20}, "reward": "brightness"}}
        ],
        "metrics": ["brightness"],
        "assignment": "sticky"
    })
}

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let mut r = s.client.request(method, format!("{}{path}", s.url));
    if let Some(b) = body {
        r = r.json(&b);
    }
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let st = resp.status().as_u16();
    (st, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_requests_from_twenty_users_are_all_recorded_and_compared() {
    let data = tempfile::tempdir().unwrap();
    let s = server(data.path(), None).await;
    let name = unique("fk-vs-plain");
    let (st, e) = send(&s, reqwest::Method::POST, "/v1/experiments", Some(spec(&name)), None).await;
    assert_eq!(st, 201, "{e}");
    assert_eq!((e["object"].as_str(), e["status"].as_str()), (Some("experiment"), Some("running")));

    let mut arm_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut ids = Vec::new();
    for round in 0..3 {
        for u in 0..20 {
            let user = format!("user-{u}");
            let (st, body) =
                s.generate(json!({"prompt": "", "user": user, "seed": round * 100 + u, "experiment": name})).await;
            assert_eq!(st, 200, "{body}");
            let t = &body["data"][0]["tiller"];
            arm_of.entry(user).or_default().insert(t["experiment"]["arm"].as_str().unwrap().to_string());
            assert!(t["metrics"]["brightness"].is_number(), "{t}");
            ids.push(t["image_id"].as_str().unwrap().to_string());
            // The arm's fields were applied.
            let fk = t["experiment"]["arm"] == "fk";
            assert_eq!(t["steering"]["method"], if fk { "fk" } else { "none" });
            assert_eq!(t["steps"], 10);
        }
    }
    assert!(arm_of.values().all(|arms| arms.len() == 1), "a user changed arms: {arm_of:?}");
    let used: BTreeSet<&String> = arm_of.values().flatten().collect();
    assert_eq!(used.len(), 2, "both arms are used");

    let (st, r) = send(&s, reqwest::Method::GET, &format!("/v1/experiments/{name}/results"), None, None).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["n"], 60);
    let arms = r["arms"].as_array().unwrap();
    assert_eq!(arms[0]["name"], "plain");
    assert_eq!(arms[0]["n"].as_u64().unwrap() + arms[1]["n"].as_u64().unwrap(), 60);
    let fk = &arms[1]["metrics"]["brightness"];
    let plain = &arms[0]["metrics"]["brightness"];
    assert!(fk["mean"].as_f64().unwrap() > plain["mean"].as_f64().unwrap(), "{r}");
    let diff = &fk["vs_control"];
    assert!(
        diff["diff"].as_f64().unwrap() > 0.0 && diff["ci"].is_array() && diff["always_valid_ci"].is_array(),
        "{diff}"
    );
    assert!(arms[1]["cost"]["nfe"].as_f64().unwrap() > arms[0]["cost"]["nfe"].as_f64().unwrap());
    assert!(arms[0]["cost"]["latency_p95_ms"].is_number());

    // Feedback: a score and a preference.
    let (st, f) =
        send(&s, reqwest::Method::POST, "/v1/feedback", Some(json!({"image_id": ids[0], "score": 4})), None).await;
    assert_eq!(st, 201, "{f}");
    let (st, _) = send(
        &s,
        reqwest::Method::POST,
        "/v1/feedback",
        Some(json!({"image_id": ids[1], "preferred_over": ids[0]})),
        None,
    )
    .await;
    assert_eq!(st, 201);
    let (_, r) = send(&s, reqwest::Method::GET, &format!("/v1/experiments/{name}/results"), None, None).await;
    let scores: u64 = r["arms"].as_array().unwrap().iter().map(|a| a["feedback"]["scores"].as_u64().unwrap()).sum();
    assert_eq!(scores, 1);

    // Pausing refuses requests; DELETE archives (out of the list, results kept).
    let (st, e) =
        send(&s, reqwest::Method::PATCH, &format!("/v1/experiments/{name}"), Some(json!({"status": "paused"})), None)
            .await;
    assert_eq!((st, e["status"].as_str()), (200, Some("paused")));
    let (st, body) = s.generate(json!({"prompt": "", "user": "u", "experiment": name})).await;
    assert_error(st, &body, 409, Some("experiment"));
    let (st, _) = send(&s, reqwest::Method::DELETE, &format!("/v1/experiments/{name}"), None, None).await;
    assert_eq!(st, 200);
    let (_, list) = send(&s, reqwest::Method::GET, "/v1/experiments", None, None).await;
    assert!(list["data"].as_array().unwrap().iter().all(|e| e["name"] != name.as_str()), "{list}");
    let (st, r) = send(&s, reqwest::Method::GET, &format!("/v1/experiments/{name}/results"), None, None).await;
    assert_eq!((st, r["n"].as_u64()), (200, Some(60)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_experiments_and_requests_are_4xx_naming_the_field() {
    let data = tempfile::tempdir().unwrap();
    let s = server(data.path(), Some("admin")).await;
    let post = |body: Value, key: Option<&'static str>| {
        let s = &s;
        async move { send(s, reqwest::Method::POST, "/v1/experiments", Some(body), key).await }
    };
    let name = unique("fk-vs-plain");
    let (st, body) = post(spec(&name), None).await;
    assert_eq!(st, 401, "{body}");
    let mut bad = spec(&name);
    bad["arms"][1]["request"]["steering"]["particles"] = json!(0);
    let cases = vec![
        (bad, 400, "arms[1].request.steering.particles"),
        (json!({"name": "x", "arms": [{"name": "a"}]}), 400, "arms"),
        (json!({"name": "x y", "arms": [{"name": "a"}, {"name": "b"}]}), 400, "name"),
        (
            json!({"name": "x", "arms": [{"name": "a"}, {"name": "b", "request": {"prompt": "p"}}]}),
            400,
            "arms[1].request.prompt",
        ),
        (
            json!({"name": "x", "arms": [{"name": "a"}, {"name": "b", "request": {"stepz": 3}}]}),
            400,
            "arms[1].request.stepz",
        ),
        (json!({"name": "x", "arms": [{"name": "a"}, {"name": "b"}], "metrics": ["nope"]}), 400, "metrics[0]"),
        (json!({"name": "x", "arms": [{"name": "a"}, {"name": "b"}], "assignment": "roundrobin"}), 400, "assignment"),
    ];
    for (body, want, param) in cases {
        let (st, resp) = post(body.clone(), Some("admin")).await;
        assert_error(st, &resp, want, Some(param));
    }
    let (st, _) = post(spec(&name), Some("admin")).await;
    assert_eq!(st, 201);
    // A stored experiment this version cannot read (another version wrote it) does not hide the
    // others from the list.
    let url = postgres().unwrap_or_else(|| format!("sqlite://{}?mode=rwc", data.path().join("tiller.db").display()));
    let store = tiller::experiments::store::Store::open(&url).await.unwrap();
    store.create_experiment(&unique("unreadable"), "{\"not\": \"a spec\"}").await.unwrap();
    let (st, list) = send(&s, reqwest::Method::GET, "/v1/experiments", None, None).await;
    assert_eq!(st, 200, "{list}");
    assert!(list["data"].as_array().unwrap().iter().any(|e| e["name"] == name.as_str()), "{list}");
    let (st, resp) = post(spec(&name), Some("admin")).await;
    assert_error(st, &resp, 409, Some("name"));
    for (req, want, param) in [
        (json!({"prompt": "", "experiment": "nope", "user": "u"}), 404, "experiment"),
        (json!({"prompt": "", "experiment": name}), 400, "user"),
        (json!({"prompt": "", "experiment": name, "user": "u", "arm": "zz"}), 400, "arm"),
        (json!({"prompt": "", "arm": "fk"}), 400, "arm"),
    ] {
        let (st, resp) = s.generate(req).await;
        assert_error(st, &resp, want, Some(param));
    }
    // A streamed request joins too: its image is recorded before the completed event is sent.
    let r = s
        .client
        .post(format!("{}/v1/images/generations", s.url))
        .json(&json!({"prompt": "", "experiment": name, "user": "streamer", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    let completed: Value = text
        .split("\n\n")
        .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|v| v["type"] == "image_generation.completed")
        .unwrap_or_else(|| panic!("no completed event: {text}"));
    let streamed_id = completed["tiller"]["image_id"].as_str().expect("an image_id").to_string();
    let (st, _) =
        send(&s, reqwest::Method::POST, "/v1/feedback", Some(json!({"image_id": streamed_id, "score": 2})), None).await;
    assert_eq!(st, 201, "the streamed image is recorded");
    // A forced arm is honoured.
    let (st, body) = s.generate(json!({"prompt": "", "experiment": name, "user": "u", "arm": "fk"})).await;
    assert_eq!((st, body["data"][0]["tiller"]["experiment"]["arm"].as_str()), (200, Some("fk")));
    let id = body["data"][0]["tiller"]["image_id"].as_str().unwrap().to_string();
    for (fb, want, param) in [
        (json!({"image_id": "nope", "score": 1}), 404, "image_id"),
        (json!({"image_id": id, "score": 1, "preferred_over": id}), 400, "score"),
        (json!({"image_id": id}), 400, "score"),
        (json!({"image_id": id, "preferred_over": id}), 400, "preferred_over"),
        (json!({"image_id": id, "scor": 1}), 400, "scor"),
    ] {
        let (st, resp) = send(&s, reqwest::Method::POST, "/v1/feedback", Some(fb), None).await;
        assert_error(st, &resp, want, Some(param));
    }
    let (st, resp) = send(
        &s,
        reqwest::Method::PATCH,
        &format!("/v1/experiments/{name}"),
        Some(json!({"weights": {"zz": 1}})),
        Some("admin"),
    )
    .await;
    assert_error(st, &resp, 400, Some("weights.zz"));
}

/// Every request answered 200 before the server was killed with SIGKILL is in the results
/// after a restart on the same data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_records_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiller.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[models]\nroot = \"{}\"\ndefault = \"toy-gmm\"\nload = [\"toy-gmm\"]\ndevice = \"cpu\"\n[storage]\ndata_dir = \"{}\"\n{}",
            toy_gmm().parent().unwrap().display(),
            dir.path().join("data").display(),
            postgres().map(|u| format!("url = \"{u}\"\n")).unwrap_or_default()
        ),
    )
    .unwrap();
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiller"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines.next().expect("server output").unwrap();
            if let Some(i) = line.find("tiller listening on ") {
                break line[i + "tiller listening on ".len()..].split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        (child, url)
    };
    let client = reqwest::Client::new();
    let ready = |url: String| {
        let client = client.clone();
        async move {
            let t0 = Instant::now();
            while client.get(format!("{url}/ready")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
                assert!(t0.elapsed() < Duration::from_secs(60));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (mut child, url) = start();
    ready(url.clone()).await;
    let name = unique("fk-vs-plain");
    let r = client.post(format!("{url}/v1/experiments")).json(&spec(&name)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Clients keep sending; the server dies under them.
    let mut answered = Vec::new();
    let sender = {
        let client = client.clone();
        let url = url.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..1000 {
                let body = json!({"prompt": "", "user": format!("u{}", i % 7), "seed": i, "experiment": name});
                match client.post(format!("{url}/v1/images/generations")).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 200 => {
                        let v: Value = match r.json().await {
                            Ok(v) => v,
                            Err(_) => break,
                        };
                        ids.push(v["data"][0]["tiller"]["image_id"].as_str().unwrap().to_string());
                    }
                    _ => break,
                }
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    answered.extend(sender.await.unwrap());
    assert!(answered.len() >= 3, "only {} requests answered before the kill", answered.len());

    let (mut child, url) = start();
    ready(url.clone()).await;
    let r: Value =
        client.get(format!("{url}/v1/experiments/{name}/results")).send().await.unwrap().json().await.unwrap();
    assert!(r["n"].as_u64().unwrap() as usize >= answered.len(), "{} answered, {} recorded", answered.len(), r["n"]);
    for id in &answered {
        let st = client
            .post(format!("{url}/v1/feedback"))
            .json(&json!({"image_id": id, "score": 1}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(st, 201, "answered image {id} is not in the store");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The scenario on the default model: plain DDIM against FK steered by `shapes_clip`
/// (keeping its best particle), 60 requests from 20 users, the `shapes_clip` metric higher for
/// FK. About three minutes on two
/// cores: `cargo test --test http_experiments -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn fk_with_shapes_clip_beats_plain_ddim_on_the_default_model() {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    let engine = loaded_engine(&[("shapes", models.join("shapes"))], 16);
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.models.root = models;
    config.storage.data_dir = data.path().to_path_buf();
    config.storage.url = postgres();
    let s = start(engine, &config).await;
    let name = unique("ddim-vs-fk");
    let spec = json!({
        "name": name, "metrics": ["shapes_clip"], "assignment": "sticky",
        "arms": [
            // The same sampler in both arms (FK needs DDIM's noise, η = 1), so the difference is
            // the steering's.
            {"name": "ddim", "request": {"steps": 20, "scheduler": "ddim", "eta": 1.0}},
            {"name": "fk", "request": {"steps": 20, "scheduler": "ddim", "eta": 1.0,
                                       "steering": {"method": "fk", "particles": 4, "select": "best"}, "reward": "shapes_clip"}}
        ]
    });
    let (st, e) = send(&s, reqwest::Method::POST, "/v1/experiments", Some(spec), None).await;
    assert_eq!(st, 201, "{e}");
    // One prompt: the reward's scale differs between prompts, and sticky users split unevenly.
    let prompts = ["three green triangles"; 4];
    let mut arm_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..3 {
        for u in 0..20 {
            let user = format!("user-{u}");
            let body =
                json!({"prompt": prompts[(u + round) % 4], "user": user, "seed": round * 100 + u, "experiment": name});
            let (st, body) = s.generate(body).await;
            assert_eq!(st, 200, "{body}");
            arm_of
                .entry(user)
                .or_default()
                .insert(body["data"][0]["tiller"]["experiment"]["arm"].as_str().unwrap().into());
        }
    }
    assert!(arm_of.values().all(|a| a.len() == 1));
    assert_eq!(arm_of.values().flatten().collect::<BTreeSet<_>>().len(), 2);
    let (_, r) = send(&s, reqwest::Method::GET, &format!("/v1/experiments/{name}/results"), None, None).await;
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r["n"], 60);
    let m = |i: usize| &r["arms"][i]["metrics"]["shapes_clip"];
    assert!(m(1)["mean"].as_f64().unwrap() > m(0)["mean"].as_f64().unwrap(), "{r}");
    assert!(m(1)["vs_control"]["ci"].is_array());
}
