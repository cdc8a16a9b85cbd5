//! A Stable Diffusion 3 pipeline directory (diffusers `StableDiffusion3Pipeline` layout): two
//! CLIP tokenizers and `CLIPTextModelWithProjection` encoders, the MMDiT transformer, a
//! 16-channel VAE with `shift_factor`, and a `FlowMatchEulerDiscreteScheduler` config.
//!
//! The T5 encoder (`text_encoder_3`, `tokenizer_3`) is optional, as in diffusers: without it
//! (null in `model_index.json`) the T5 part of the context is zeros.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::mmdit::{SD3Transformer2DModel, SD3TransformerConfig};
use super::stable_diffusion::LoadOptions;
use super::t5::{T5Config, T5EncoderModel};
use super::tokenizer::{ClipTokenizer, T5Tokenizer};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::weights::{component_dir, in_component, load_component, read_config};
use super::{DiffusionModel, ModelInfo, PromptEmbedding, SamplingDefaults};
use crate::error::{Result as TResult, TillerError};
use crate::sampling::{FlowSigmas, ScheduleConfig};

/// The pipeline classes this loader reads.
pub const PIPELINES: &[&str] = &["StableDiffusion3Pipeline"];

/// The T5 sequence length the pipeline pads to (`max_sequence_length`).
const T5_TOKENS: usize = 256;

#[derive(Debug, Deserialize)]
struct Sd3Index {
    #[serde(default)]
    text_encoder_3: Option<(Option<String>, Option<String>)>,
}

#[derive(Clone)]
pub struct StableDiffusion3 {
    info: ModelInfo,
    tokenizers: [Arc<ClipTokenizer>; 2],
    encoders: [ClipTextModel; 2],
    t5: Option<(Arc<T5Tokenizer>, T5EncoderModel)>,
    transformer: SD3Transformer2DModel,
    /// The transformer's base weights and config (adapter variants are built from them).
    transformer_weights: Arc<std::collections::HashMap<String, Tensor>>,
    transformer_config: SD3TransformerConfig,
    targets: Arc<crate::adapters::TargetIndex>,
    vae: Arc<AutoencoderKL>,
    dtype: DType,
    device: Device,
}

impl StableDiffusion3 {
    pub fn load(name: &str, dir: &Path, opts: &LoadOptions) -> TResult<Self> {
        let index_path = dir.join("model_index.json");
        let index: Sd3Index = read_config(&index_path)?;
        let with_t5 = index.text_encoder_3.as_ref().is_some_and(|(lib, class)| lib.is_some() || class.is_some());
        let (variant, dtype, device) = (opts.variant.as_deref(), opts.dtype, &opts.device);
        let sched_path = component_dir(dir, "scheduler")?.join("scheduler_config.json");
        let text = std::fs::read_to_string(&sched_path).map_err(|e| TillerError::file(&sched_path, e.to_string()))?;
        let schedule =
            ScheduleConfig::from_json(&text, FlowSigmas::Scheduler).map_err(|m| TillerError::file(&sched_path, m))?;
        if schedule.vp().is_some() {
            return Err(TillerError::file(
                &sched_path,
                "SD3 needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)",
            ));
        }

        let mut tokenizers = Vec::new();
        let mut encoders = Vec::new();
        for (tok, te) in [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")] {
            tokenizers.push(Arc::new(ClipTokenizer::from_dir(&component_dir(dir, tok)?)?));
            let te_dir = component_dir(dir, te)?;
            let cfg: ClipTextConfig = read_config(&te_dir.join("config.json"))?;
            if !cfg.with_projection() {
                return Err(TillerError::file(
                    te_dir.join("config.json"),
                    "SD3's text encoders are CLIPTextModelWithProjection",
                ));
            }
            let w = load_component(&te_dir, "model", variant, dtype, device)?;
            encoders.push(in_component(&te_dir, ClipTextModel::load(w.var_builder(), &cfg))?);
        }
        let tr_dir = component_dir(dir, "transformer")?;
        let tr_cfg: SD3TransformerConfig = read_config(&tr_dir.join("config.json"))?;
        let t5 = if with_t5 {
            let t5_dir = component_dir(dir, "text_encoder_3")?;
            let cfg: T5Config = read_config(&t5_dir.join("config.json"))?;
            if cfg.d_model != tr_cfg.joint_attention_dim {
                return Err(TillerError::file(
                    t5_dir.join("config.json"),
                    format!(
                        "d_model {} differs from the transformer's joint_attention_dim {}",
                        cfg.d_model, tr_cfg.joint_attention_dim
                    ),
                ));
            }
            let w = load_component(&t5_dir, "model", variant, dtype, device)?;
            let model = in_component(&t5_dir, T5EncoderModel::load(w.var_builder(), &cfg))?;
            Some((Arc::new(T5Tokenizer::from_dir(&component_dir(dir, "tokenizer_3")?)?), model))
        } else {
            None
        };
        let tr_w = load_component(&tr_dir, "diffusion_pytorch_model", variant, dtype, device)?;
        let transformer = in_component(&tr_dir, SD3Transformer2DModel::load(tr_w.var_builder(), &tr_cfg))?;
        let vae_dir = component_dir(dir, "vae")?;
        let vae_cfg: AutoencoderKLConfig = read_config(&vae_dir.join("config.json"))?;
        let vae_w = load_component(&vae_dir, "diffusion_pytorch_model", variant, dtype, device)?;
        let vae = in_component(&vae_dir, AutoencoderKL::load(vae_w.var_builder(), &vae_cfg))?;

        let bad = |m: String| TillerError::file(tr_dir.join("config.json"), m);
        if vae_cfg.latent_channels != tr_cfg.in_channels {
            return Err(bad(format!(
                "in_channels {} does not match the VAE's latent_channels {}",
                tr_cfg.in_channels, vae_cfg.latent_channels
            )));
        }
        let widths: Vec<usize> = encoders.iter().map(|e| e.config().hidden_size).collect();
        let projections: usize =
            encoders.iter().map(|e| e.config().projection_dim.unwrap_or(e.config().hidden_size)).sum();
        if widths.iter().sum::<usize>() > tr_cfg.joint_attention_dim || projections != tr_cfg.pooled_projection_dim {
            return Err(bad(format!(
                "the text encoders (widths {widths:?}, projections {projections}) do not fit joint_attention_dim {} \
                 and pooled_projection_dim {}",
                tr_cfg.joint_attention_dim, tr_cfg.pooled_projection_dim
            )));
        }
        let f = vae_cfg.scale_factor();
        let side = tr_cfg.sample_size * f;
        let max_tokens = tokenizers[0].max_len();
        let info = ModelInfo {
            name: name.to_string(),
            family: "stable-diffusion-3".into(),
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: f,
            default_size: (side, side),
            fixed_size: false,
            inpainting: false,
            guidance_embedding: false,
            max_prompt_tokens: max_tokens,
            patch_size: tr_cfg.patch_size,
            max_side: tr_cfg.pos_embed_max_size.map(|m| m * tr_cfg.patch_size * f),
            zero_empty_negative: false,
            defaults: SamplingDefaults::derive(&schedule, false, max_tokens),
            scheduler: schedule,
        };
        let [t1, t2]: [Arc<ClipTokenizer>; 2] =
            tokenizers.try_into().map_err(|_| TillerError::Other(anyhow::anyhow!("two tokenizers")))?;
        let [e1, e2]: [ClipTextModel; 2] =
            encoders.try_into().map_err(|_| TillerError::Other(anyhow::anyhow!("two encoders")))?;
        Ok(Self {
            info,
            tokenizers: [t1, t2],
            encoders: [e1, e2],
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

    pub fn transformer(&self) -> &SD3Transformer2DModel {
        &self.transformer
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    fn tokenize(&self, which: usize, prompts: &[String]) -> Result<(Tensor, Vec<usize>)> {
        self.tokenizers[which].encode_batch(prompts, &self.device)
    }
}

impl DiffusionModel for StableDiffusion3 {
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
            transformer: SD3Transformer2DModel::load(vb, &self.transformer_config)?,
            transformer_weights: Arc::new(w),
            ..self.clone()
        }))
    }

