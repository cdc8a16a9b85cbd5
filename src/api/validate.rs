//! Request validation: the body of `POST /v1/images/generations` is parsed into its typed
//! struct (errors name the field path), then checked once against the configured limits, the
//! model and the rewards on offer; every rejection is a 400 naming the field.

use base64::Engine as _;

use super::error::ApiError;
use super::types::{AdapterRef, ImageGenerationRequest};
use crate::adapters::registry::AdapterRegistry;
use crate::adapters::AdapterSet;
use crate::config::Limits;
use crate::engine::ModelSummary;
use crate::pipeline::GenerationParams;
use crate::reward::{RewardError, RewardRegistry, RewardSpec};
use crate::sampling::SamplerKind;
use crate::steering::{SteeringLimits, SteeringRequest, SteeringSpec};
use crate::util::encode::{Encoding, OutputFormat};

/// Most adapters one request may apply.
pub const MAX_ADAPTERS: usize = 8;
/// Largest |scale| of an adapter.
pub const MAX_ADAPTER_SCALE: f64 = 10.0;

/// Largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 100.0;

/// Parse a JSON body as a generation request: 400 naming the field path for malformed JSON, a
/// wrong type, an unknown or a missing field.
pub fn parse_body(bytes: &[u8]) -> Result<ImageGenerationRequest, ApiError> {
    Ok(crate::util::json::parse_slice(bytes)?)
}

/// Check the adapters' scales and names and look them up (unknown names are 404).
pub fn check_adapters(refs: &[AdapterRef], registry: &AdapterRegistry) -> Result<AdapterSet, ApiError> {
    if refs.len() > MAX_ADAPTERS {
        return Err(ApiError::invalid(
            "adapters",
            format!("`adapters` lists {} adapters; at most {MAX_ADAPTERS} may be applied at once", refs.len()),
        ));
    }
    let mut set = AdapterSet::default();
    for (i, r) in refs.iter().enumerate() {
        let scale = r.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > MAX_ADAPTER_SCALE {
            let field = format!("adapters[{i}].scale");
            return Err(ApiError::invalid(
                &field,
                format!("`{field}` must be a number between -{MAX_ADAPTER_SCALE} and {MAX_ADAPTER_SCALE}, got {scale}"),
            ));
        }
        if let Some(j) = refs[..i].iter().position(|o| o.name == r.name) {
            let field = format!("adapters[{i}].name");
            return Err(ApiError::invalid(
                &field,
                format!("adapter `{}` is listed twice (adapters[{j}] and adapters[{i}]); list it once", r.name),
            ));
        }
        let adapter = registry.get(&r.name).map_err(|e| ApiError::adapter(e, &format!("adapters[{i}].name")))?;
        set.items.push((adapter, scale));
    }
    Ok(set)
}

fn reward_error(e: RewardError) -> ApiError {
    match e {
        RewardError::Invalid(f) => ApiError::from(f),
        other => ApiError::invalid("reward", other.to_string()),
    }
}

/// Parse `WxH` (or `auto` for the model default).
pub fn parse_size(s: &str) -> Result<Option<(usize, usize)>, ApiError> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let bad =
        || ApiError::invalid("size", format!("`size` must look like `512x512` (WIDTHxHEIGHT) or `auto`, got `{s}`"));
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    Ok(Some((w, h)))
}

/// Decode base64 in the standard or URL-safe alphabet, padded or not.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|e| e.decode(s).ok())
}

/// A request that passed validation.
#[derive(Debug)]
pub struct Validated {
    pub params: GenerationParams,
    pub steering: SteeringRequest,
    /// Adapters with their scales, in request order.
    pub adapters: AdapterSet,
    /// The seed was chosen by the server.
    pub random_seed: bool,
    /// Previews to send while streaming (0–3).
    pub partial_images: usize,
    /// File format of the images.
    pub encoding: Encoding,
}

