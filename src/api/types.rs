//! Request and response bodies of the HTTP API (also the OpenAPI schemas).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::reward::RewardSpec;
use crate::sampling::SamplerKind;
use crate::steering::{PhaseTimings, SteeringSpec, TraceEvent};

/// `POST /v1/images/generations` request: the OpenAI Images API fields plus tiller extensions.
///
/// Fields set to `null` count as absent. Unknown fields are rejected (400) so that typos do not
/// pass silently; `user`, `quality` and `style` are accepted for OpenAI compatibility and ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "a red circle above a blue square", "size": "64x64", "seed": 42}))]
pub struct ImageGenerationRequest {
    /// Text prompt (required; at most `limits.max_prompt_chars` characters).
    pub prompt: String,
    /// Model id from `GET /v1/models`; default: the server's default model.
    #[serde(default)]
    pub model: Option<String>,
    /// Number of images, 1 to `limits.max_n`; default 1.
    #[serde(default)]
    #[schema(minimum = 1, example = 1)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` in pixels, multiples of the model's VAE factor (`vae_scale_factor` in
    /// `GET /v1/models`: 4 for the default model, 8 for Stable Diffusion; twice that for SD3 and
    /// FLUX, whose transformers take 2×2 latent patches), within the configured limits; default
    /// (or `auto`): the model's default size.
    #[serde(default)]
    #[schema(example = "512x512")]
    pub size: Option<String>,
    /// Only `b64_json` (the default) is supported; `url` is rejected with 400.
    #[serde(default)]
    #[schema(example = "b64_json")]
    pub response_format: Option<String>,
    /// `png` (the default), `jpeg` or `webp` (lossless). A PNG carries the generation
    /// parameters in a `parameters` text chunk, in the layout Stable Diffusion web UIs read.
    #[serde(default)]
    pub output_format: Option<crate::util::encode::OutputFormat>,
    /// JPEG quality 0–100 (100, the default, keeps the most detail), as OpenAI's
    /// `output_compression`; accepted for `webp` (always lossless); refused for `png`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u32>,
    /// Accepted and ignored (OpenAI compatibility).
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted and ignored (OpenAI compatibility).
    #[serde(default)]
    pub quality: Option<String>,
    /// Accepted and ignored (OpenAI compatibility).
    #[serde(default)]
    pub style: Option<String>,
    /// tiller: negative prompt for classifier-free guidance.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// tiller: denoising steps, 1 to `limits.max_steps`; default from the model/scheduler
    /// (50; 4 for LCM; 1 for SD-Turbo).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub steps: Option<u32>,
    /// tiller: classifier-free guidance scale, 0 to 100 (guidance is off at ≤ 1; LCM-distilled
    /// UNets take it as an embedding); default 7.5 (8.5 for LCM, 0 for SD-Turbo).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub guidance_scale: Option<f64>,
    /// tiller: sampler; default from the model's `scheduler_config.json`.
    #[serde(default)]
    pub scheduler: Option<SamplerKind>,
    /// tiller: DDIM eta in [0, 1] (0 = deterministic); default 0.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub eta: Option<f64>,
    /// tiller: random seed, 0 to 2^64-1; image i uses seed + i. Default: random (reported in
    /// the response).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    /// tiller: base64 of a safetensors file holding an f32 tensor `latents` shaped
    /// (n, C, H/f, W/f): unit-variance initial noise, as `tiller generate --init-latents`.
    #[serde(default)]
    pub init_latents: Option<String>,
    /// tiller: steering strategy (`method`: none, best_of_n, fk, svdd, reno); default none.
    /// Each of the `n` images is an independent steered generation.
    #[serde(default)]
    #[schema(example = json!({"method": "fk", "particles": 8, "potential": "diff", "beta": 4.0}))]
    pub steering: Option<SteeringSpec>,
    /// tiller: the reward to steer towards (required by every method but `none`, where it is
    /// only reported): a name from `GET /v1/rewards`, `{"name": ..., "weight": ..., "target": ...}`
    /// or a list of such terms (a weighted sum).
    #[serde(default)]
    pub reward: Option<RewardSpec>,
    /// tiller: include the steering trace (weights and ESS at each resampling, rewards per
    /// step or ReNO iteration) in each image's metadata; default false.
    #[serde(default)]
    pub trace: Option<bool>,
    /// tiller: LoRA adapters to apply, at most 8, each named once: names from
    /// `GET /v1/adapters` with a weight `scale` (default 1, finite, |scale| ≤ 10) that multiplies
    /// the adapter's own alpha/rank scaling. An unknown name is 404; an adapter that does not fit
    /// the model (another model family, keys matching no module) is 400 with `param: "adapters"`.
    #[serde(default)]
    #[schema(example = json!([{"name": "pixel-art", "scale": 0.8}]))]
    pub adapters: Option<Vec<AdapterRef>>,
    /// Answer with `text/event-stream`: `image_generation.partial_image` previews, then one
    /// `image_generation.completed` event per image (OpenAI's Images API stream); default false.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Previews of the predicted clean image sent while streaming, 0–3 (default 0); they come
    /// at evenly spaced steps, so fewer arrive when there are fewer steps than previews.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u32>,
    /// tiller: while streaming, also send `tiller.progress` events (step, total) after every
    /// denoising step; default false.
    #[serde(default)]
    pub stream_progress: Option<bool>,
    /// tiller: join the A/B experiment of that name (`GET /v1/experiments`): its arm's fields
    /// override the request's, its metrics are evaluated on every image, and each image is
    /// recorded under an `image_id` for results and feedback. A sticky experiment picks the arm
    /// by `user`.
    #[serde(default)]
    pub experiment: Option<String>,
    /// tiller: with `experiment`, use this arm instead of the assigned one (for testing).
    #[serde(default)]
    pub arm: Option<String>,
}

