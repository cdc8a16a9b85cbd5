//! A Stable Diffusion pipeline directory (diffusers layout): CLIP tokenizer + text encoder,
//! UNet, VAE and scheduler config. Covers SD 1.x, SD 2.x (v-prediction), SD-Turbo,
//! LCM-distilled UNets and SDXL (a second tokenizer and text encoder with projection, and the
//! UNet's `text_time` conditioning).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::tokenizer::ClipTokenizer;
use super::unet_2d::{UNet2DConditionModel, UNet2DConfig};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::weights::{component_dir, in_component, load_component, read_config};
use super::{DiffusionModel, ModelInfo, PromptEmbedding, SamplingDefaults};
use crate::adapters::apply::WeightedLayers;
use crate::adapters::{Component, TargetIndex};
use crate::error::{Result as TResult, TillerError};
use crate::sampling::SchedulerConfig;

#[derive(Debug, Clone, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    class_name: String,
    /// SDXL: classifier-free guidance without a negative prompt uses zero embeddings.
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

/// Pipelines whose components this loader understands.
const SUPPORTED_PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "AltDiffusionPipeline",
    "StableDiffusionXLPipeline",
];

/// SDXL's second text encoder (`CLIPTextModelWithProjection`) and its tokenizer.
#[derive(Clone)]
struct SecondEncoder {
    tokenizer: Arc<ClipTokenizer>,
    encoder: ClipTextModel,
    /// Base weights by published name (adapter variants are built from them).
    weights: Arc<HashMap<String, Tensor>>,
    config: ClipTextConfig,
}

/// Options for loading a Stable Diffusion directory.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Weight-file variant infix (`fp16` → `diffusion_pytorch_model.fp16.safetensors`), used
    /// when present.
    pub variant: Option<String>,
    /// Text features from `clip_skip` layers before the last (0 = as configured).
    pub clip_skip: usize,
}

pub struct StableDiffusion {
    info: ModelInfo,
    tokenizer: Arc<ClipTokenizer>,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: Arc<AutoencoderKL>,
    /// Base weights by published name, kept so adapter variants can be built from them
    /// (tensors are shared with the networks, not copied).
    unet_weights: Arc<HashMap<String, Tensor>>,
    te_weights: Arc<HashMap<String, Tensor>>,
    unet_cfg: UNet2DConfig,
    te_cfg: ClipTextConfig,
    /// SDXL: the second encoder, whose penultimate states are joined to the first's and whose
    /// projected pooled output conditions the UNet.
    second: Option<SecondEncoder>,
    targets: Arc<TargetIndex>,
    dtype: DType,
    device: Device,
    clip_skip: usize,
    pub dir: PathBuf,
}

