//! The `http` reward against a local scorer that answers well and badly.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use tiller::reward::http::HttpReward;
use tiller::reward::{Reward, RewardError};

/// Scores each image by its mean red value (decoded from the PNG), plus the prompt length,
/// so the test can check what was sent.
async fn good(Json(body): Json<Value>) -> Json<Value> {
    let prompt_len = body["prompt"].as_str().unwrap().len() as f64;
    let scores: Vec<f64> = body["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b64| {
            let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
            let img = image::load_from_memory(&png).unwrap().to_rgb8();
            let red: f64 = img.pixels().map(|p| p.0[0] as f64).sum::<f64>() / img.pixels().len() as f64;
            red / 255.0 + prompt_len
        })
        .collect();
    Json(json!({ "scores": scores }))
}

async fn slow() -> Json<Value> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    Json(json!({"scores": [1.0, 1.0]}))
}

/// The scorer, started once for all tests on its own runtime thread.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/good", post(good))
            .route("/slow", post(slow))
            .route("/fail", post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "model exploded") }))
            .route("/malformed", post(|| async { "this is not json" }))
            .route("/shape", post(|| async { Json(json!({"score": [1.0, 2.0]})) }))
            .route("/count", post(|| async { Json(json!({"scores": [1.0]})) }))
            .route("/nan", post(|| async { ([("content-type", "application/json")], r#"{"scores": [0.5, NaN]}"#) }))
            .route("/null", post(|| async { Json(json!({"scores": [0.5, null]})) }))
            .route("/huge", post(|| async { Json(json!({"scores": [0.5, 1e300]})) }));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        addr
    })
}

fn reward(route: &str, timeout_ms: u64) -> HttpReward {
    HttpReward::new("scorer", format!("http://{}/{route}", server()), timeout_ms).unwrap()
}

/// Two 2×2 images: all red, and red at 0.5.
fn images() -> Tensor {
    let mut data = vec![1.0f32; 4];
    data.extend([0.0f32; 8]);
    data.extend([0.5f32; 4]);
    data.extend([0.0f32; 8]);
    Tensor::from_vec(data, (2, 3, 2, 2), &Device::Cpu).unwrap()
}

fn upstream_message(route: &str) -> String {
    match reward(route, 5_000).score(&images(), "p") {
        Err(RewardError::Upstream { reward, message }) => {
            assert_eq!(reward, "scorer");
            message
        }
        other => panic!("{route}: expected Upstream, got {other:?}"),
    }
}

#[test]
fn good_scorer_gets_prompt_and_pngs() {
    let scores = reward("good", 5_000).score(&images(), "abc").unwrap();
    assert_eq!(scores.len(), 2);
    assert!((scores[0] - 4.0).abs() < 1e-6, "{scores:?}");
    // 0.5 quantises to 128.
    assert!((scores[1] - (3.0 + 128.0 / 255.0)).abs() < 1e-6, "{scores:?}");
    let r = reward("good", 5_000);
    assert!(!r.differentiable());
    assert_eq!(r.name(), "scorer");
}

#[test]
fn slow_scorer_times_out() {
    let start = Instant::now();
    match reward("slow", 200).score(&images(), "p") {
        Err(RewardError::Timeout { reward, timeout_ms }) => assert_eq!((reward.as_str(), timeout_ms), ("scorer", 200)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
}

#[test]
fn http_errors_are_upstream_errors() {
    let m = upstream_message("fail");
    assert!(m.contains("500") && m.contains("model exploded"), "{m}");
    let m = upstream_message("missing-route");
    assert!(m.contains("404"), "{m}");
    let m = upstream_message("malformed");
    assert!(m.contains("malformed") && m.contains("this is not json"), "{m}");
    let m = upstream_message("shape");
    assert!(m.contains("malformed") && m.contains("scores"), "{m}");
    let m = upstream_message("count");
    assert!(m.contains("expected 2 scores") && m.contains("got 1"), "{m}");
    let m = upstream_message("nan");
    assert!(m.contains("NaN"), "{m}");
    let m = upstream_message("null");
    assert!(m.contains("score 1") && m.contains("finite"), "{m}");
    let m = upstream_message("huge");
    assert!(m.contains("score 1") && m.contains("finite"), "{m}");
}

#[test]
fn refused_connection_is_an_upstream_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let r = HttpReward::new("scorer", format!("http://{addr}/score"), 2_000).unwrap();
    match r.score(&images(), "p") {
        Err(RewardError::Upstream { message, .. }) => assert!(message.contains(&addr.to_string()), "{message}"),
        other => panic!("expected Upstream, got {other:?}"),
    }
}

#[test]
fn bad_urls_are_refused() {
    for url in ["https://example.com/", "ftp://x/", "http://", "localhost:9000"] {
        assert!(matches!(HttpReward::new("s", url, 100), Err(RewardError::Invalid(_))), "{url}");
    }
    assert!(matches!(HttpReward::new("s", "http://127.0.0.1:1/", 0), Err(RewardError::Invalid(_))));
}