/// `POST /v1/images/edits` form (multipart/form-data): the image, an optional mask, and every
/// field of [`ImageGenerationRequest`] as a form field (nested ones as JSON text, or in the
/// bracket notation the `openai` client uses: `steering[method]=fk`).
#[derive(Debug, Clone, ToSchema)]
#[allow(dead_code)]
pub struct ImageEditForm {
    /// The image to edit (PNG, JPEG or WebP). Its size is the output size unless `size` is
    /// given (then it is resized), rounded down to the model's VAE factor. One image.
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// Where to repaint: white pixels, or transparent ones when the mask has an alpha channel
    /// (OpenAI's convention); same size as `image`. Without a mask, an `image` with transparency
    /// is repainted where it is transparent; an opaque one is edited whole (img2img).
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    /// Text prompt (required).
    pub prompt: String,
    /// How much of the schedule to run, in (0, 1]: ⌊strength·steps⌋ steps from the image
    /// noised to that point. Default 0.8 without a mask, 1 with one (the masked region starts
    /// from noise). Must leave at least one step.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Number of images, 1 to `limits.max_n`.
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT`; default the image's size.
    pub size: Option<String>,
    /// Model id; default the server's default model.
    pub model: Option<String>,
    /// Seed (image i uses seed + i).
    pub seed: Option<u64>,
    /// Denoising steps of the full schedule (the edit runs ⌊strength·steps⌋ of them).
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub negative_prompt: Option<String>,
    pub scheduler: Option<SamplerKind>,
    /// `png`, `jpeg` or `webp`.
    pub output_format: Option<crate::util::encode::OutputFormat>,
    /// Steering, as JSON text or in bracket notation.
    pub steering: Option<String>,
    /// Reward, as JSON text, a name, or in bracket notation.
    pub reward: Option<String>,
    /// Answer with `text/event-stream` (`image_edit.partial_image`, `image_edit.completed`).
    pub stream: Option<bool>,
}

/// One Server-Sent Event as it travels: `event` names it, `data` holds its JSON
/// ([`PartialImageEvent`], [`CompletedImageEvent`], `{"type": "tiller.progress", "step",
/// "total"}`, `{"type": "error", "error": {...}}`, ...), and `id` numbers it on the job stream
/// only.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SseEvent {
    /// The event's name, equal to the `type` inside `data`.
    pub event: String,
    /// The event's JSON.
    pub data: String,
    /// `GET /v1/jobs/{id}/events` only: the position to resume after (`Last-Event-ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A preview while streaming (`event: image_generation.partial_image`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PartialImageEvent {
    /// `image_generation.partial_image`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The decoded x̂0 preview, PNG base64.
    pub b64_json: String,
    /// 0-based.
    pub partial_image_index: usize,
    pub created_at: u64,
    /// `WIDTHxHEIGHT`.
    pub size: String,
    /// Always `auto`.
    pub quality: String,
    /// Always `opaque`.
    pub background: String,
    /// `png`, `jpeg` or `webp`, as the request asked.
    pub output_format: String,
}

/// A finished image while streaming (`event: image_generation.completed`), one per image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletedImageEvent {
    /// `image_generation.completed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The same PNG as the non-streaming answer for the same request and seed.
    pub b64_json: String,
    pub created_at: u64,
    pub size: String,
    pub quality: String,
    pub background: String,
    pub output_format: String,
    /// Token counts as OpenAI reports them: the prompt's tokens, no output tokens.
    pub usage: ImageUsage,
    /// How this image was made (as in the non-streaming answer).
    pub tiller: ImageMetadata,
}

