//! End-to-end HTTP test on the tiny SD 1.5-layout fixture model through the real loader.

mod http_support;

use std::time::Duration;

use http_support::*;
use serde_json::json;
use tiller::config::Config;
use tiller::engine::{Engine, EngineOptions, EngineState, LoadedModel};

async fn fixture_server(names: &[&str]) -> TestServer {
    fixture_server_with(names, &Config::default()).await
}

async fn fixture_server_with(names: &[&str], config: &Config) -> TestServer {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let engine = Engine::start(
        Box::new(move || {
            names
                .iter()
                .map(|n| {
                    tiller::models::loader::load_model(
                        n,
                        &fixture_dir(n),
                        &candle_core::Device::Cpu,
                        candle_core::DType::F32,
                    )
                    .map(|m| LoadedModel::new(n.clone(), m))
                    .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, String>>()
        }),
        EngineOptions { queue_depth: 4, default_model: Some("sd15-tiny".into()), ..Default::default() },
    );
    let state = engine.wait_ready_blocking(Duration::from_secs(60));
    assert_eq!(state, EngineState::Ready);
    start(engine, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_models_generate_over_http() {
    let s = fixture_server(&["sd15-tiny", "lcm-tiny", "turbo-tiny", "sd2-tiny"]).await;
    let models: serde_json::Value = s.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["lcm-tiny", "sd15-tiny", "sd2-tiny", "turbo-tiny"]);
    let sd15 = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "sd15-tiny").unwrap();
    assert_eq!(sd15["tiller"]["default"], true);
    assert_eq!(sd15["tiller"]["family"], "stable-diffusion");

    // Happy path on the default model, explicit size.
    let req = json!({"prompt": "a red circle", "negative_prompt": "blue", "size": "32x16", "steps": 3, "seed": 1});
    let (st, a) = s.generate(req.clone()).await;
    assert_eq!(st, 200, "{a}");
    let img = &a["data"][0];
    let (w, h, _) = decode_png(img["b64_json"].as_str().unwrap());
    assert_eq!((w, h), (32, 16));
    assert_eq!(img["tiller"]["model"], "sd15-tiny");
    assert_eq!(img["tiller"]["denoiser_evals"], 6);
    let (_, b) = s.generate(req).await;
    assert_eq!(a["data"][0]["b64_json"], b["data"][0]["b64_json"], "same seed, same bytes");

    // Model defaults: LCM takes 4 steps through its guidance embedding (one eval per step),
    // turbo 1 step without CFG.
    let (st, lcm) = s.generate(json!({"prompt": "x", "model": "lcm-tiny", "seed": 2})).await;
    assert_eq!(st, 200, "{lcm}");
    assert_eq!(lcm["data"][0]["tiller"]["scheduler"], "lcm");
    assert_eq!(lcm["data"][0]["tiller"]["steps"], 4);
    assert_eq!(lcm["data"][0]["tiller"]["denoiser_evals"], 4);
    let (st, turbo) = s.generate(json!({"prompt": "x", "model": "turbo-tiny", "n": 2})).await;
    assert_eq!(st, 200, "{turbo}");
    assert_eq!(turbo["data"][0]["tiller"]["steps"], 1);
    assert_eq!(turbo["data"][0]["tiller"]["denoiser_evals"], 2);
    let (st, v) = s.generate(json!({"prompt": "x", "model": "sd2-tiny", "steps": 2, "scheduler": "euler"})).await;
    assert_eq!(st, 200, "{v}");

    // A prompt longer than 77 tokens is truncated and reported.
    let long = "word ".repeat(100);
    let (st, t) = s.generate(json!({"prompt": long, "steps": 1})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["data"][0]["tiller"]["prompt_truncated"], true);

    // LCM steps above original_inference_steps are refused before queueing.
    let (st, e) = s.generate(json!({"prompt": "x", "model": "lcm-tiny", "steps": 60})).await;
    assert_error(st, &e, 400, Some("steps"));
}

/// The tiny SDXL pipeline over HTTP: listed as SDXL with its pipeline's guidance default, CFG
/// rows batched with their pooled embeddings and size ids, DPM-Solver++ 2M Karras, and no
/// negative prompt meaning zero embeddings (not the encoding of ""), as diffusers does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_fixture_generates_over_http() {
    let s = fixture_server(&["sd15-tiny", "sdxl-tiny"]).await;
    let models: serde_json::Value = s.get("/v1/models").await.json().await.unwrap();
    let xl = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "sdxl-tiny").unwrap();
    assert_eq!(xl["tiller"]["family"], "stable-diffusion-xl");
    assert_eq!(xl["tiller"]["scheduler"], "euler");

    let base = json!({"prompt": "a red circle", "model": "sdxl-tiny", "steps": 3, "seed": 4, "n": 2});
    let (st, a) = s.generate(base.clone()).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["data"][0]["tiller"]["guidance_scale"], 5.0);
    assert_eq!(a["data"][0]["tiller"]["denoiser_evals"], 12, "3 steps × 2 images × CFG");
    let (_, again) = s.generate(base.clone()).await;
    assert_eq!(a["data"][1]["b64_json"], again["data"][1]["b64_json"]);
    let mut empty = base.clone();
    empty["negative_prompt"] = json!("");
    let (st, b) = s.generate(empty).await;
    assert_eq!(st, 200, "{b}");
    assert_ne!(a["data"][0]["b64_json"], b["data"][0]["b64_json"], "zeros vs the encoding of \"\"");
    let mut dpm = base.clone();
    dpm["scheduler"] = json!("dpmpp-2m-karras");
    let (st, d) = s.generate(dpm).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["data"][0]["tiller"]["scheduler"], "dpmpp-2m-karras");
    let (w, h, _) = decode_png(d["data"][0]["b64_json"].as_str().unwrap());
    assert_eq!((w, h), (16, 16), "the UNet's sample_size × the VAE's factor");
}

