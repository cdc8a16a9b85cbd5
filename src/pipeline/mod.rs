//! Text-to-image generation: composes a [`DiffusionModel`], a [`Sampler`] and a guidance rule
//! (classifier-free guidance, or the guidance embedding of LCM-distilled UNets).

use std::time::Instant;

use candle_core::{DType, Device, Result, Shape, Tensor};

pub mod edit;

use crate::models::{DiffusionModel, ModelInfo};
use crate::sampling::{NoiseSource, Sampler, SamplerKind, SeededNoise};

/// What a caller asks for; `None` fields take the model's defaults (see [`resolve`]).
#[derive(Debug, Clone, Default)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    /// Image size in pixels; `None` = the model's default.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub scheduler: Option<SamplerKind>,
    pub eta: Option<f64>,
    pub seed: u64,
    /// Unit-variance initial noise (n, C, H/f, W/f), diffusers' `latents` argument.
    pub init_latents: Option<Tensor>,
    /// Edit an image (img2img, inpainting) instead of generating from noise alone.
    pub edit: Option<edit::EditInput>,
}

/// Parameters after defaults were applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedParams {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SamplerKind,
    pub eta: f64,
}

/// Apply the model's defaults (see [`crate::models::SamplingDefaults`]) to what the request
/// left unset.
pub fn resolve(model: &dyn DiffusionModel, p: &GenerationParams) -> ResolvedParams {
    resolve_for(model.info(), p)
}

/// [`resolve`] from the model's static facts (what request validation has).
pub fn resolve_for(info: &ModelInfo, p: &GenerationParams) -> ResolvedParams {
    let scheduler = p.scheduler.unwrap_or(info.defaults.sampler);
    let (steps, guidance) = info.defaults_for(scheduler);
    ResolvedParams {
        width: p.width.unwrap_or(info.default_size.1),
        height: p.height.unwrap_or(info.default_size.0),
        steps: p.steps.unwrap_or(steps),
        guidance_scale: p.guidance_scale.unwrap_or(guidance),
        scheduler,
        eta: p.eta.unwrap_or(default_eta(scheduler)),
    }
}

/// η when a request sets none: flow-sde is the stochastic flow sampler, so 1 (ancestral noise);
/// 0 elsewhere (DDIM's diffusers default).
pub fn default_eta(scheduler: SamplerKind) -> f64 {
    if scheduler == SamplerKind::FlowSde {
        1.0
    } else {
        0.0
    }
}

/// Progress reported after every denoising step. Returning `false` cancels the generation.
#[derive(Debug, Clone)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    /// The predicted clean latents x̂0 at this step, when the strategy has them: row 0 is the
    /// first image's, which a server decodes as a preview.
    pub x0: Option<Tensor>,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
}

#[derive(Debug)]
pub struct GenerationOutput {
    /// Final latents (before VAE scaling and decode), (n, C, h, w).
    pub latents: Tensor,
    /// The unit-variance initial noise the run started from (given or drawn from the seed).
    pub init_latents: Tensor,
    /// Decoded images in [0, 1], (n, 3, H, W) f32.
    pub images: Tensor,
    /// Seed of each image: image i of a request with seed s is image 0 of seed s + i.
    pub seeds: Vec<u64>,
    pub params: ResolvedParams,
    /// Denoiser evaluations, counting each CFG branch.
    pub denoiser_evals: usize,
    pub timings: Timings,
    /// True when the prompt (or negative prompt) was cut at the tokenizer's maximum length.
    pub prompt_truncated: bool,
}