impl StableDiffusion {
    pub fn load(name: &str, dir: &Path, opts: &LoadOptions) -> TResult<Self> {
        let index: ModelIndex = read_config(&dir.join("model_index.json"))?;
        if !SUPPORTED_PIPELINES.contains(&index.class_name.as_str()) {
            return Err(TillerError::file(
                dir.join("model_index.json"),
                format!(
                    "pipeline `{}` is not supported (supported: {})",
                    index.class_name,
                    SUPPORTED_PIPELINES.join(", ")
                ),
            ));
        }
        let variant = opts.variant.as_deref();
        let (dtype, device) = (opts.dtype, &opts.device);

        let sched_path = component_dir(dir, "scheduler")?.join("scheduler_config.json");
        let scheduler = SchedulerConfig::from_file(&sched_path)?;
        let schedule = crate::sampling::ScheduleConfig::from_scheduler_config(scheduler.clone())
            .map_err(|m| TillerError::file(&sched_path, m))?;

        let tokenizer = ClipTokenizer::from_dir(&component_dir(dir, "tokenizer")?)?;

        let te_dir = component_dir(dir, "text_encoder")?;
        let te_cfg: ClipTextConfig = read_config(&te_dir.join("config.json"))?;
        let unet_dir = component_dir(dir, "unet")?;
        let unet_cfg: UNet2DConfig = read_config(&unet_dir.join("config.json"))?;
        let vae_dir = component_dir(dir, "vae")?;
        let vae_cfg: AutoencoderKLConfig = read_config(&vae_dir.join("config.json"))?;
        // A published pipeline's weight files, or one original-layout checkpoint beside its configs.
        let (te_w, unet_w, vae_w) = match super::single_file::find(dir)? {
            Some(file) => {
                let (unet, vae, te) = super::single_file::load(&file, &unet_cfg, &vae_cfg, &te_cfg, dtype, device)?;
                (te, unet, vae)
            }
            None => (
                load_component(&te_dir, "model", variant, dtype, device)?,
                load_component(&unet_dir, "diffusion_pytorch_model", variant, dtype, device)?,
                load_component(&vae_dir, "diffusion_pytorch_model", variant, dtype, device)?,
            ),
        };
        let text_encoder = in_component(&te_dir, ClipTextModel::load(te_w.var_builder(), &te_cfg))?;
        let xl = index.class_name.starts_with("StableDiffusionXL");
        let second = if xl {
            let dir2 = component_dir(dir, "text_encoder_2")?;
            let cfg2: ClipTextConfig = read_config(&dir2.join("config.json"))?;
            if !cfg2.with_projection() {
                return Err(TillerError::file(
                    dir2.join("config.json"),
                    "SDXL's text_encoder_2 is a CLIPTextModelWithProjection",
                ));
            }
            let w2 = load_component(&dir2, "model", variant, dtype, device)?;
            Some(SecondEncoder {
                tokenizer: Arc::new(ClipTokenizer::from_dir(&component_dir(dir, "tokenizer_2")?)?),
                encoder: in_component(&dir2, ClipTextModel::load(w2.var_builder(), &cfg2))?,
                weights: Arc::new(w2.tensors),
                config: cfg2,
            })
        } else {
            None
        };
        if unet_cfg.addition_embed_type.as_deref() == Some("text_time") {
            let Some(s) = &second else {
                return Err(TillerError::file(
                    unet_dir.join("config.json"),
                    "a UNet with text_time conditioning needs the SDXL pipeline's text_encoder_2",
                ));
            };
            let want = s.encoder.config().projection_dim.unwrap_or(s.encoder.config().hidden_size)
                + 6 * unet_cfg.addition_time_embed_dim.unwrap_or(0);
            if unet_cfg.projection_class_embeddings_input_dim != Some(want) {
                return Err(TillerError::file(
                    unet_dir.join("config.json"),
                    format!(
                        "projection_class_embeddings_input_dim {:?} does not match text_encoder_2's projection + 6 × \
                         addition_time_embed_dim = {want}",
                        unet_cfg.projection_class_embeddings_input_dim
                    ),
                ));
            }
        }
        let unet = in_component(&unet_dir, UNet2DConditionModel::load(unet_w.var_builder(), &unet_cfg))?;
        let vae = in_component(&vae_dir, AutoencoderKL::load(vae_w.var_builder(), &vae_cfg))?;

        // An inpainting UNet also takes the mask (1 channel) and the masked image's latents.
        let inpainting = unet_cfg.in_channels == 2 * vae_cfg.latent_channels + 1;
        if vae_cfg.latent_channels != unet_cfg.in_channels && !inpainting {
            return Err(TillerError::file(
                unet_dir.join("config.json"),
                format!(
                    "in_channels {} does not match the VAE's latent_channels {} (nor 2 × {} + 1, an inpainting UNet)",
                    unet_cfg.in_channels, vae_cfg.latent_channels, vae_cfg.latent_channels
                ),
            ));
        }
        let f = vae_cfg.scale_factor();
        let side = unet_cfg.sample_size.unwrap_or(64) * f;
        let lpb = match &unet_cfg.layers_per_block {
            super::unet_2d::PerBlock::One(v) => *v,
            super::unet_2d::PerBlock::Each(v) => v.first().copied().unwrap_or(2),
        };
        let mut components = vec![(Component::Unet, &unet_w.tensors), (Component::TextEncoder, &te_w.tensors)];
        if let Some(s) = &second {
            components.push((Component::TextEncoder2, &*s.weights));
        }
        let targets = TargetIndex::new(&components, lpb);
        let info = ModelInfo {
            name: name.to_string(),
            family: if xl { "stable-diffusion-xl" } else { "stable-diffusion" }.into(),
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: f,
            default_size: (side, side),
            fixed_size: false,
            inpainting,
            guidance_embedding: unet_cfg.time_cond_proj_dim.is_some(),
            max_prompt_tokens: tokenizer.max_len(),
            patch_size: 1,
            max_side: None,
            zero_empty_negative: xl && index.force_zeros_for_empty_prompt.unwrap_or(true),
            defaults: if xl {
                // StableDiffusionXLPipeline's guidance default
                SamplingDefaults::with_pipeline(&schedule, unet_cfg.time_cond_proj_dim.is_some(), (50, 5.0))
            } else {
                SamplingDefaults::derive(&schedule, unet_cfg.time_cond_proj_dim.is_some(), tokenizer.max_len())
            },
            scheduler: schedule,
        };
        Ok(Self {
            info,
            tokenizer: Arc::new(tokenizer),
            text_encoder,
            unet,
            vae: Arc::new(vae),
            unet_weights: Arc::new(unet_w.tensors),
            te_weights: Arc::new(te_w.tensors),
            unet_cfg,
            te_cfg,
            second,
            targets: Arc::new(targets),
            dtype,
            device: device.clone(),
            clip_skip: opts.clip_skip,
            dir: dir.to_path_buf(),
        })
    }