/// OpenAI's `usage` of an image event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InputTokensDetails {
    pub image_tokens: u64,
    pub text_tokens: u64,
}

/// One adapter of a generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    /// Adapter name from `GET /v1/adapters`.
    pub name: String,
    /// Weight of the adapter's delta; default 1. Negative values subtract it.
    #[serde(default)]
    #[schema(minimum = -10.0, maximum = 10.0)]
    pub scale: Option<f64>,
}

/// `POST /v1/images/generations` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix time (seconds) the response was created.
    pub created: u64,
    pub data: Vec<Image>,
}

/// One generated image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// The PNG, base64-encoded (standard alphabet, padded).
    pub b64_json: String,
    /// How this image was made.
    pub tiller: ImageMetadata,
}

/// tiller metadata of one image: everything needed to replay it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageMetadata {
    /// Seed of this image (request seed + index); sending it with n = 1 replays the image.
    pub seed: u64,
    /// The request's seed (seed of image 0).
    pub request_seed: u64,
    pub model: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SamplerKind,
    pub guidance_scale: f64,
    pub eta: f64,
    /// Denoiser evaluations for the whole request (each CFG branch counts).
    pub denoiser_evals: usize,
    /// True when the prompt or negative prompt was cut at the text encoder's token limit.
    pub prompt_truncated: bool,
    pub timings: TimingsMs,
    /// Steering: method, reward, work and trace.
    pub steering: SteeringMetadata,
    /// LoRA adapters applied, in request order, with their scales (empty without adapters).
    #[serde(default)]
    pub adapters: Vec<AppliedAdapter>,
    /// How the adapted model was obtained; absent without adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_variant: Option<AdapterVariant>,
    /// The experiment and arm this image was generated under; absent outside experiments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<ExperimentTag>,
    /// The image's id in the experiment's records (`POST /v1/feedback` names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The experiment's metrics on this image.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: std::collections::BTreeMap<String, f32>,
}

/// An image's experiment and arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExperimentTag {
    pub name: String,
    pub arm: String,
}

/// An adapter applied to an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppliedAdapter {
    pub name: String,
    pub scale: f64,
}

/// How the adapted model of a request was obtained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AdapterVariant {
    /// True when the deltas were merged into copies of the weights (no per-step cost); false
    /// when they ran unmerged (each adapted layer adds its low-rank product at run time).
    pub merged: bool,
    /// True when the merged variant came from the cache (`adapters.merge = "auto"`: a
    /// combination's first request runs unmerged, its second is merged and cached, later ones
    /// hit the cache).
    pub cached: bool,
    /// Time spent building or finding the variant, milliseconds.
    pub build_ms: f64,
}

