//! Steering end to end over HTTP: the real loader on the analytic `models/toy-gmm` (and the
//! sd15-tiny fixture), every strategy with its metadata and trace, replay, the 400s of the
//! steering/reward fields, `GET /v1/rewards`, and an `http` reward against a scorer started here.

mod http_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use http_support::*;
use serde_json::{json, Value};
use tiller::config::Config;
use tiller::reward::RewardConfig;

/// A server whose engine loads `dirs` (name, directory) through the real loader.
async fn server_with(dirs: Vec<(String, PathBuf)>, config: Config) -> TestServer {
    let models: Vec<(&str, PathBuf)> = dirs.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    start(loaded_engine(&models, 4), &config).await
}

fn toy_gmm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/toy-gmm")
}

async fn gmm_server(config: Config) -> TestServer {
    server_with(vec![("toy-gmm".into(), toy_gmm_dir())], config).await
}

fn b64(img: &Value) -> &str {
    img["b64_json"].as_str().unwrap()
}

/// The image's RGB pixels (the PNG's `parameters` chunk differs between requests that draw
/// the same image by different means: another steering method, a reward only reported).
fn pixels(img: &Value) -> Vec<u8> {
    decode_png(b64(img)).2
}

/// Mean of all RGB bytes of the image's PNG, in [0, 1].
fn png_brightness(img: &Value) -> f64 {
    let (_, _, rgb) = decode_png(b64(img));
    rgb.iter().map(|&v| v as f64).sum::<f64>() / (rgb.len() as f64 * 255.0)
}

/// Mean of the red bytes of a base64 PNG, in [0, 1].
fn png_red(b64_png: &str) -> f64 {
    let (_, _, rgb) = decode_png(b64_png);
    rgb.chunks(3).map(|p| p[0] as f64).sum::<f64>() / ((rgb.len() / 3) as f64 * 255.0)
}