/// The tiny SD3 pipeline over HTTP: a flow model with CFG, its flow samplers, FK through
/// flow-sde and FlowChef through the 16-channel VAE's gradient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd3_fixture_generates_and_steers_over_http() {
    let s = fixture_server(&["sd15-tiny", "sd3-tiny"]).await;
    let models: serde_json::Value = s.get("/v1/models").await.json().await.unwrap();
    let sd3 = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "sd3-tiny").unwrap();
    assert_eq!(sd3["tiller"]["family"], "stable-diffusion-3");
    assert_eq!(sd3["tiller"]["scheduler"], "flow-euler");
    assert_eq!(sd3["tiller"]["prediction_type"], "flow_prediction");
    assert_eq!(sd3["tiller"]["latent_channels"], 16);

    let base = json!({"prompt": "a red circle", "model": "sd3-tiny", "steps": 3, "seed": 4, "n": 2});
    let (st, a) = s.generate(base.clone()).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["data"][0]["tiller"]["guidance_scale"], 7.0);
    assert_eq!(a["data"][0]["tiller"]["denoiser_evals"], 12, "3 steps × 2 images × CFG");
    let (_, again) = s.generate(base.clone()).await;
    assert_eq!(a["data"][1]["b64_json"], again["data"][1]["b64_json"]);

    let mut fk = base.clone();
    fk["steering"] = json!({"method": "fk", "particles": 3});
    fk["reward"] = json!("brightness");
    let (st, f) = s.generate(fk).await;
    assert_eq!(st, 200, "{f}");
    assert_eq!(f["data"][0]["tiller"]["scheduler"], "flow-sde");
    let mut chef = base.clone();
    chef["steering"] = json!({"method": "flowchef", "step_size": 50.0, "inner_steps": 2});
    chef["reward"] = json!("brightness");
    chef["n"] = json!(1);
    let (st, c) = s.generate(chef).await;
    assert_eq!(st, 200, "{c}");
    let mut plain = base.clone();
    plain["n"] = json!(1);
    plain["reward"] = json!("brightness");
    let (_, p) = s.generate(plain).await;
    let (rc, rp) = (
        c["data"][0]["tiller"]["steering"]["reward"].as_f64().unwrap(),
        p["data"][0]["tiller"]["steering"]["reward"].as_f64().unwrap(),
    );
    assert!(rc > rp, "FlowChef on SD3 must raise brightness: {rp} → {rc}");
    let (st, e) = s.generate(json!({"prompt": "x", "model": "sd3-tiny", "scheduler": "ddim"})).await;
    assert_error(st, &e, 400, Some("scheduler"));
}

