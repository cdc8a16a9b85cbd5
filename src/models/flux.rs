//! A FLUX.1 pipeline directory (diffusers `FluxPipeline` layout): a CLIP tokenizer and
//! `CLIPTextModel` (pooled output), a T5 tokenizer and encoder (512 tokens), the FLUX
//! transformer, a 16-channel VAE with `shift_factor`, and a `FlowMatchEulerDiscreteScheduler`
//! whose sigmas the pipeline spaces as linspace(1, 1/n, n), shifted by the image's token count.
//!
//! Latents stay unpacked (B, 16, H/8, W/8) everywhere else in tiller (samplers, noise,
//! `init_latents`); `predict` packs 2×2 patches into tokens for the transformer and unpacks its
//! output. FLUX-dev takes the guidance scale as an embedding (no classifier-free guidance);
//! schnell has none and ignores it.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::flux_transformer::{FluxTransformer2DModel, FluxTransformerConfig};
use super::stable_diffusion::LoadOptions;
use super::t5::{T5Config, T5EncoderModel};
use super::tokenizer::{ClipTokenizer, T5Tokenizer};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::weights::{component_dir, in_component, load_component, read_config};
use super::{DiffusionModel, ModelInfo, PromptEmbedding, SamplingDefaults};
use crate::error::{Result as TResult, TillerError};
use crate::sampling::{FlowSigmas, ScheduleConfig};

/// The pipeline classes this loader reads.
pub const PIPELINES: &[&str] = &["FluxPipeline"];

/// The T5 sequence length of the pipeline (`max_sequence_length`).
const T5_TOKENS: usize = 512;

#[derive(Clone)]
pub struct Flux {
    info: ModelInfo,
    clip_tokenizer: Arc<ClipTokenizer>,
    clip: ClipTextModel,
    t5_tokenizer: Arc<T5Tokenizer>,
    t5: T5EncoderModel,
    transformer: FluxTransformer2DModel,
    /// The transformer's base weights and config (adapter variants are built from them).
    transformer_weights: Arc<std::collections::HashMap<String, Tensor>>,
    transformer_config: FluxTransformerConfig,
    targets: Arc<crate::adapters::TargetIndex>,
    vae: Arc<AutoencoderKL>,
    dtype: DType,
    device: Device,
}

impl Flux {
    pub fn load(name: &str, dir: &Path, opts: &LoadOptions) -> TResult<Self> {
        let (variant, dtype, device) = (opts.variant.as_deref(), opts.dtype, &opts.device);
        let sched_path = component_dir(dir, "scheduler")?.join("scheduler_config.json");
        let text = std::fs::read_to_string(&sched_path).map_err(|e| TillerError::file(&sched_path, e.to_string()))?;
        let schedule =
            ScheduleConfig::from_json(&text, FlowSigmas::Linspace).map_err(|m| TillerError::file(&sched_path, m))?;
        if schedule.vp().is_some() {
            return Err(TillerError::file(
                &sched_path,
                "FLUX needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)",
            ));
        }
        let clip_tokenizer = ClipTokenizer::from_dir(&component_dir(dir, "tokenizer")?)?;
        let te_dir = component_dir(dir, "text_encoder")?;
        let te_cfg: ClipTextConfig = read_config(&te_dir.join("config.json"))?;
        let te_w = load_component(&te_dir, "model", variant, dtype, device)?;
        let clip = in_component(&te_dir, ClipTextModel::load(te_w.var_builder(), &te_cfg))?;
        let t5_tokenizer = T5Tokenizer::from_dir(&component_dir(dir, "tokenizer_2")?)?;
        let t5_dir = component_dir(dir, "text_encoder_2")?;
        let t5_cfg: T5Config = read_config(&t5_dir.join("config.json"))?;
        let t5_w = load_component(&t5_dir, "model", variant, dtype, device)?;
        let t5 = in_component(&t5_dir, T5EncoderModel::load(t5_w.var_builder(), &t5_cfg))?;
        let tr_dir = component_dir(dir, "transformer")?;
        let tr_cfg: FluxTransformerConfig = read_config(&tr_dir.join("config.json"))?;
        let tr_w = load_component(&tr_dir, "diffusion_pytorch_model", variant, dtype, device)?;
        let transformer = in_component(&tr_dir, FluxTransformer2DModel::load(tr_w.var_builder(), &tr_cfg))?;
        let vae_dir = component_dir(dir, "vae")?;
        let vae_cfg: AutoencoderKLConfig = read_config(&vae_dir.join("config.json"))?;
        let vae_w = load_component(&vae_dir, "diffusion_pytorch_model", variant, dtype, device)?;
        let vae = in_component(&vae_dir, AutoencoderKL::load(vae_w.var_builder(), &vae_cfg))?;

        let bad = |m: String| TillerError::file(tr_dir.join("config.json"), m);
        if tr_cfg.in_channels != 4 * vae_cfg.latent_channels {
            return Err(bad(format!(
                "in_channels {} is not 4 × the VAE's latent_channels {} (2×2 packed patches)",
                tr_cfg.in_channels, vae_cfg.latent_channels
            )));
        }
        if t5_cfg.d_model != tr_cfg.joint_attention_dim || te_cfg.hidden_size != tr_cfg.pooled_projection_dim {
            return Err(bad(format!(
                "joint_attention_dim {} / pooled_projection_dim {} do not match T5's d_model {} and CLIP's width {}",
                tr_cfg.joint_attention_dim, tr_cfg.pooled_projection_dim, t5_cfg.d_model, te_cfg.hidden_size
            )));
        }
        let f = vae_cfg.scale_factor();
        let embedded = tr_cfg.guidance_embeds;
        let max_tokens = clip_tokenizer.max_len();
        // FluxPipeline's defaults: dev 28 steps at guidance 3.5 (an embedding); schnell 4 steps.
        let defaults =
            SamplingDefaults::with_pipeline(&schedule, embedded, if embedded { (28, 3.5) } else { (4, 0.0) });
        let info = ModelInfo {
            name: name.to_string(),
            family: "flux".into(),
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: f,
            // FLUX pipelines default to 1024² (the transformer has no native size); the tiny
            // test pipelines shrink it with their VAE.
            default_size: (128 * f, 128 * f),
            fixed_size: false,
            inpainting: false,
            guidance_embedding: true,
            max_prompt_tokens: max_tokens,
            patch_size: 2,
            max_side: None,
            zero_empty_negative: false,
            defaults,
            scheduler: schedule,
        };
        Ok(Self {
            info,
            clip_tokenizer: Arc::new(clip_tokenizer),
            clip,
            t5_tokenizer: Arc::new(t5_tokenizer),
            t5,
            transformer,
            targets: Arc::new(crate::adapters::TargetIndex::new(
                &[(crate::adapters::Component::Transformer, &tr_w.tensors)],
                0,
            )),
            transformer_weights: Arc::new(tr_w.tensors),
            transformer_config: tr_cfg,
            vae: Arc::new(vae),
            dtype,
            device: device.clone(),
        })
    }

