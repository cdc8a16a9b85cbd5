//! Shared helpers of the HTTP tests: a fast mock model, server start-up on 127.0.0.1:0, and
//! the tiny fixture model.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Module, Result, Tensor};
use tiller::api::{router, AppState};
use tiller::config::Config;
use tiller::engine::{Engine, EngineOptions, LoadedModel};
use tiller::models::{DiffusionModel, ModelInfo, PromptEmbedding, SamplingDefaults};
use tiller::sampling::SchedulerConfig;

/// A deterministic stand-in for a diffusion model: cheap, with an optional delay per denoiser
/// call (to test queueing, timeouts and cancellation).
pub struct MockModel {
    info: ModelInfo,
    device: Device,
    delay: Duration,
}

impl MockModel {
    pub fn new(name: &str, delay: Duration) -> Self {
        let scheduler: SchedulerConfig = serde_json::from_str(
            r#"{"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "set_alpha_to_one": false, "steps_offset": 1}"#,
        )
        .unwrap();
        let info = ModelInfo {
            name: name.to_string(),
            family: "mock".into(),
            latent_channels: 4,
            vae_scale_factor: 8,
            default_size: (64, 64),
            fixed_size: false,
            inpainting: false,
            defaults: SamplingDefaults::derive(&tiller::sampling::ScheduleConfig::Vp(scheduler.clone()), false, 77),
            scheduler: tiller::sampling::ScheduleConfig::Vp(scheduler),
            guidance_embedding: false,
            max_prompt_tokens: 77,
            patch_size: 1,
            max_side: None,
            zero_empty_negative: false,
        };
        Self { info, device: Device::Cpu, delay }
    }

    pub fn arc(name: &str, delay: Duration) -> Arc<dyn DiffusionModel> {
        Arc::new(Self::new(name, delay))
    }
}

impl DiffusionModel for MockModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding> {
        // One value per prompt from its bytes, broadcast to (batch, 2, 4).
        let vals: Vec<f32> = prompts
            .iter()
            .map(|p| p.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32)) % 1000)
            .map(|h| h as f32 / 1000.0 - 0.5)
            .collect();
        let t = Tensor::from_vec(vals, (prompts.len(), 1, 1), &self.device)?.broadcast_as((prompts.len(), 2, 4))?;
        Ok(PromptEmbedding { hidden_states: t.contiguous()?, pooled: None, truncated: vec![] })
    }

    fn guidance_embedding(&self, _g: f64, _batch: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn predict(&self, x: &Tensor, _t: &Tensor, context: &PromptEmbedding, _c: Option<&Tensor>) -> Result<Tensor> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let b = x.dim(0)?;
        let ctx = context.hidden_states.mean_keepdim(2)?.mean_keepdim(1)?.reshape((b, 1, 1, 1))?;
        (x * 0.5)?.broadcast_add(&ctx)
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let rgb = latents.narrow(1, 0, 3)?.to_dtype(DType::F32)?;
        let img = ((candle_nn::Activation::Sigmoid.forward(&rgb))?).upsample_nearest2d(h * 8, w * 8)?;
        img.clamp(0f32, 1f32)
    }
}

/// A running test server.
pub struct TestServer {
    pub url: String,
    pub state: AppState,
    pub client: reqwest::Client,
}

impl TestServer {
    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.url)).json(body).send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.url)).send().await.unwrap()
    }

    /// POST a generation request; returns (status, JSON body).
    pub async fn generate(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self.post_json("/v1/images/generations", &body).await;
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }
}

/// Bind the router for `engine` on 127.0.0.1:0 within the current tokio runtime.
pub async fn start(engine: Engine, config: &Config) -> TestServer {
    let state = AppState::new(engine, config, &candle_core::Device::Cpu).unwrap();
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer { url: format!("http://{addr}"), state, client: reqwest::Client::new() }
}

/// A server with one mock model (`mock`, per-call `delay`) and the given config.
pub async fn mock_server(delay: Duration, config: Config) -> TestServer {
    let engine = Engine::with_models(
        vec![LoadedModel::new("mock", MockModel::arc("mock", delay))],
        EngineOptions { default_model: None, ..tiller::api::engine_options(&config) },
    );
    engine.wait_ready_blocking(Duration::from_secs(10));
    start(engine, &config).await
}

/// Path of a tiny fixture model directory.
pub fn fixture_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

/// Copy a directory tree (fixture models into a temporary models root).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Decode a base64 PNG; returns (width, height, RGB bytes).
pub fn decode_png(b64: &str) -> (u32, u32, Vec<u8>) {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

/// Assert an OpenAI-shaped error with `status` naming `param`.
pub fn assert_error(status: u16, body: &serde_json::Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "body: {body}");
    let err = &body["error"];
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {body}");
    let kind = if want_status >= 500 { "server_error" } else { "invalid_request_error" };
    assert_eq!(err["type"], kind, "{body}");
    assert!(err.get("code").is_some(), "{body}");
    if let Some(p) = want_param {
        assert_eq!(err["param"], p, "{body}");
    }
}

/// An engine that loads `models` (name, directory) through the real loader on the CPU, ready
/// (the first model is the default).
pub fn loaded_engine(models: &[(&str, std::path::PathBuf)], queue_depth: usize) -> Engine {
    let dirs: Vec<(String, std::path::PathBuf)> = models.iter().map(|(n, d)| (n.to_string(), d.clone())).collect();
    let default = dirs[0].0.clone();
    let engine = Engine::start(
        Box::new(move || {
            dirs.iter()
                .map(|(name, dir)| {
                    tiller::models::loader::load_model(name, dir, &Device::Cpu, DType::F32)
                        .map(|m| LoadedModel::new(name.clone(), m))
                        .map_err(|e| e.to_string())
                })
                .collect::<std::result::Result<Vec<_>, String>>()
        }),
        EngineOptions { queue_depth, default_model: Some(default), ..Default::default() },
    );
    assert_eq!(engine.wait_ready_blocking(Duration::from_secs(120)), tiller::engine::EngineState::Ready);
    engine
}