/// Check a typed request against the limits, the model it targets and the rewards on offer.
pub fn check(
    req: ImageGenerationRequest,
    limits: &Limits,
    model: &ModelSummary,
    rewards: &RewardRegistry,
    adapters: &AdapterRegistry,
) -> Result<Validated, ApiError> {
    let info = &model.info;
    let chars = req.prompt.chars().count();
    if chars > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!("`prompt` has {chars} characters; the limit is {}", limits.max_prompt_chars),
        ));
    }
    if let Some(neg) = &req.negative_prompt {
        let chars = neg.chars().count();
        if chars > limits.max_prompt_chars {
            return Err(ApiError::invalid(
                "negative_prompt",
                format!("`negative_prompt` has {chars} characters; the limit is {}", limits.max_prompt_chars),
            ));
        }
    }
    match req.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(ApiError::invalid(
                "response_format",
                "`response_format: url` is not supported: tiller does not host images; use `b64_json` (the default)",
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("Unknown response_format `{other}`; only `b64_json` is supported"),
            ))
        }
    }
    let format = req.output_format.unwrap_or_default();
    let quality = match (req.output_compression, format) {
        (None, _) => 100,
        (Some(_), OutputFormat::Png) => {
            return Err(ApiError::invalid(
                "output_compression",
                "`output_compression` applies to `output_format` jpeg (and webp); PNG is always lossless",
            ))
        }
        (Some(c), _) if c > 100 => {
            return Err(ApiError::invalid(
                "output_compression",
                format!("`output_compression` must be 0 to 100, got {c}"),
            ))
        }
        (Some(c), _) => c as u8,
    };
    let encoding = Encoding { format, quality };
    if let Some(p) = req.partial_images {
        if p > 3 {
            return Err(ApiError::invalid(
                "partial_images",
                format!("`partial_images` must be between 0 and 3, got {p}"),
            ));
        }
    }
    let n = req.n.unwrap_or(1) as usize;
    if n < 1 || n > limits.max_n {
        return Err(ApiError::invalid("n", format!("`n` must be between 1 and {}, got {n}", limits.max_n)));
    }
    let f = info.vae_scale_factor.max(1);
    let (width, height) = match req.size.as_deref().map(parse_size).transpose()?.flatten() {
        Some(wh) => wh,
        None => (info.default_size.1, info.default_size.0),
    };
    let m = info.size_multiple();
    if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
        return Err(ApiError::invalid(
            "size",
            format!(
                "`size` {width}x{height}: width and height must be positive multiples of {m} for model `{}`",
                model.name
            ),
        ));
    }
    if let Some(max) = info.max_side.filter(|&m| width > m || height > m) {
        return Err(ApiError::invalid(
            "size",
            format!(
                "`size` {width}x{height}: model `{}` takes sides up to {max} pixels (its position table)",
                model.name
            ),
        ));
    }
    if info.fixed_size && (height, width) != info.default_size {
        return Err(ApiError::invalid(
            "size",
            format!(
                "`size` {width}x{height}: model `{}` works at {}x{} only",
                model.name, info.default_size.1, info.default_size.0
            ),
        ));
    }
    let (max_w, max_h, max_px) = limits.size_limits(info.default_size);
    if width > max_w || height > max_h || width.saturating_mul(height) > max_px {
        return Err(ApiError::invalid(
            "size",
            format!(
                "`size` {width}x{height} exceeds the limits for model `{}` (width ≤ {max_w}, height ≤ {max_h}, \
                 width×height ≤ {max_px}; limits.max_width/max_height/max_pixels, by default twice the model's \
                 native size)",
                model.name
            ),
        ));
    }
    if let Some(steps) = req.steps {
        if steps < 1 || steps as usize > limits.max_steps {
            return Err(ApiError::invalid(
                "steps",
                format!("`steps` must be between 1 and {} (limits.max_steps), got {steps}", limits.max_steps),
            ));
        }
    }
    if let Some(g) = req.guidance_scale {
        if !(0.0..=MAX_GUIDANCE).contains(&g) {
            return Err(ApiError::invalid(
                "guidance_scale",
                format!("`guidance_scale` must be between 0 and {MAX_GUIDANCE}, got {g}"),
            ));
        }
    }
    if let Some(eta) = req.eta {
        if !(0.0..=1.0).contains(&eta) {
            return Err(ApiError::invalid("eta", format!("`eta` must be between 0 and 1, got {eta}")));
        }
    }
    // Sampler-specific limits (LCM's original_inference_steps, num_train_timesteps, scheduler
    // configs tiller cannot sample); the default step counts are always valid.
    let scheduler = req.scheduler.unwrap_or(model.default_scheduler);
    let steps = req.steps.map(|s| s as usize).unwrap_or(1);
    if let Err(e) = crate::sampling::check_for(scheduler, &info.scheduler, steps, req.eta.unwrap_or(0.0)) {
        return Err(match e {
            crate::error::TillerError::InvalidField(f) => ApiError::from(f),
            other => ApiError::invalid("scheduler", other.to_string()),
        });
    }
    let init_latents = match &req.init_latents {
        None => None,
        Some(b64) => {
            let bytes = decode_base64(b64)
                .ok_or_else(|| ApiError::invalid("init_latents", "`init_latents` is not valid base64"))?;
            let t = crate::util::tensor_io::read_init_latents(&bytes)
                .map_err(|e| ApiError::invalid("init_latents", format!("`init_latents`: {e}")))?;
            let expected = [n, info.latent_channels, height / f, width / f];
            if t.dims() != expected {
                return Err(ApiError::invalid(
                    "init_latents",
                    format!(
                        "`init_latents` has shape {:?}; expected {:?} (n, channels, height/{f}, width/{f}) for n={n}, size={width}x{height}",
                        t.dims(),
                        expected
                    ),
                ));
            }
            Some(t)
        }
    };
    let (seed, random_seed) = match req.seed {
        Some(s) if s.checked_add(n as u64 - 1).is_none() => {
            return Err(ApiError::invalid(
                "seed",
                format!("`seed` {s} + n − 1 overflows 2^64 − 1: image i uses seed + i; use a smaller seed"),
            ))
        }
        Some(s) => (s, false),
        // 53 bits, so that JavaScript clients can hold the reported seed exactly.
        None => (rand::random::<u64>() >> 11, true),
    };
    let params = GenerationParams {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        n,
        width: Some(width),
        height: Some(height),
        steps: req.steps.map(|s| s as usize),
        guidance_scale: req.guidance_scale,
        scheduler: req.scheduler,
        eta: req.eta,
        seed,
        init_latents,
        edit: None,
    };
    let adapters = check_adapters(req.adapters.as_deref().unwrap_or_default(), adapters)?;
    let steering =
        check_steering(req.steering.unwrap_or_default(), req.reward, req.trace, limits, model, rewards, &params)?;
    let partial_images = req.partial_images.unwrap_or(0) as usize;
    Ok(Validated { params, steering, adapters, random_seed, partial_images, encoding })
}