    pub fn transformer(&self) -> &FluxTransformer2DModel {
        &self.transformer
    }

    /// (B, C, H, W) → (B, H/2·W/2, 4C): 2×2 patches, channels outer.
    pub fn pack(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))
    }

    /// The inverse of [`Flux::pack`] for latents of `h`×`w`.
    pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, c4) = x.dims3()?;
        let c = c4 / 4;
        x.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))
    }

    /// (0, row, column) of each packed patch, row-major.
    pub fn image_ids(h: usize, w: usize) -> Vec<[f32; 3]> {
        (0..h / 2).flat_map(|r| (0..w / 2).map(move |c| [0.0, r as f32, c as f32])).collect()
    }
}

impl DiffusionModel for Flux {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn adapter_targets(&self) -> Option<&crate::adapters::TargetIndex> {
        Some(&self.targets)
    }

    /// A variant whose transformer carries the adapters (merged or unmerged); the encoders and
    /// the VAE are shared.
    fn with_adapters(
        &self,
        adapters: &crate::adapters::apply::WeightedLayers,
        merge: bool,
    ) -> Result<Arc<dyn DiffusionModel>> {
        let w = crate::adapters::apply::single_component(
            &self.info.name,
            &self.transformer_weights,
            crate::adapters::Component::Transformer,
            adapters,
            merge,
        )?;
        let vb = candle_nn::VarBuilder::from_tensors(w.clone(), self.dtype, &self.device);
        Ok(Arc::new(Self {
            transformer: FluxTransformer2DModel::load(vb, &self.transformer_config)?,
            transformer_weights: Arc::new(w),
            ..self.clone()
        }))
    }

    /// FluxPipeline's `encode_prompt`: T5's last hidden states over 512 tokens, and CLIP's
    /// pooled output (not projected).
    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding> {
        let (ids, mut truncated) = self.clip_tokenizer.encode_batch(prompts, &self.device)?;
        let pooled = self.clip.forward(&ids, 0)?.pooled;
        let (ids2, t2) = self.t5_tokenizer.encode_batch(prompts, T5_TOKENS, &self.device)?;
        truncated.extend(t2);
        truncated.sort_unstable();
        truncated.dedup();
        Ok(PromptEmbedding { hidden_states: self.t5.forward(&ids2)?, pooled: Some(pooled), truncated })
    }

    /// The guidance scale per row, for FLUX-dev's embedding; `None` for schnell (which ignores it).
    fn guidance_embedding(&self, guidance_scale: f64, batch: usize) -> Result<Option<Tensor>> {
        if !self.transformer.config().guidance_embeds {
            return Ok(None);
        }
        // The pipeline's float32 scale, times 1000 as the transformer does.
        Ok(Some(Tensor::full(guidance_scale as f32 * 1000.0, batch, &self.device)?))
    }

    fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &PromptEmbedding,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("FLUX latents must have even sides (2×2 patches), got {h}×{w}");
        }
        let pooled = context
            .pooled
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("FLUX needs the pooled text embedding".into()))?;
        // The pipeline passes t/1000 and the transformer multiplies by 1000, in float32.
        let t = ((timesteps.to_dtype(DType::F32)? / 1000.0)? * 1000.0)?;
        let out = self.transformer.forward(
            &Self::pack(&x.to_dtype(self.dtype)?)?,
            &t,
            &context.hidden_states.to_dtype(self.dtype)?,
            &pooled.to_dtype(self.dtype)?,
            timestep_cond,
            &Self::image_ids(h, w),
        )?;
        Self::unpack(&out, h, w)?.to_dtype(x.dtype())
    }

    fn forward_bytes_per_row(&self, h: usize, w: usize) -> u64 {
        let c = self.transformer.config();
        super::transformer_forward_bytes((h / 2) * (w / 2) + T5_TOKENS, c.inner_dim(), c.num_attention_heads)
    }

    fn decode_bytes_per_image(&self, h: usize, w: usize) -> u64 {
        self.vae.config().decode_bytes_per_image(h, w)
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode_latents(latents, self.dtype)
    }

    fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        self.vae.encode_latents(images, self.dtype)
    }

    fn encode_posterior(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        self.vae.encode_latent_posterior(images, self.dtype)
    }
}