/// The tiny FLUX pipelines over HTTP: dev takes the guidance scale as an embedding (one
/// evaluation per step, never CFG), schnell defaults to 4 steps and ignores guidance; FK runs
/// through flow-sde.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_fixtures_generate_over_http() {
    let s = fixture_server(&["sd15-tiny", "flux-dev-tiny", "flux-schnell-tiny"]).await;
    let base =
        json!({"prompt": "a red circle", "model": "flux-dev-tiny", "steps": 3, "seed": 4, "n": 2, "size": "16x16"});
    let (st, a) = s.generate(base.clone()).await;
    assert_eq!(st, 200, "{a}");
    let t = &a["data"][0]["tiller"];
    assert_eq!(t["guidance_scale"], 3.5);
    assert_eq!(t["denoiser_evals"], 6, "3 steps × 2 images, guidance by embedding");
    let mut other = base.clone();
    other["guidance_scale"] = json!(5.0);
    let (_, b) = s.generate(other).await;
    assert_ne!(a["data"][0]["b64_json"], b["data"][0]["b64_json"], "dev's guidance embedding changes the image");

    let (st, sc) = s.generate(json!({"prompt": "x", "model": "flux-schnell-tiny", "size": "16x16", "seed": 1})).await;
    assert_eq!(st, 200, "{sc}");
    assert_eq!(sc["data"][0]["tiller"]["steps"], 4);
    assert_eq!(sc["data"][0]["tiller"]["denoiser_evals"], 4);

    let mut fk = base.clone();
    fk["steering"] = json!({"method": "fk", "particles": 3});
    fk["reward"] = json!("brightness");
    let (st, f) = s.generate(fk).await;
    assert_eq!(st, 200, "{f}");
    assert_eq!(f["data"][0]["tiller"]["scheduler"], "flow-sde");

    // Sides must hold whole 2×2 latent patches: a multiple of the VAE factor alone is a 400.
    let (st, e) = s.generate(json!({"prompt": "x", "model": "flux-dev-tiny", "size": "18x18"})).await;
    assert_error(st, &e, 400, Some("size"));
    assert!(e["error"]["message"].as_str().unwrap().contains("multiples of 4"), "{e}");
}

/// SD3's position table bounds the image: a side beyond it is a 400 naming `size` even where the
/// server's limits would allow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd3_sizes_beyond_the_position_table_are_400s() {
    let mut config = Config::default();
    config.limits.max_width = Some(256);
    config.limits.max_height = Some(256);
    config.limits.max_pixels = Some(256 * 256);
    let s = fixture_server_with(&["sd15-tiny", "sd3-tiny"], &config).await;
    let (st, e) = s.generate(json!({"prompt": "x", "model": "sd3-tiny", "size": "64x16", "steps": 1})).await;
    assert_error(st, &e, 400, Some("size"));
    assert!(e["error"]["message"].as_str().unwrap().contains("48"), "{e}");
    let (st, ok) = s.generate(json!({"prompt": "x", "model": "sd3-tiny", "size": "48x16", "steps": 1})).await;
    assert_eq!(st, 200, "{ok}");
}