    /// A variant with LoRA adapters applied: merged into new weight tensors, or kept as
    /// unmerged factors that each layer adds at run time. The base model is not modified; VAE and
    /// tokenizer are shared.
    pub fn with_adapters(&self, adapters: &WeightedLayers, merge: bool) -> Result<Self> {
        let build = |base: &HashMap<String, Tensor>, c: Component| -> Result<HashMap<String, Tensor>> {
            if merge {
                crate::adapters::apply::merge(base, c, adapters)
            } else {
                crate::adapters::apply::unmerged(base, c, adapters)
            }
        };
        let touches = |c: Component| adapters.iter().any(|(_, ls)| ls.iter().any(|l| l.component == c));
        let unet_w = if touches(Component::Unet) {
            Arc::new(build(&self.unet_weights, Component::Unet)?)
        } else {
            self.unet_weights.clone()
        };
        let te_w = if touches(Component::TextEncoder) {
            Arc::new(build(&self.te_weights, Component::TextEncoder)?)
        } else {
            self.te_weights.clone()
        };
        let vb = |w: &HashMap<String, Tensor>| candle_nn::VarBuilder::from_tensors(w.clone(), self.dtype, &self.device);
        let unet = if touches(Component::Unet) {
            UNet2DConditionModel::load(vb(&unet_w), &self.unet_cfg)?
        } else {
            self.unet.clone()
        };
        let text_encoder = if touches(Component::TextEncoder) {
            ClipTextModel::load(vb(&te_w), &self.te_cfg)?
        } else {
            self.text_encoder.clone()
        };
        let second = match &self.second {
            Some(s) if touches(Component::TextEncoder2) => {
                let w = Arc::new(build(&s.weights, Component::TextEncoder2)?);
                Some(SecondEncoder {
                    tokenizer: s.tokenizer.clone(),
                    encoder: ClipTextModel::load(vb(&w), &s.config)?,
                    weights: w,
                    config: s.config.clone(),
                })
            }
            other => other.clone(),
        };
        Ok(Self {
            info: self.info.clone(),
            tokenizer: self.tokenizer.clone(),
            text_encoder,
            unet,
            vae: self.vae.clone(),
            unet_weights: unet_w,
            te_weights: te_w,
            unet_cfg: self.unet_cfg.clone(),
            te_cfg: self.te_cfg.clone(),
            second,
            targets: self.targets.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            clip_skip: self.clip_skip,
            dir: self.dir.clone(),
        })
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Token ids (B, L) for a batch of prompts, and which prompts were truncated.
    pub fn tokenize(&self, prompts: &[String]) -> Result<(Tensor, Vec<usize>)> {
        self.tokenizer.encode_batch(prompts, &self.device)
    }
}

/// The LCM guidance-scale embedding: sinusoid of (scale − 1)·1000, [sin, cos].
pub fn guidance_scale_embedding(guidance_scale: f64, dim: usize, batch: usize, device: &Device) -> Result<Tensor> {
    let w = (guidance_scale - 1.0) * 1000.0;
    let half = dim / 2;
    let step = 10000f64.ln() / (half as f64 - 1.0);
    let mut row: Vec<f32> = Vec::with_capacity(dim);
    let args: Vec<f32> = (0..half).map(|j| (w as f32) * ((-(step * j as f64)).exp() as f32)).collect();
    row.extend(args.iter().map(|a| a.sin()));
    row.extend(args.iter().map(|a| a.cos()));
    if dim % 2 == 1 {
        row.push(0.0);
    }
    let data: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
    Tensor::from_vec(data, (batch, dim), device)
}

impl DiffusionModel for StableDiffusion {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn adapter_targets(&self) -> Option<&TargetIndex> {
        Some(&self.targets)
    }

