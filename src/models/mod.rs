//! Networks and model families.
//!
//! A model is anything that can turn prompts into a conditioning, predict the network output at
//! `(x_t, t)` and decode latents into images. Stable Diffusion pipelines, the analytic
//! Gaussian-mixture model of the steering tests and (later) SDXL/flow models all implement
//! [`DiffusionModel`], so samplers and steering strategies never know which one they drive.

pub mod clip_text;
pub mod clip_vision;
pub mod cpu_kernels;
pub mod flux;
pub mod flux_transformer;
pub mod gaussian_mixture;
pub mod loader;
pub mod mmdit;
pub mod nn;
pub mod random_init;
pub mod sd3;
pub mod single_file;
pub mod stable_diffusion;
pub mod t5;
pub mod tokenizer;
pub mod unet_2d;
pub mod vae;
pub mod weights;

use candle_core::{Device, Result, Tensor};

use crate::sampling::{SamplerKind, ScheduleConfig};

/// Re-exported for callers that name it with the models; it lives with the samplers, which
/// interpret it.
pub use crate::sampling::PredictionType;

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
    /// The network works at `default_size` only (the analytic test models): other sizes are
    /// refused as invalid requests instead of failing inside the engine.
    pub fixed_size: bool,
    /// The UNet takes the mask and the masked image's latents as extra input channels (the
    /// 9-channel inpainting checkpoints): it only edits, with a mask.
    pub inpainting: bool,
    /// The noise schedule the model ships with (`scheduler/scheduler_config.json`), by family.
    pub scheduler: ScheduleConfig,
    /// True when the UNet takes the guidance scale as an embedding (LCM-distilled, `time_cond_proj_dim`)
    /// instead of classifier-free guidance.
    pub guidance_embedding: bool,
    /// Maximum prompt length in tokens (including start/end tokens); 0 when prompts are ignored.
    pub max_prompt_tokens: usize,
    /// The largest image side in pixels the network can take (SD3's position table), if any.
    pub max_side: Option<usize>,
    /// Classifier-free guidance without a negative prompt uses zero embeddings for the
    /// unconditional branch (SDXL's `force_zeros_for_empty_prompt`).
    pub zero_empty_negative: bool,
    /// Latent pixels per network token along each side (2 for transformers that pack 2×2
    /// patches, 1 otherwise): flow schedules shift by the image's token count.
    pub patch_size: usize,
    /// What a request that names none of them gets: sampler, steps and guidance scale.
    pub defaults: SamplingDefaults,
}

/// A model's sampling defaults, derived once at load from its scheduler config and UNet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Steps and guidance of the model's pipeline for samplers without defaults of their own
    /// (all but LCM and SD-Turbo's trailing Euler): what a request that picks another sampler
    /// gets.
    pub pipeline: (usize, f64),
}

impl SamplingDefaults {
    /// The defaults of the pipelines that ship such models: LCM → 4 steps (guidance 8.5 through
    /// the embedding, 1.0 without one); trailing-spaced Euler (SD-Turbo) → 1 step without
    /// guidance; otherwise the pipeline's: 28 steps at 7.0 on flow schedules (the SD3
    /// pipeline's), 50 at 7.5 on beta schedules. Models that ignore prompts get guidance 1.0
    /// (guidance would only double the work).
    pub fn derive(scheduler: &ScheduleConfig, guidance_embedding: bool, max_prompt_tokens: usize) -> Self {
        let (steps, guidance) = match scheduler.family() {
            crate::sampling::ScheduleFamily::Flow => (28, 7.0),
            crate::sampling::ScheduleFamily::Vp => (50, 7.5),
        };
        let guidance = if max_prompt_tokens == 0 { 1.0 } else { guidance };
        Self::with_pipeline(scheduler, guidance_embedding, (steps, guidance))
    }

    /// The defaults of a model whose pipeline has its own `(steps, guidance)` (SDXL's guidance 5,
    /// FLUX's).
    pub fn with_pipeline(scheduler: &ScheduleConfig, guidance_embedding: bool, pipeline: (usize, f64)) -> Self {
        let sampler = scheduler.default_sampler();
        let (steps, guidance_scale) = Self::for_sampler(sampler, scheduler, guidance_embedding, pipeline);
        Self { sampler, steps, guidance_scale, pipeline }
    }