/// The reward is computed on the decoded image before quantisation: within half a level of the
/// PNG's mean.
const QUANT_TOL: f64 = 0.5 / 255.0 + 1e-5;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// The common checks of a steered image: method, brightness reward equal to the PNG's,
/// evaluation counts and phase timings. Returns the image's `tiller.steering`.
fn check_brightness_image<'a>(img: &'a Value, method: &str, denoiser_evals: u64, reward_evals: u64) -> &'a Value {
    let t = &img["tiller"];
    let st = &t["steering"];
    assert_eq!(st["method"], method, "{st}");
    assert_eq!(st["reward_name"], "brightness", "{st}");
    let reward = st["reward"].as_f64().unwrap_or_else(|| panic!("no reward: {st}"));
    let png = png_brightness(img);
    assert!((reward - png).abs() <= QUANT_TOL, "{method}: reward {reward} vs PNG brightness {png}");
    assert_eq!(u(&t["denoiser_evals"]), denoiser_evals, "{method}: {t}");
    assert_eq!(u(&st["reward_evals"]), reward_evals, "{method}: {st}");
    for k in ["encode_ms", "denoise_ms", "reward_ms", "decode_ms", "other_ms"] {
        let v = st["phases"][k].as_f64().unwrap_or_else(|| panic!("phases.{k} missing: {st}"));
        assert!(v >= 0.0 && v.is_finite(), "phases.{k} = {v}");
    }
    assert!(st["phases"]["denoise_ms"].as_f64().unwrap() > 0.0, "{st}");
    st
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fk_on_toy_gmm_reports_reward_counts_and_trace() {
    let s = gmm_server(Config::default()).await;
    let (k, steps, n) = (8u64, 12u64, 2u64);
    let (st, body) = s
        .generate(json!({
            "prompt": "ignored", "n": n, "seed": 21, "steps": steps, "trace": true, "reward": "brightness",
            "steering": {"method": "fk", "particles": k, "beta": 4, "resample": {"every": 5, "start": 0, "end": 1}},
        }))
        .await;
    assert_eq!(st, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), n as usize);
    // Resampling at steps 5 and 10 (never at 0), plus the terminal scoring of every particle.
    let resample_steps = [5u64, 10];
    let reward_evals = (resample_steps.len() as u64 + 1) * n * k;
    for (i, img) in data.iter().enumerate() {
        let (w, h, _) = decode_png(b64(img));
        assert_eq!((w, h), (8, 8));
        let t = &img["tiller"];
        assert_eq!(t["seed"], 21 + i as u64);
        assert_eq!(t["scheduler"], "ddim");
        assert_eq!(t["eta"], 1.0, "fk defaults DDIM to eta 1");
        assert_eq!(t["guidance_scale"], 1.0, "toy-gmm ignores prompts: no CFG");
        // Prompt-free model: one evaluation per particle per step.
        let sm = check_brightness_image(img, "fk", steps * n * k, reward_evals);
        assert!(sm.get("optimized_noise").is_none(), "{sm}");
        let trace = sm["trace"].as_array().unwrap();
        let resamples: Vec<&Value> = trace.iter().filter(|e| e["kind"] == "resample").collect();
        assert_eq!(resamples.iter().map(|e| u(&e["step"])).collect::<Vec<_>>(), resample_steps, "{sm}");
        for e in &resamples {
            let w = floats(&e["weights"]);
            assert_eq!(w.len(), k as usize);
            assert!(w.iter().all(|v| (0.0..=1.0).contains(v)), "{e}");
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "weights sum: {e}");
            let ess = e["ess"].as_f64().unwrap();
            assert!((1.0 - 1e-9..=k as f64 + 1e-9).contains(&ess), "ess {ess}");
            assert_eq!(floats(&e["rewards"]).len(), k as usize);
            let chosen = e["chosen"].as_array().unwrap();
            assert_eq!(chosen.len(), k as usize);
            assert!(chosen.iter().all(|a| u(a) < k), "{e}");
        }
        let last = trace.last().unwrap();
        assert_eq!(last["kind"], "final", "{sm}");
        assert_eq!(u(&last["step"]), steps);
        let finals = floats(&last["rewards"]);
        assert_eq!(finals.len(), k as usize);
        let pick = u(&last["chosen"][0]) as usize;
        assert_eq!(finals[pick] as f32, sm["reward"].as_f64().unwrap() as f32, "the returned particle's reward");
        assert!((floats(&last["weights"]).iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(trace.len(), resample_steps.len() + 1, "{sm}");
    }

    // Without `trace`, no trace.
    let (st, body) = s
        .generate(json!({"prompt": "", "seed": 1, "steps": 6, "reward": "brightness", "steering": {"method": "fk", "particles": 2}}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["data"][0]["tiller"]["steering"].get("trace").is_none(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svdd_best_of_n_and_none_on_toy_gmm() {
    let s = gmm_server(Config::default()).await;
    let n = 2u64;

    // SVDD: one shared prediction at step 0, then m candidates valued at every step but the last
    // (the winner's prediction is reused), and the final images scored.
    let (m, steps) = (4u64, 6u64);
    let (st, body) = s
        .generate(json!({
            "prompt": "", "n": n, "seed": 3, "steps": steps, "trace": true, "reward": "brightness",
            "steering": {"method": "svdd", "candidates": m, "alpha": 0.5},
        }))
        .await;
    assert_eq!(st, 200, "{body}");
    for img in body["data"].as_array().unwrap() {
        let sm = check_brightness_image(img, "svdd", n + (steps - 1) * n * m, (steps - 1) * n * m + n);
        let trace = sm["trace"].as_array().unwrap();
        assert_eq!(trace.len() as u64, steps - 1, "{sm}");
        for (i, e) in trace.iter().enumerate() {
            assert_eq!(e["kind"], "select");
            assert_eq!(u(&e["step"]), i as u64);
            assert_eq!(floats(&e["rewards"]).len(), m as usize);
            let w = floats(&e["weights"]);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{e}");
            let ess = e["ess"].as_f64().unwrap();
            assert!((1.0 - 1e-9..=m as f64 + 1e-9).contains(&ess), "ess {ess}");
            assert!(u(&e["chosen"][0]) < m);
        }
        assert_eq!(img["tiller"]["eta"], 1.0);
    }

    // Best-of-N: N samples per image, the best one returned.
    let (bn, steps) = (3u64, 5u64);
    let (st, body) = s
        .generate(json!({
            "prompt": "", "n": n, "seed": 4, "steps": steps, "trace": true, "reward": "brightness",
            "steering": {"method": "best_of_n", "n": bn},
        }))
        .await;
    assert_eq!(st, 200, "{body}");
    for img in body["data"].as_array().unwrap() {
        let sm = check_brightness_image(img, "best_of_n", steps * n * bn, n * bn);
        let trace = sm["trace"].as_array().unwrap();
        assert_eq!(trace.len(), 1, "{sm}");
        assert_eq!(trace[0]["kind"], "select");
        let rs = floats(&trace[0]["rewards"]);
        assert_eq!(rs.len(), bn as usize);
        let best = rs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(rs[u(&trace[0]["chosen"][0]) as usize], best);
        assert_eq!(sm["reward"].as_f64().unwrap() as f32, best as f32);
        // Best-of-N keeps the model's sampler settings (deterministic DDIM is fine).
        assert_eq!(img["tiller"]["eta"], 0.0);
    }

    // `none` with a reward: plain sampling, the reward only reported. Explicit and absent
    // `steering` give the same images.
    let steps = 5u64;
    let req = json!({"prompt": "", "n": n, "seed": 5, "steps": steps, "trace": true, "reward": "brightness",
                     "steering": {"method": "none"}});
    let (st, a) = s.generate(req.clone()).await;
    assert_eq!(st, 200, "{a}");
    for img in a["data"].as_array().unwrap() {
        let sm = check_brightness_image(img, "none", steps * n, n);
        assert_eq!(sm["trace"], json!([]), "{sm}");
    }
    let mut no_steering = req.clone();
    no_steering.as_object_mut().unwrap().remove("steering");
    let (st, b) = s.generate(no_steering).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"][1]["tiller"]["steering"]["method"], "none");
    assert_eq!(b64(&a["data"][1]), b64(&b["data"][1]));
    // Without a reward: nothing scored.
    let (st, c) = s.generate(json!({"prompt": "", "seed": 5, "steps": steps})).await;
    assert_eq!(st, 200, "{c}");
    let sm = &c["data"][0]["tiller"]["steering"];
    assert_eq!(sm["method"], "none");
    assert_eq!(sm["reward"], Value::Null);
    assert_eq!(sm["reward_name"], Value::Null);
    assert_eq!(sm["reward_evals"], 0);
    assert_eq!(pixels(&a["data"][0]), pixels(&c["data"][0]), "reporting a reward does not change the image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reno_noise_replays_as_init_latents() {
    let s = gmm_server(Config::default()).await;
    let (iters, steps, n) = (3u64, 4u64, 2u64);
    let (st, body) = s
        .generate(json!({
            "prompt": "", "n": n, "seed": 9, "steps": steps, "scheduler": "ddim", "trace": true,
            "reward": "brightness",
            "steering": {"method": "reno", "iterations": iters, "lr": 2.0, "return_noise": true},
        }))
        .await;
    assert_eq!(st, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    for img in data {
        // Forward passes only are counted: iterations × steps × images.
        let sm = check_brightness_image(img, "reno", iters * steps * n, iters * n);
        let trace = sm["trace"].as_array().unwrap();
        assert_eq!(trace.len() as u64, iters, "{sm}");
        for (i, e) in trace.iter().enumerate() {
            assert_eq!(e["kind"], "iteration");
            assert_eq!(u(&e["step"]), i as u64);
            assert_eq!(floats(&e["rewards"]).len(), 1);
            // Every iteration but the last takes a gradient step.
            let updated = (i as u64) + 1 < iters;
            assert_eq!(e.get("grad_norm").is_some(), updated, "{e}");
            assert_eq!(e.get("loss").is_some(), updated, "{e}");
        }
        // The best iterate (iteration 0 included) is returned.
        let best = trace.iter().map(|e| e["rewards"][0].as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(sm["reward"].as_f64().unwrap() as f32, best as f32);
    }
    for img in data {
        let noise = img["tiller"]["steering"]["optimized_noise"].as_str().expect("return_noise");
        let seed = u(&img["tiller"]["seed"]);
        for steering in [json!({"method": "none"}), Value::Null] {
            let (st, replay) = s
                .generate(json!({
                    "prompt": "", "seed": seed, "steps": steps, "scheduler": "ddim", "init_latents": noise,
                    "steering": steering,
                }))
                .await;
            assert_eq!(st, 200, "{replay}");
            assert_eq!(pixels(&replay["data"][0]), pixels(img), "seed {seed}: optimised noise replays");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steered_requests_replay_from_their_seed() {
    let s = gmm_server(Config::default()).await;
    for steering in [
        json!({"method": "fk", "particles": 4, "beta": 4, "resample": {"every": 2}}),
        json!({"method": "svdd", "candidates": 3, "alpha": 0.2}),
        json!({"method": "best_of_n", "n": 3}),
    ] {
        let req = json!({"prompt": "", "n": 2, "seed": 40, "steps": 8, "reward": "brightness", "steering": steering});
        let (st, a) = s.generate(req.clone()).await;
        assert_eq!(st, 200, "{a}");
        let (_, b) = s.generate(req.clone()).await;
        for i in 0..2 {
            assert_eq!(pixels(&a["data"][i]), pixels(&b["data"][i]), "{steering}: image {i}");
            assert_eq!(a["data"][i]["tiller"]["steering"]["reward"], b["data"][i]["tiller"]["steering"]["reward"]);
        }
        // Image 1 of seed 40 is image 0 of seed 41: groups never share noise or resampling.
        let mut one = req.clone();
        one["n"] = json!(1);
        one["seed"] = json!(41);
        let (st, c) = s.generate(one).await;
        assert_eq!(st, 200, "{c}");
        assert_eq!(pixels(&a["data"][1]), pixels(&c["data"][0]), "{steering}: per-image seeds");
        // A different seed gives a different image.
        let mut other = req.clone();
        other["seed"] = json!(4000);
        let (_, d) = s.generate(other).await;
        assert_ne!(pixels(&a["data"][0]), pixels(&d["data"][0]), "{steering}");
    }
}

/// A valid `init_latents` for toy-gmm (n = 1): 3×8×8 zeros.
fn gmm_init_latents() -> String {
    let t = candle_core::Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let bytes = tiller::util::tensor_io::to_safetensors_bytes(&[("latents", &t)]).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_steering_and_reward_fields_are_400_naming_the_field() {
    let mut config = Config::default();
    config.limits.max_particles = 16;
    let s = gmm_server(config).await;
    let base = |extra: Value| {
        let mut req = json!({"prompt": "", "seed": 1, "steps": 4});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    };
    let fk = json!({"method": "fk", "particles": 4});
    let cases: Vec<(Value, &str, &[&str])> = vec![
        (json!({"steering": {"method": "smc"}, "reward": "brightness"}), "steering.method", &["smc", "fk"]),
        (json!({"steering": {"particles": 4}, "reward": "brightness"}), "steering.method", &["required"]),
        (json!({"steering": {"method": 3}, "reward": "brightness"}), "steering.method", &["method"]),
        (json!({"steering": "fk", "reward": "brightness"}), "steering", &["object"]),
        (
            json!({"steering": {"method": "fk", "partilces": 4}, "reward": "brightness"}),
            "steering.partilces",
            &["partilces", "particles"],
        ),
        // `none` takes no parameters: a stray key is not ignored.
        (json!({"steering": {"method": "none", "particles": 4}, "reward": "brightness"}), "steering.particles", &[]),
        // Type errors and nested errors name the key too.
        (json!({"steering": {"method": "fk", "particles": "8"}, "reward": "brightness"}), "steering.particles", &[]),
        (json!({"steering": {"method": "fk", "particles": -1}, "reward": "brightness"}), "steering.particles", &[]),
        (json!({"steering": {"method": "fk", "particles": 2.5}, "reward": "brightness"}), "steering.particles", &[]),
        (json!({"steering": {"method": "fk", "potential": "dif"}, "reward": "brightness"}), "steering.potential", &[]),
        (
            json!({"steering": {"method": "fk", "resample": {"evry": 5}}, "reward": "brightness"}),
            "steering.resample.evry",
            &["evry", "every"],
        ),
        (json!({"steering": {"method": "reno", "lr": "fast"}, "reward": "brightness"}), "steering.lr", &[]),
        (json!({"steering": {"method": "fk", "particles": 0}, "reward": "brightness"}), "steering.particles", &["16"]),
        (
            json!({"steering": {"method": "fk", "particles": 17}, "reward": "brightness"}),
            "steering.particles",
            &["max_particles", "17"],
        ),
        (json!({"steering": {"method": "svdd", "candidates": 17}, "reward": "brightness"}), "steering.candidates", &[]),
        (json!({"steering": {"method": "best_of_n", "n": 0}, "reward": "brightness"}), "steering.n", &[]),
        (json!({"steering": {"method": "fk", "beta": -1}, "reward": "brightness"}), "steering.beta", &[]),
        (
            json!({"steering": {"method": "fk", "resample": {"every": 0}}, "reward": "brightness"}),
            "steering.resample.every",
            &[],
        ),
        (
            json!({"steering": {"method": "reno", "iterations": 0}, "reward": "brightness"}),
            "steering.iterations",
            &["max_reno_iterations"],
        ),
        (json!({"steering": fk}), "reward", &["needs a `reward`"]),
        (json!({"steering": fk, "reward": "sharpness"}), "reward", &["sharpness", "brightness"]),
        (json!({"steering": fk, "reward": {"name": "sharpness"}}), "reward.name", &["sharpness"]),
        (json!({"steering": fk, "reward": "color"}), "reward.target", &["target"]),
        (json!({"steering": fk, "reward": {"name": "color", "target": [2, 0, 0]}}), "reward.target", &[]),
        (json!({"steering": fk, "reward": {"name": "brightness", "wieght": 1}}), "reward.wieght", &["wieght"]),
        (json!({"steering": fk, "reward": 3}), "reward", &[]),
        (
            json!({"steering": {"method": "reno"}, "reward": "jpeg_compressibility"}),
            "reward",
            &["differentiable", "jpeg_compressibility"],
        ),
        (
            json!({"steering": {"method": "reno"}, "reward": [{"name": "brightness"}, {"name": "jpeg_incompressibility"}]}),
            "reward",
            &["differentiable"],
        ),
        (json!({"steering": fk, "reward": "brightness", "eta": 0}), "eta", &["stochastic", "eta"]),
        (json!({"steering": {"method": "svdd"}, "reward": "brightness", "eta": 0.0}), "eta", &["stochastic"]),
        (json!({"steering": fk, "reward": "brightness", "scheduler": "euler"}), "scheduler", &["stochastic", "euler"]),
        (json!({"steering": fk, "reward": "brightness", "init_latents": gmm_init_latents()}), "init_latents", &["fk"]),
        (
            json!({"steering": {"method": "best_of_n"}, "reward": "brightness", "init_latents": gmm_init_latents()}),
            "init_latents",
            &[],
        ),
        (
            json!({"steering": {"method": "fk", "resample": {"start": 0.9, "end": 1}}, "reward": "brightness"}),
            "steering.resample",
            &["4 steps"],
        ),
        (
            json!({"steering": {"method": "reno"}, "reward": "brightness", "steps": 5}),
            "steps",
            &["max_reno_steps", "5"],
        ),
        (json!({"steering": fk, "reward": "brightness", "trace": "yes"}), "trace", &["boolean"]),
        (json!({"steering": fk, "reward": "brightness", "trace": 1}), "trace", &[]),
    ];
    for (extra, param, words) in cases {
        let (st, body) = s.generate(base(extra.clone())).await;
        assert_error(st, &body, 400, Some(param));
        let msg = body["error"]["message"].as_str().unwrap();
        for w in words {
            assert!(msg.contains(w), "{extra}: message {msg:?} should mention {w:?}");
        }
    }
    // The stochastic samplers are accepted for fk, and the explicit eta is kept.
    for extra in [
        json!({"steering": fk, "reward": "brightness", "eta": 0.5}),
        json!({"steering": fk, "reward": "brightness", "scheduler": "ddpm"}),
        json!({"steering": fk, "reward": "brightness", "scheduler": "euler-ancestral"}),
        json!({"steering": {"method": "reno", "iterations": 1}, "reward": {"name": "color", "target": [1, 0, 0]}, "init_latents": gmm_init_latents()}),
    ] {
        let (st, body) = s.generate(base(extra.clone())).await;
        assert_eq!(st, 200, "{extra}: {body}");
    }
    let (_, body) = s.generate(base(json!({"steering": fk, "reward": "brightness", "eta": 0.5}))).await;
    assert_eq!(body["data"][0]["tiller"]["eta"], 0.5);
}

/// A scorer for the `http` reward: `/good` scores each image 1 + its mean red value; `/fail`
/// answers 500; `/slow` answers after 3 s.
async fn start_scorer() -> std::net::SocketAddr {
    async fn good(Json(body): Json<Value>) -> Json<Value> {
        let scores: Vec<f64> =
            body["images"].as_array().unwrap().iter().map(|p| 1.0 + png_red(p.as_str().unwrap())).collect();
        Json(json!({ "scores": scores }))
    }
    let app = Router::new()
        .route("/good", post(good))
        .route("/fail", post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "scorer exploded") }))
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Json(json!({"scores": [0.0]}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn http_reward(addr: std::net::SocketAddr, route: &str, timeout_ms: u64) -> RewardConfig {
    RewardConfig {
        kind: "http".into(),
        url: Some(format!("http://{addr}/{route}")),
        timeout_ms: Some(timeout_ms),
        ..RewardConfig::default()
    }
}

async fn scorer_server() -> TestServer {
    let addr = start_scorer().await;
    let config = Config {
        rewards: BTreeMap::from([
            ("scorer".to_string(), http_reward(addr, "good", 5_000)),
            ("broken".to_string(), http_reward(addr, "fail", 5_000)),
            ("sleepy".to_string(), http_reward(addr, "slow", 300)),
        ]),
        ..Config::default()
    };
    gmm_server(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_endpoint_lists_builtins_and_configured() {
    let s = scorer_server().await;
    let resp = s.get("/v1/rewards").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    let find = |name: &str| data.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name}: {body}"));
    for (name, kind, differentiable) in [
        ("brightness", "brightness", true),
        ("color", "color", true),
        ("jpeg_compressibility", "jpeg_compressibility", false),
        ("jpeg_incompressibility", "jpeg_incompressibility", false),
        ("scorer", "http", false),
        ("broken", "http", false),
        ("sleepy", "http", false),
        // shipped under the models root (models/shapes-clip), offered with no configuration
        ("shapes_clip", "clip_score", true),
    ] {
        let r = find(name);
        assert_eq!(r["kind"], kind, "{r}");
        assert_eq!(r["differentiable"], differentiable, "{r}");
        assert!(r["description"].as_str().is_some_and(|d| !d.is_empty()), "{r}");
    }
    assert_eq!(data.len(), 8, "{body}");
    let names: Vec<&str> = data.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "listed by name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reward_scores_fails_and_times_out_cleanly() {
    let s = scorer_server().await;

    // Good scorer, reported only: the image's reward is what the scorer said about its PNG.
    let (st, body) = s.generate(json!({"prompt": "p", "n": 2, "seed": 2, "steps": 4, "reward": "scorer"})).await;
    assert_eq!(st, 200, "{body}");
    for img in body["data"].as_array().unwrap() {
        let sm = &img["tiller"]["steering"];
        assert_eq!(sm["reward_name"], "scorer");
        let want = (1.0 + png_red(b64(img))) as f32;
        assert_eq!(sm["reward"].as_f64().unwrap() as f32, want, "{sm}");
    }
    // Steering with it (non-differentiable is fine for fk).
    let (st, body) = s
        .generate(json!({"prompt": "p", "seed": 2, "steps": 6, "reward": "scorer",
                         "steering": {"method": "fk", "particles": 3, "resample": {"every": 2, "start": 0, "end": 1}}}))
        .await;
    assert_eq!(st, 200, "{body}");
    let img = &body["data"][0];
    assert_eq!(img["tiller"]["steering"]["reward"].as_f64().unwrap() as f32, (1.0 + png_red(b64(img))) as f32);
    // Steps 2 and 4, then the terminal scoring: 3 particles each.
    assert_eq!(img["tiller"]["steering"]["reward_evals"], 9);
    // ReNO cannot use it.
    let (st, body) = s.generate(json!({"prompt": "p", "steering": {"method": "reno"}, "reward": "scorer"})).await;
    assert_error(st, &body, 400, Some("reward"));

    // A scorer answering 500: 502 naming the reward.
    let (st, body) = s.generate(json!({"prompt": "p", "seed": 2, "steps": 4, "reward": "broken"})).await;
    assert_error(st, &body, 502, Some("reward"));
    assert_eq!(body["error"]["code"], "reward_upstream_error", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("broken") && msg.contains("500") && msg.contains("scorer exploded"), "{msg}");

    // A scorer slower than timeout_ms: 504, well before the scorer would answer.
    let t0 = Instant::now();
    let (st, body) = s
        .generate(json!({"prompt": "p", "seed": 2, "steps": 4, "reward": "sleepy",
                         "steering": {"method": "best_of_n", "n": 2}}))
        .await;
    assert_error(st, &body, 504, Some("reward"));
    assert_eq!(body["error"]["code"], "reward_upstream_timeout", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("300 ms"), "{body}");
    assert!(t0.elapsed() < Duration::from_millis(2500), "{:?}", t0.elapsed());

    // The server is still healthy and serves the next requests.
    let health: Value = s.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let (st, body) = s.generate(json!({"prompt": "p", "seed": 2, "steps": 4})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = s.generate(json!({"prompt": "p", "seed": 2, "steps": 4, "reward": "scorer"})).await;
    assert_eq!(st, 200, "{body}");
    let stats = s.engine().stats();
    assert_eq!(stats.failed, 2, "{stats:?}");
    assert_eq!((stats.queued, stats.in_flight), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fk_on_the_sd15_fixture_counts_cfg_evaluations() {
    let s = server_with(vec![("sd15-tiny".into(), fixture_dir("sd15-tiny"))], Config::default()).await;
    let (k, steps) = (2u64, 4u64);
    let req = json!({
        "prompt": "a red circle", "seed": 6, "steps": steps, "reward": "brightness", "trace": true,
        "steering": {"method": "fk", "particles": k, "beta": 4, "resample": {"every": 2, "start": 0, "end": 1}},
    });
    let (st, body) = s.generate(req.clone()).await;
    assert_eq!(st, 200, "{body}");
    let img = &body["data"][0];
    let (w, h, _) = decode_png(b64(img));
    assert_eq!((w, h), (16, 16), "the fixture's default size");
    let t = &img["tiller"];
    assert_eq!(t["guidance_scale"], 7.5);
    assert_eq!(t["steps"], steps);
    assert_eq!(t["scheduler"], "ddim");
    assert_eq!(t["eta"], 1.0);
    // steps × particles × n × 2 CFG branches; resampling at step 2, then the terminal scoring.
    let sm = check_brightness_image(img, "fk", steps * k * 2, 2 * k);
    let kinds: Vec<&str> = sm["trace"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["resample", "final"]);
    let (_, again) = s.generate(req).await;
    assert_eq!(pixels(img), pixels(&again["data"][0]));
    // With n = 2, the work doubles.
    let (st, body) = s
        .generate(json!({"prompt": "x", "n": 2, "seed": 6, "steps": steps, "reward": "brightness",
                         "steering": {"method": "fk", "particles": k}}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(u(&body["data"][1]["tiller"]["denoiser_evals"]), steps * k * 2 * 2);
}