    /// diffusers' `encode_prompt`: both CLIP encoders' un-normed penultimate states side by side,
    /// zero-padded to `joint_attention_dim`, followed by 256 T5 tokens (zeros without T5); the
    /// pooled embedding is both projected pooled outputs side by side.
    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding> {
        let mut hidden = Vec::new();
        let mut pooled = Vec::new();
        let mut truncated = Vec::new();
        for (which, encoder) in self.encoders.iter().enumerate() {
            let (ids, t) = self.tokenize(which, prompts)?;
            truncated.extend(t);
            let out = encoder.forward_penultimate(&ids, 0)?;
            hidden.push(out.hidden_states);
            pooled.push(out.pooled);
        }
        truncated.sort_unstable();
        truncated.dedup();
        let clip = Tensor::cat(&hidden, 2)?;
        let (b, l, w) = clip.dims3()?;
        let joint = self.transformer.config().joint_attention_dim;
        let clip = clip.pad_with_zeros(2, 0, joint - w)?;
        let t5 = match &self.t5 {
            Some((tokenizer, model)) => {
                let (ids, t) = tokenizer.encode_batch(prompts, T5_TOKENS, &self.device)?;
                truncated.extend(t);
                truncated.sort_unstable();
                truncated.dedup();
                model.forward(&ids)?.to_dtype(clip.dtype())?
            }
            None => Tensor::zeros((b, T5_TOKENS, joint), clip.dtype(), &self.device)?,
        };
        debug_assert_eq!(l, self.info.max_prompt_tokens);
        Ok(PromptEmbedding {
            hidden_states: Tensor::cat(&[&clip, &t5], 1)?,
            pooled: Some(Tensor::cat(&pooled, 1)?),
            truncated,
        })
    }

    fn guidance_embedding(&self, _guidance_scale: f64, _batch: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &PromptEmbedding,
        _timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let pooled = context
            .pooled
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("SD3 needs the pooled text embedding".into()))?;
        let out = self.transformer.forward(
            &x.to_dtype(self.dtype)?,
            timesteps,
            &context.hidden_states.to_dtype(self.dtype)?,
            &pooled.to_dtype(self.dtype)?,
        )?;
        out.to_dtype(x.dtype())
    }

    fn forward_bytes_per_row(&self, h: usize, w: usize) -> u64 {
        let c = self.transformer.config();
        let p = c.patch_size.max(1);
        let tokens = (h / p) * (w / p) + self.info.max_prompt_tokens + T5_TOKENS;
        super::transformer_forward_bytes(tokens, c.inner_dim(), c.num_attention_heads)
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