/// What steering did for one image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SteeringMetadata {
    /// `none`, `best_of_n`, `fk`, `svdd` or `reno`.
    pub method: String,
    /// Name of the reward, when the request had one.
    pub reward_name: Option<String>,
    /// Reward of this image (null without a reward).
    pub reward: Option<f32>,
    /// Images scored by the reward for the whole request (particles, candidates, iterates).
    pub reward_evals: usize,
    /// Denoiser calls differentiated for the whole request (ReNO: every step of every iteration
    /// but the last, each CFG branch counted); 0 for the other methods. Its time is
    /// `phases.backward_ms`.
    #[serde(default)]
    pub backward_evals: usize,
    /// Wall time per phase for the whole request.
    pub phases: PhaseTimings,
    /// ReNO with `return_noise`: base64 safetensors (tensor `latents`, (1, C, h, w)) of the
    /// optimised initial noise; send it as `init_latents` with this image's seed, `method: none`
    /// and the same parameters to replay the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimized_noise: Option<String>,
    /// Present when the request set `trace: true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Vec<TraceEvent>>,
}

/// `GET /v1/rewards` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RewardList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<crate::reward::registry::RewardInfo>,
}

/// Milliseconds spent per stage (for the whole request).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TimingsMs {
    pub queue_ms: f64,
    pub encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    /// From receiving the request to sending the response.
    pub total_ms: f64,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Model>,
    /// tiller: model directories that failed to load, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<crate::engine::ModelFailure>,
}

/// A model, OpenAI-style, with tiller's extras.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Model {
    /// The name to pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix time of the model directory's last modification.
    pub created: u64,
    /// Always `tiller`.
    pub owned_by: String,
    pub tiller: ModelDetails,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelDetails {
    /// e.g. `stable-diffusion`.
    pub family: String,
    /// True for the model used when a request names none.
    pub default: bool,
    /// Default `size` as `WxH`.
    pub default_size: String,
    pub default_width: usize,
    pub default_height: usize,
    /// Default sampler (from `scheduler_config.json`).
    pub scheduler: SamplerKind,
    /// diffusers scheduler class the model ships with.
    pub scheduler_class: String,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    /// True for LCM-distilled UNets (guidance as an embedding, no CFG).
    pub guidance_embedding: bool,
    pub latent_channels: usize,
    /// Pixels per latent pixel; `size` must be a multiple.
    pub vae_scale_factor: usize,
    /// Prompt length limit in tokens.
    pub max_prompt_tokens: usize,
}

/// `GET /health` and `GET /ready` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthStatus {
    /// `ok`, `loading`, `failed` or `draining` (shutting down: no new jobs).
    pub status: String,
    /// Loaded model ids.
    pub models: Vec<String>,
    /// Model directories that failed to load, and why (the others are served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_models: Vec<crate::engine::ModelFailure>,
    /// Why the server is not ready, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /v1/adapters` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<AdapterInfo>,
}

/// A registered LoRA adapter.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterInfo {
    /// Always `adapter`.
    pub object: String,
    /// The name requests pass in `adapters[].name`.
    pub name: String,
    /// Key layout of the file.
    pub format: crate::adapters::LoraFormat,
    /// Largest rank among the layers.
    pub rank: usize,
    /// Best guess of the model family the adapter was made for (`sd1`, `sd2`, `sdxl`), from the
    /// file's metadata (`ss_base_model_version`), its components and its cross-attention width;
    /// null when nothing tells. Whether it fits a model is checked when a request uses it.
    pub base_model: Option<String>,
    /// Adapted layers per component (`unet`, `text_encoder`, `text_encoder_2`).
    pub components: std::collections::BTreeMap<String, usize>,
    /// Number of adapted modules.
    pub modules: usize,
    /// Module keys as the file names them (the first 50).
    pub module_keys: Vec<String>,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Path of the file relative to the adapters root.
    pub path: String,
}

/// `POST /v1/adapters` request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"path": "pixel-art.safetensors", "name": "pixel-art"}))]
pub struct RegisterAdapterRequest {
    /// The LoRA file (or a PEFT/diffusers directory holding `adapter_model.safetensors` or
    /// `pytorch_lora_weights.safetensors`), relative to `adapters.root` or absolute. It must
    /// resolve inside the root: no `..`, and symlinks must not lead out of it.
    pub path: String,
    /// Name to register it under (letters, digits, `_`, `-`, `.`; at most 128); default: the
    /// file's stem (the directory's name for a directory).
    #[serde(default)]
    pub name: Option<String>,
    /// Replace an adapter of the same name instead of answering 409; default false.
    #[serde(default)]
    pub replace: Option<bool>,
}