/// Work done before a cancelled generation stopped, so that counters include it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    /// Steps (or ReNO iterations) completed.
    pub step: usize,
    pub denoiser_evals: usize,
    pub reward_evals: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("cancelled at step {}", .0.step)]
    Cancelled(Spent),
    /// A reward failed (bad reward spec: 4xx; external scorer: 502/504).
    #[error(transparent)]
    Reward(#[from] crate::reward::RewardError),
    /// The request itself is inconsistent (shapes, sizes): a client error, not a failure.
    #[error("invalid value for {0}")]
    InvalidInput(crate::error::FieldError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One independent seeded generator per image, so an image's noise does not depend on `n`.
/// A batch may hold several latents per image (steering particles); see [`NoiseSource::next`].
pub struct PerImageNoise {
    gens: Vec<SeededNoise>,
}

impl PerImageNoise {
    pub fn new(seed: u64, n: usize) -> Self {
        Self { gens: (0..n as u64).map(|i| SeededNoise::new(seed.wrapping_add(i))).collect() }
    }

    /// One generator per given seed.
    pub fn new_with_seeds(seeds: &[u64]) -> Self {
        Self { gens: seeds.iter().map(|&s| SeededNoise::new(s)).collect() }
    }
}

impl NoiseSource for PerImageNoise {
    fn next(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        // Group-major: with k latents per image (particles, candidates), image i's generator
        // fills rows i·k .. (i+1)·k, so an image's noise never depends on `n`.
        let dims = shape.dims();
        let g = self.gens.len();
        if dims.first().is_none_or(|&b| b == 0 || b % g != 0) {
            candle_core::bail!("noise shape {dims:?} does not match {g} images");
        }
        let per = shape.elem_count() / self.gens.len();
        let mut v = Vec::with_capacity(shape.elem_count());
        for g in self.gens.iter_mut() {
            v.extend(g.sample_vec(per));
        }
        Tensor::from_vec(v, shape.clone(), device)
    }
}

/// Classifier-free guidance runs when the scale exceeds 1 and the UNet does not take the scale
/// as an embedding (diffusers' rule).
pub fn uses_cfg(model: &dyn DiffusionModel, guidance_scale: f64) -> bool {
    guidance_scale > 1.0 && !model.info().guidance_embedding
}

/// Prompt conditioning for one request, with the guidance rule resolved.
pub struct Conditioning {
    /// (n or 2n, L, D): [uncond; cond] when `cfg` is set.
    pub context: crate::models::PromptEmbedding,
    pub timestep_cond: Option<Tensor>,
    pub guidance_scale: f64,
    pub cfg: bool,
    pub truncated: bool,
}

impl Conditioning {
    pub fn new(
        model: &dyn DiffusionModel,
        prompt: &str,
        negative: Option<&str>,
        guidance_scale: f64,
        n: usize,
    ) -> Result<Self> {
        let embedded = model.info().guidance_embedding;
        let cfg = uses_cfg(model, guidance_scale);
        let prompts: Vec<String> =
            if cfg { vec![negative.unwrap_or("").to_string(), prompt.to_string()] } else { vec![prompt.to_string()] };
        let mut emb = model.encode_prompts(&prompts)?;
        if cfg && negative.is_none() && model.info().zero_empty_negative {
            // The unconditional row is zeros, not the encoding of "" (SDXL pipelines).
            let zero_first = |t: &Tensor| -> Result<Tensor> {
                Tensor::cat(&[&t.narrow(0, 0, 1)?.zeros_like()?, &t.narrow(0, 1, 1)?], 0)
            };
            emb.hidden_states = zero_first(&emb.hidden_states)?;
            emb.pooled = emb.pooled.as_ref().map(zero_first).transpose()?;
        }
        let truncated = !emb.truncated.is_empty();
        // Repeat each prompt's embedding n times: [uncond x n, cond x n].
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = (0..prompts.len())
                .flat_map(|p| std::iter::repeat_n(p, n))
                .map(|p| t.narrow(0, p, 1))
                .collect::<Result<_>>()?;
            Tensor::cat(&rows, 0)
        };
        let context = crate::models::PromptEmbedding {
            hidden_states: repeat(&emb.hidden_states)?,
            pooled: emb.pooled.as_ref().map(repeat).transpose()?,
            truncated: emb.truncated,
        };
        let timestep_cond = if embedded { model.guidance_embedding(guidance_scale, n)? } else { None };
        Ok(Self { context, timestep_cond, guidance_scale, cfg, truncated })
    }

    /// Number of denoiser evaluations per latent per step.
    pub fn evals_per_latent(&self) -> usize {
        if self.cfg {
            2
        } else {
            1
        }
    }

    /// Guided model output for a batch of latents `x` (already scaled for the model).
    /// The conditioning must have been built for `x.dim(0)` latents.
    pub fn predict(&self, model: &dyn DiffusionModel, x: &Tensor, t: f64) -> Result<Tensor> {
        self.predict_with(model, x, t, None)
    }

    /// [`Conditioning::predict`] with `extra` input channels appended to `x` (an inpainting
    /// UNet's mask and masked-image latents, one row per latent).
    pub fn predict_with(
        &self,
        model: &dyn DiffusionModel,
        x: &Tensor,
        t: f64,
        extra: Option<&Tensor>,
    ) -> Result<Tensor> {
        let joined;
        let x = match extra {
            Some(e) => {
                joined = Tensor::cat(&[x, &e.to_dtype(x.dtype())?], 1)?;
                &joined
            }
            None => x,
        };
        if self.cfg {
            let x2 = Tensor::cat(&[x, x], 0)?;
            let ts = crate::models::timesteps(t, x2.dim(0)?, x.device())?;
            let out = model.predict(&x2, &ts, &self.context, self.timestep_cond.as_ref())?;
            let n = x.dim(0)?;
            let uncond = out.narrow(0, 0, n)?;
            let cond = out.narrow(0, n, n)?;
            let diff = (cond - &uncond)?;
            uncond + (diff * self.guidance_scale)?
        } else {
            let ts = crate::models::timesteps(t, x.dim(0)?, x.device())?;
            model.predict(x, &ts, &self.context, self.timestep_cond.as_ref())
        }
    }
}

/// Latent shape (n, C, H/f, W/f); errors when the size is not a multiple of the VAE factor
/// (times the transformer's patch size).
pub fn latent_shape(
    model: &dyn DiffusionModel,
    n: usize,
    height: usize,
    width: usize,
) -> Result<(usize, usize, usize, usize)> {
    let info = model.info();
    let (f, m) = (info.vae_scale_factor, info.size_multiple());
    if !height.is_multiple_of(m) || !width.is_multiple_of(m) {
        candle_core::bail!("image size {width}x{height} must be a multiple of {m}");
    }
    if let Some(max) = info.max_side.filter(|&s| width > s || height > s) {
        candle_core::bail!("image size {width}x{height}: the model takes sides up to {max} pixels");
    }
    Ok((n, info.latent_channels, height / f, width / f))
}

/// Run the sampling loop from unit-variance `init` noise; returns the final latents.
pub fn sample_latents(
    model: &dyn DiffusionModel,
    sampler: &dyn Sampler,
    cond: &Conditioning,
    init: &Tensor,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> std::result::Result<(Tensor, usize), GenerationError> {
    let mut x = (init * sampler.init_noise_sigma())?;
    let mut evals = 0;
    let total = sampler.num_steps();
    let mut prev: Option<Tensor> = None;
    for i in 0..total {
        let t = sampler.timestep(i);
        let x_in = sampler.scale_model_input(&x, i)?;
        let out = cond.predict(model, &x_in, t)?;
        evals += x.dim(0)? * cond.evals_per_latent();
        let z = if sampler.step_needs_noise(i) { Some(noise.next(x.shape(), x.device())?) } else { None };
        let x0 = sampler.predict_x0(&x, &out, i)?;
        x = sampler.transition(&x, &x0, prev.as_ref(), i, z.as_ref())?;
        prev = Some(x0);
        if !progress(Progress { step: i + 1, total, x0: None }) {
            return Err(GenerationError::Cancelled(Spent { step: i + 1, denoiser_evals: evals, reward_evals: 0 }));
        }
    }
    Ok((x, evals))
}

/// Full text-to-image generation with the seeded per-image noise.
pub fn generate(
    model: &dyn DiffusionModel,
    p: &GenerationParams,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> std::result::Result<GenerationOutput, GenerationError> {
    let mut noise = PerImageNoise::new(p.seed, p.n.max(1));
    generate_with_noise(model, p, &mut noise, progress)
}

/// Generation with an explicit noise source (initial latents drawn from it unless given).
pub fn generate_with_noise(
    model: &dyn DiffusionModel,
    p: &GenerationParams,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> std::result::Result<GenerationOutput, GenerationError> {
    let n = p.n.max(1);
    let params = resolve(model, p);
    let device = model.device().clone();
    let shape = latent_shape(model, n, params.height, params.width)
        .map_err(|e| GenerationError::InvalidInput(crate::error::FieldError::invalid("size", e.to_string())))?;
    // The initial noise is always drawn first, even when replaced, so the step noise that
    // follows is the same as in the seed-only run: (seed, init_latents drawn from that seed)
    // replays it exactly, for stochastic samplers too.
    let drawn = noise.next(&Shape::from(shape), &device)?;
    let init = match &p.init_latents {
        Some(t) => {
            if t.dims() != [shape.0, shape.1, shape.2, shape.3] {
                return Err(GenerationError::InvalidInput(crate::error::FieldError::invalid(
                    "init_latents",
                    format!("shape {:?} does not match the requested image: expected {:?}", t.dims(), shape),
                )));
            }
            t.to_dtype(DType::F32)?.to_device(&device)?
        }
        None => drawn,
    };
    let sampler = model.info().sampler(&params)?;

    let t0 = Instant::now();
    let cond = Conditioning::new(model, &p.prompt, p.negative_prompt.as_deref(), params.guidance_scale, n)?;
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let (latents, evals) = sample_latents(model, sampler.as_ref(), &cond, &init, noise, progress)?;
    let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;

    let t2 = Instant::now();
    let images = model.decode(&latents)?;
    let decode_ms = t2.elapsed().as_secs_f64() * 1e3;

    Ok(GenerationOutput {
        latents,
        init_latents: init,
        images,
        seeds: (0..n as u64).map(|i| p.seed.wrapping_add(i)).collect(),
        params,
        denoiser_evals: evals,
        timings: Timings { encode_ms, denoise_ms, decode_ms },
        prompt_truncated: cond.truncated,
    })
}
