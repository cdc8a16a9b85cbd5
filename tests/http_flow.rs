//! Flow-matching models over HTTP: the shipped exact flow mixture `models/toy-flow` (beside the
//! VP `models/toy-gmm`) through the real loader, engine and API. Every steering method runs on
//! it with its metadata; samplers of the wrong family, FlowChef on a diffusion model and
//! FlowChef with a non-differentiable reward are 400s naming the field.

mod http_support;

use std::path::PathBuf;

use http_support::*;
use serde_json::{json, Value};
use tiller::config::Config;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name)
}

async fn server() -> TestServer {
    let models = [("toy-flow", model_dir("toy-flow")), ("toy-gmm", model_dir("toy-gmm"))];
    start(loaded_engine(&models, 4), &Config::default()).await
}

fn brightness(img: &Value) -> f64 {
    let (_, _, rgb) = decode_png(img["b64_json"].as_str().unwrap());
    rgb.iter().map(|&v| v as f64).sum::<f64>() / (rgb.len() as f64 * 255.0)
}

fn mean_brightness(body: &Value) -> f64 {
    let data = body["data"].as_array().unwrap();
    data.iter().map(brightness).sum::<f64>() / data.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_model_is_listed_with_its_flow_defaults() {
    let s = server().await;
    let models: Value = s.get("/v1/models").await.json().await.unwrap();
    let flow = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "toy-flow").expect("toy-flow listed");
    assert_eq!(flow["tiller"]["scheduler"], "flow-euler", "{flow}");
    assert_eq!(flow["tiller"]["scheduler_class"], "FlowMatchEulerDiscreteScheduler");
    assert_eq!(flow["tiller"]["prediction_type"], "flow_prediction");

    let (st, body) = s.generate(json!({"model": "toy-flow", "prompt": "", "n": 2, "seed": 3})).await;
    assert_eq!(st, 200, "{body}");
    let t = &body["data"][0]["tiller"];
    assert_eq!(t["scheduler"], "flow-euler");
    assert_eq!(t["steps"], 28, "the SD3 pipeline's default step count");
    // Plain flow-sde defaults to η = 1 (it is the stochastic sampler).
    let (st, body) =
        s.generate(json!({"model": "toy-flow", "prompt": "", "seed": 3, "scheduler": "flow-sde", "steps": 6})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"][0]["tiller"]["eta"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_steering_method_runs_on_the_flow_model() {
    let s = server().await;
    let n = 8;
    let base = |steering: Value, steps: u64| {
        json!({"model": "toy-flow", "prompt": "", "n": n, "seed": 11, "steps": steps, "reward": "brightness",
               "trace": true, "steering": steering})
    };
    let (st, plain) = s.generate(base(json!({"method": "none"}), 12)).await;
    assert_eq!(st, 200, "{plain}");
    let plain_b = mean_brightness(&plain);
    let cases = [
        (json!({"method": "best_of_n", "n": 4}), 12, "flow-euler"),
        (json!({"method": "fk", "particles": 8, "beta": 20}), 12, "flow-sde"),
        (json!({"method": "svdd", "candidates": 4}), 12, "flow-sde"),
        (json!({"method": "reno", "iterations": 4}), 4, "flow-euler"),
        (json!({"method": "flowchef", "step_size": 1.0, "inner_steps": 2}), 12, "flow-euler"),
    ];
    for (steering, steps, scheduler) in cases {
        let method = steering["method"].as_str().unwrap().to_string();
        let (st, body) = s.generate(base(steering, steps)).await;
        assert_eq!(st, 200, "{method}: {body}");
        let img = &body["data"][0];
        let t = &img["tiller"];
        assert_eq!(t["steering"]["method"], method.as_str(), "{t}");
        assert_eq!(t["scheduler"], scheduler, "{method}: {t}");
        let r = t["steering"]["reward"].as_f64().unwrap();
        assert!((r - brightness(img)).abs() < 0.5 / 255.0 + 1e-5, "{method}: reward {r} vs PNG");
        assert!(
            t["steering"]["trace"].as_array().is_some_and(|a| !a.is_empty()) || method == "best_of_n",
            "{method}: {t}"
        );
        if method != "reno" {
            let b = mean_brightness(&body);
            assert!(b > plain_b, "{method}: mean brightness {b} not above plain {plain_b}");
        }
        if method == "flowchef" {
            // No extra network calls: one per step and image.
            assert_eq!(t["denoiser_evals"], 12 * n, "{t}");
            let guides = t["steering"]["trace"].as_array().unwrap().iter().filter(|e| e["kind"] == "guide").count();
            assert_eq!(guides, 12);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_family_samplers_and_flowchef_misuse_are_400s() {
    let s = server().await;
    let cases: Vec<(Value, &str, &[&str])> = vec![
        (json!({"model": "toy-flow", "scheduler": "ddim"}), "scheduler", &["flow-euler or flow-sde"]),
        (json!({"model": "toy-flow", "scheduler": "lcm"}), "scheduler", &["flow-matching"]),
        (json!({"model": "toy-gmm", "scheduler": "flow-euler"}), "scheduler", &["ddim"]),
        (json!({"model": "toy-flow", "scheduler": "flow-sde", "eta": 2}), "eta", &[]),
        (
            json!({"model": "toy-gmm", "steering": {"method": "flowchef"}, "reward": "brightness"}),
            "steering.method",
            &["flow-matching"],
        ),
        (
            json!({"model": "toy-flow", "steering": {"method": "flowchef"}, "reward": "jpeg_compressibility"}),
            "reward",
            &["FlowChef", "differentiable"],
        ),
        (
            json!({"model": "toy-flow", "steering": {"method": "flowchef", "inner_steps": 0}, "reward": "brightness"}),
            "steering.inner_steps",
            &[],
        ),
        (
            json!({"model": "toy-flow", "steering": {"method": "flowchef", "step_size": -1}, "reward": "brightness"}),
            "steering.step_size",
            &[],
        ),
        (
            json!({"model": "toy-flow", "steering": {"method": "flowchef", "stepsize": 1}, "reward": "brightness"}),
            "steering.stepsize",
            &[],
        ),
        (
            json!({"model": "toy-flow", "steering": {"method": "fk"}, "reward": "brightness", "scheduler": "flow-euler"}),
            "scheduler",
            &["flow-sde"],
        ),
        (
            json!({"model": "toy-flow", "steering": {"method": "fk"}, "reward": "brightness", "eta": 0}),
            "eta",
            &["stochastic"],
        ),
    ];
    for (extra, field, words) in cases {
        let mut req = json!({"prompt": "", "seed": 1, "steps": 4});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (st, body) = s.generate(req).await;
        assert_error(st, &body, 400, Some(field));
        let msg = body["error"]["message"].as_str().unwrap();
        for w in words {
            assert!(msg.contains(w), "{extra}: message {msg:?} should mention {w:?}");
        }
    }
}