    fn with_adapters(&self, adapters: &WeightedLayers, merge: bool) -> Result<Arc<dyn DiffusionModel>> {
        Ok(Arc::new(StableDiffusion::with_adapters(self, adapters, merge)?))
    }

    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding> {
        let (ids, mut truncated) = self.tokenize(prompts)?;
        let Some(second) = &self.second else {
            let out = self.text_encoder.forward(&ids, self.clip_skip)?;
            return Ok(PromptEmbedding { hidden_states: out.hidden_states, pooled: Some(out.pooled), truncated });
        };
        // SDXL: both encoders' penultimate states side by side; the second's projected pooled
        // output (diffusers' `encode_prompt`).
        let (ids2, truncated2) = second.tokenizer.encode_batch(prompts, &self.device)?;
        let first = self.text_encoder.forward_penultimate(&ids, self.clip_skip)?;
        let out2 = second.encoder.forward_penultimate(&ids2, self.clip_skip)?;
        let hidden_states = Tensor::cat(&[&first.hidden_states, &out2.hidden_states], 2)?;
        truncated.extend(truncated2);
        truncated.sort_unstable();
        truncated.dedup();
        Ok(PromptEmbedding { hidden_states, pooled: Some(out2.pooled), truncated })
    }

    fn guidance_embedding(&self, guidance_scale: f64, batch: usize) -> Result<Option<Tensor>> {
        match self.unet.config().time_cond_proj_dim {
            Some(dim) => Ok(Some(guidance_scale_embedding(guidance_scale, dim, batch, &self.device)?)),
            None => Ok(None),
        }
    }

    fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &PromptEmbedding,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let added = if self.unet.takes_added_cond() {
            let pooled = context
                .pooled
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("SDXL needs the pooled text embedding".into()))?;
            // original size = target size = the image's, no crop (the pipeline's defaults)
            let f = self.info.vae_scale_factor;
            let (b, _, h, w) = x.dims4()?;
            let (hh, ww) = ((h * f) as f32, (w * f) as f32);
            let ids: Vec<f32> = (0..b).flat_map(|_| [hh, ww, 0.0, 0.0, hh, ww]).collect();
            Some(super::unet_2d::AddedCond {
                text_embeds: pooled.to_dtype(self.dtype)?,
                time_ids: Tensor::from_vec(ids, (b, 6), x.device())?,
            })
        } else {
            None
        };
        let out = self.unet.forward_with(
            &x.to_dtype(self.dtype)?,
            timesteps,
            &context.hidden_states.to_dtype(self.dtype)?,
            timestep_cond,
            added.as_ref(),
        )?;
        out.to_dtype(x.dtype())
    }

    fn forward_bytes_per_row(&self, h: usize, w: usize) -> u64 {
        self.unet.forward_bytes_per_row(h, w)
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
