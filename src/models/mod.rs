//! Networks and model families.
//!
//! A model is anything that can turn prompts into a conditioning, predict the network output at
//! `(x_t, t)` and decode latents into images. Stable Diffusion pipelines, the analytic
//! Gaussian-mixture model of the steering tests and (later) SDXL/flow models all implement
//! [`DiffusionModel`], so samplers and steering strategies never know which one they drive.

pub mod clip_text;
pub mod clip_vision;
pub mod cpu_kernels;
pub mod gaussian_mixture;
pub mod loader;
pub mod nn;
pub mod random_init;
pub mod stable_diffusion;
pub mod tokenizer;
pub mod unet_2d;
pub mod vae;
pub mod weights;

use candle_core::{Device, Result, Tensor};

use crate::sampling::SchedulerConfig;

/// What the network predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// Static facts about a loaded model that the engine, validation and samplers need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// e.g. "stable-diffusion", "gaussian-mixture".
    pub family: String,
    pub latent_channels: usize,
    /// Image pixels per latent pixel along each side.
    pub vae_scale_factor: usize,
    /// Default image size (height, width) in pixels.
    pub default_size: (usize, usize),
    /// The scheduler configuration the model ships with (`scheduler/scheduler_config.json`).
    pub scheduler: SchedulerConfig,
    /// True when the UNet takes the guidance scale as an embedding (LCM-distilled, `time_cond_proj_dim`)
    /// instead of classifier-free guidance.
    pub guidance_embedding: bool,
    /// Maximum prompt length in tokens (including start/end tokens); 0 when prompts are ignored.
    pub max_prompt_tokens: usize,
}

/// Per-prompt conditioning produced by [`DiffusionModel::encode_prompts`].
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// (batch, tokens, dim) hidden states fed to cross-attention.
    pub hidden_states: Tensor,
    /// (batch, dim) pooled output when the text encoder provides one.
    pub pooled: Option<Tensor>,
    /// Prompts whose tokens were cut at the model's maximum length.
    pub truncated: Vec<usize>,
}

/// A denoising model family.
pub trait DiffusionModel: Send + Sync {
    fn info(&self) -> &ModelInfo;

    fn device(&self) -> &Device;

    /// Encode a batch of prompts.
    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding>;

    /// The guidance-scale embedding fed as `timestep_cond` to LCM-distilled UNets,
    /// shaped (batch, time_cond_proj_dim); `None` for models without one.
    fn guidance_embedding(&self, guidance_scale: f64, batch: usize) -> Result<Option<Tensor>>;

    /// Raw network output (noise, velocity or sample, per [`ModelInfo::scheduler`]) for a batch
    /// of scaled model inputs at one timestep.
    fn predict(
        &self,
        x: &Tensor,
        timestep: f64,
        context: &PromptEmbedding,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Decode final latents (before VAE scaling) into images in [0, 1], NCHW f32, unclamped
    /// values clamped. Differentiable in f32.
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;

    /// The adaptable weights (LoRA targets); `None` for models that take no adapters.
    fn adapter_targets(&self) -> Option<&crate::adapters::TargetIndex> {
        None
    }

    /// A variant of this model with resolved LoRA layers applied (each list with its user
    /// weight), merged into new weights or kept unmerged. The model itself is unchanged.
    fn with_adapters(
        &self,
        _adapters: &crate::adapters::apply::WeightedLayers,
        _merge: bool,
    ) -> Result<std::sync::Arc<dyn DiffusionModel>> {
        candle_core::bail!("model `{}` does not take adapters", self.info().name)
    }

    /// Encode images in [0, 1] to latents (mean of the posterior, already scaled).
    fn encode_image(&self, _images: &Tensor) -> Result<Tensor> {
        candle_core::bail!("model `{}` has no image encoder", self.info().name)
    }
}