/// Steering fields: the spec's numbers, the reward (built from the registry), and the
/// combinations that cannot work (deterministic sampler for FK/SVDD, non-differentiable reward
/// for ReNO, init_latents for population methods).
fn check_steering(
    spec: SteeringSpec,
    reward: Option<RewardSpec>,
    trace: Option<bool>,
    limits: &Limits,
    model: &ModelSummary,
    rewards: &RewardRegistry,
    params: &GenerationParams,
) -> Result<SteeringRequest, ApiError> {
    let lim = SteeringLimits {
        max_particles: limits.max_particles,
        max_reno_iterations: limits.max_reno_iterations,
        max_reno_steps: limits.max_reno_steps,
    };
    spec.validate(&lim)?;
    let method = spec.method();
    let reward = match reward {
        Some(r) => Some(rewards.build(&r).map_err(reward_error)?),
        None if spec.needs_reward() => {
            return Err(ApiError::invalid(
                "reward",
                format!("steering method `{method}` needs a `reward` (GET /v1/rewards lists them)"),
            ))
        }
        None => None,
    };
    if let (SteeringSpec::Reno(_) | SteeringSpec::Flowchef(_), Some(r)) = (&spec, &reward) {
        if !r.differentiable() {
            let who = if matches!(spec, SteeringSpec::Reno(_)) { "ReNO" } else { "FlowChef" };
            return Err(ApiError::invalid(
                "reward",
                format!("{who} needs a differentiable reward; `{}` is not (GET /v1/rewards says which are)", r.name()),
            ));
        }
    }
    if params.init_latents.is_some() && !spec.takes_init_latents() {
        return Err(ApiError::invalid(
            "init_latents",
            format!("`init_latents` works with steering methods none, reno and flowchef; `{method}` starts from many noises"),
        ));
    }
    let r = crate::steering::resolve(&model.info, params, &spec);
    // Other sampler problems are reported by the sampler checks.
    if let Ok(sampler) = model.info.sampler(&r) {
        if let Err(e) =
            crate::steering::check_plan(&spec, sampler.as_ref(), model.info.scheduler.family(), limits.max_reno_steps)
        {
            let noise_field =
                if matches!(r.scheduler, SamplerKind::Ddim | SamplerKind::FlowSde) { "eta" } else { "scheduler" };
            let field = e.field(noise_field);
            let message = match e {
                crate::steering::PlanError::NeedsNoise { .. } => {
                    format!("{e} (got `{}`, eta {}, {} steps)", r.scheduler, r.eta, r.steps)
                }
                _ => e.to_string(),
            };
            return Err(ApiError::invalid(&field, message));
        }
    }
    Ok(SteeringRequest { spec, reward, trace: trace.unwrap_or(false) })
}