    /// Steps and guidance when a request picks `sampler` but not the numbers.
    pub fn for_sampler(
        sampler: SamplerKind,
        scheduler: &ScheduleConfig,
        guidance_embedding: bool,
        pipeline: (usize, f64),
    ) -> (usize, f64) {
        let turbo =
            scheduler.vp().is_some_and(|c| c.timestep_spacing == Some(crate::sampling::TimestepSpacing::Trailing))
                && matches!(sampler, SamplerKind::Euler | SamplerKind::EulerAncestral);
        match sampler {
            SamplerKind::Lcm => (4, if guidance_embedding { 8.5 } else { 1.0 }),
            _ if turbo => (1, 0.0),
            _ => pipeline,
        }
    }
}

impl ModelInfo {
    /// Steps and guidance for a request that chose `sampler`.
    pub fn defaults_for(&self, sampler: SamplerKind) -> (usize, f64) {
        SamplingDefaults::for_sampler(sampler, &self.scheduler, self.guidance_embedding, self.defaults.pipeline)
    }

    /// What image sides must be multiples of: the VAE factor times the transformer's patch.
    pub fn size_multiple(&self) -> usize {
        (self.vae_scale_factor * self.patch_size).max(1)
    }

    /// The image's length in network tokens at `height`×`width` pixels.
    pub fn image_seq_len(&self, height: usize, width: usize) -> usize {
        let side = (self.vae_scale_factor * self.patch_size).max(1);
        (height / side) * (width / side)
    }

    /// The sampler resolved parameters ask for, on this model's schedule.
    pub fn sampler(&self, p: &crate::pipeline::ResolvedParams) -> Result<Box<dyn crate::sampling::Sampler>> {
        crate::sampling::build_for(p.scheduler, &self.scheduler, p.steps, p.eta, self.image_seq_len(p.height, p.width))
    }
}

/// Upper estimate in bytes (f32) of one row of a transformer forward over `tokens` tokens of
/// width `dim`: a few activations per block live at once, plus the attention scores the composed
/// path would materialise per head.
pub(crate) fn transformer_forward_bytes(tokens: usize, dim: usize, heads: usize) -> u64 {
    let t = tokens as f64;
    (4.0 * (t * dim as f64 * 24.0 + heads as f64 * t * t * 3.0)) as u64
}

/// A (batch,) f32 tensor holding timestep `t` for every row: the per-row timesteps
/// [`DiffusionModel::predict`] takes, for callers whose rows share one step.
pub fn timesteps(t: f64, batch: usize, device: &Device) -> Result<Tensor> {
    Tensor::full(t as f32, batch, device)
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
    /// of scaled model inputs. `timesteps` is (batch,) f32, one timestep per row, so one forward
    /// can hold rows at different steps of different requests.
    fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &PromptEmbedding,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Decode final latents (before VAE scaling) into images in [0, 1], NCHW f32, unclamped
    /// values clamped. Differentiable in f32.
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;

    /// Upper estimate of the bytes one row of a denoiser forward needs at latent size `h`×`w`
    /// (what admission control adds up). The default suits analytic models: a few copies of
    /// the row.
    fn forward_bytes_per_row(&self, h: usize, w: usize) -> u64 {
        (self.info().latent_channels as f64 * h as f64 * w as f64 * 64.0) as u64
    }

    /// Upper estimate of the bytes decoding one latent of `h`×`w` needs.
    fn decode_bytes_per_image(&self, h: usize, w: usize) -> u64 {
        let f = self.info().vae_scale_factor as f64;
        ((3 + self.info().latent_channels) as f64 * h as f64 * w as f64 * f * f * 32.0) as u64
    }

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

    /// The latent posterior of images in [0, 1], shifted and scaled like latents: `(mean, std)`;
    /// `mean + std·ε` is diffusers' `latent_dist.sample()`, what its img2img and inpainting
    /// pipelines start from.
    fn encode_posterior(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let mean = self.encode_image(images)?;
        let std = mean.zeros_like()?;
        Ok((mean, std))
    }
}
