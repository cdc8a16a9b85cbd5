//! Request validation: every field of `POST /v1/images/generations` is checked by type, then
//! against the configured limits and the model, and rejected with 422 naming the field.
//!
//! Parsing works on a `serde_json::Value` rather than a derived `Deserialize`, so that each
//! type error names its field (serde's messages name only a line and column).

use base64::Engine as _;
use serde_json::{Map, Value};

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

/// Fields the endpoint accepts.
pub const FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "user",
    "quality",
    "style",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "scheduler",
    "eta",
    "seed",
    "init_latents",
    "steering",
    "reward",
    "trace",
    "adapters",
    "stream",
    "partial_images",
    "stream_progress",
];

/// Most adapters one request may apply.
pub const MAX_ADAPTERS: usize = 8;
/// Largest |scale| of an adapter.
pub const MAX_ADAPTER_SCALE: f64 = 10.0;

/// Largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 100.0;

/// Parse a JSON body (400 for malformed JSON, 422 for a wrong field type or unknown field).
pub fn parse_body(bytes: &[u8]) -> Result<ImageGenerationRequest, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("The request body is not valid JSON: {e}"),
        )
    })?;
    parse_value(value)
}

/// Type-check a JSON value as an image generation request.
pub fn parse_value(value: Value) -> Result<ImageGenerationRequest, ApiError> {
    let Value::Object(obj) = value else {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_type",
            "The request body must be a JSON object",
        ));
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_parameter",
            format!("Unrecognized request argument supplied: `{k}`; accepted fields: {}", FIELDS.join(", ")),
        )
        .with_param(k));
    }
    let prompt = string(&obj, "prompt")?.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "missing_required_parameter",
            "`prompt` is required",
        )
        .with_param("prompt")
    })?;
    let scheduler = match string(&obj, "scheduler")? {
        None => None,
        Some(s) => Some(parse_scheduler(&s)?),
    };
    Ok(ImageGenerationRequest {
        prompt,
        model: string(&obj, "model")?,
        n: integer(&obj, "n")?.map(|v| v.min(u32::MAX as u64) as u32),
        size: string(&obj, "size")?,
        response_format: string(&obj, "response_format")?,
        output_format: string(&obj, "output_format")?,
        user: string(&obj, "user")?,
        quality: string(&obj, "quality")?,
        style: string(&obj, "style")?,
        negative_prompt: string(&obj, "negative_prompt")?,
        steps: integer(&obj, "steps")?.map(|v| v.min(u32::MAX as u64) as u32),
        guidance_scale: number(&obj, "guidance_scale")?,
        scheduler,
        eta: number(&obj, "eta")?,
        seed: integer(&obj, "seed")?,
        init_latents: string(&obj, "init_latents")?,
        steering: parse_steering(obj.get("steering"))?,
        reward: match obj.get("reward") {
            None | Some(Value::Null) => None,
            Some(v) => Some(RewardSpec::parse(v).map_err(reward_error)?),
        },
        trace: boolean(&obj, "trace")?,
        adapters: parse_adapters(obj.get("adapters"))?,
        stream: boolean(&obj, "stream")?,
        partial_images: integer(&obj, "partial_images")?.map(|v| v.min(u32::MAX as u64) as u32),
        stream_progress: boolean(&obj, "stream_progress")?,
    })
}

/// Type-check the `adapters` field; errors name the entry (`adapters[1].scale`).
pub fn parse_adapters(v: Option<&Value>) -> Result<Option<Vec<AdapterRef>>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::wrong_type("adapters", "a list of {\"name\": ..., \"scale\": ...} objects")),
    };
    if list.len() > MAX_ADAPTERS {
        return Err(ApiError::invalid(
            "adapters",
            format!("`adapters` lists {} adapters; at most {MAX_ADAPTERS} may be applied at once", list.len()),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = format!("adapters[{i}]");
        let Value::Object(obj) = entry else {
            return Err(ApiError::wrong_type(&at, "an object {\"name\": ..., \"scale\": ...}"));
        };
        if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "name" | "scale")) {
            let field = format!("{at}.{k}");
            return Err(ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_parameter",
                format!("Unrecognized adapter argument `{field}`; an adapter takes `name` and `scale`"),
            )
            .with_param(&field));
        }
        let name_field = format!("{at}.name");
        let name = match obj.get("name") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => {
                return Err(ApiError::new(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "missing_required_parameter",
                    format!("`{name_field}` is required"),
                )
                .with_param(&name_field))
            }
            Some(_) => return Err(ApiError::wrong_type(&name_field, "a string")),
        };
        let scale_field = format!("{at}.scale");
        let scale = match obj.get("scale") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_f64(),
            Some(_) => return Err(ApiError::wrong_type(&scale_field, "a number")),
        };
        out.push(AdapterRef { name, scale });
    }
    Ok(Some(out))
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

/// Type-check the `steering` field; errors name the offending key (`steering.particles`).
pub fn parse_steering(v: Option<&Value>) -> Result<Option<SteeringSpec>, ApiError> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let Value::Object(obj) = v else {
        return Err(ApiError::wrong_type("steering", "an object with a `method` field"));
    };
    const METHODS: &str = "none, best_of_n, fk, svdd, reno";
    match obj.get("method") {
        Some(Value::String(m)) if METHODS.split(", ").any(|x| x == m) => {}
        Some(Value::String(m)) => {
            return Err(ApiError::invalid(
                "steering.method",
                format!("`steering.method`: unknown steering method `{m}`; expected one of: {METHODS}"),
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "steering.method",
                format!("`steering.method` is required: one of {METHODS}"),
            ))
        }
    }
    // serde ignores every other key of the unit variant `none`; a typo must not pass silently.
    if obj["method"] == "none" {
        if let Some(k) = obj.keys().find(|k| *k != "method") {
            let field = format!("steering.{k}");
            return Err(ApiError::invalid(&field, format!("`{field}`: method `none` takes no parameters")));
        }
    }
    serde_json::from_value(v.clone())
        .map_err(|e| {
            // serde names an unknown key, but not a mistyped or nested one: blame the key that
            // fails on its own.
            let culprit = obj.iter().filter(|(k, _)| *k != "method").find(|(k, val)| {
                let one =
                    Map::from_iter([("method".to_string(), obj["method"].clone()), (k.to_string(), (*val).clone())]);
                serde_json::from_value::<SteeringSpec>(Value::Object(one)).is_err()
            });
            let field = culprit.map(|(k, _)| format!("steering.{k}")).unwrap_or_else(|| "steering".into());
            ApiError::invalid(&field, format!("`{field}`: {e}"))
        })
        .map(Some)
}

fn reward_error(e: RewardError) -> ApiError {
    match e {
        RewardError::Invalid { field, message } => ApiError::invalid(&field, message),
        other => ApiError::invalid("reward", other.to_string()),
    }
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::wrong_type(key, "a string")),
    }
}

fn boolean(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::wrong_type(key, "a boolean")),
    }
}

fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None => Err(ApiError::invalid(key, format!("`{key}` must be a non-negative integer, got {n}"))),
        },
        Some(_) => Err(ApiError::wrong_type(key, "an integer")),
    }
}

fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::wrong_type(key, "a number")),
    }
}

fn parse_scheduler(s: &str) -> Result<SamplerKind, ApiError> {
    serde_json::from_value(Value::String(s.to_string())).map_err(|_| {
        ApiError::invalid(
            "scheduler",
            format!("Unknown scheduler `{s}`; expected one of: ddim, ddpm, euler, euler-ancestral, lcm"),
        )
    })
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
    match req.output_format.as_deref() {
        None | Some("png") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "output_format",
                format!("Unsupported output_format `{other}`; only `png` is supported"),
            ))
        }
    }
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
    if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
        return Err(ApiError::invalid(
            "size",
            format!(
                "`size` {width}x{height}: width and height must be positive multiples of {f} for model `{}`",
                model.name
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
            crate::error::TillerError::InvalidField { field, message } => {
                ApiError::invalid(&field, format!("`{field}`: {message}"))
            }
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
    };
    let adapters = check_adapters(req.adapters.as_deref().unwrap_or_default(), adapters)?;
    let steering =
        check_steering(req.steering.unwrap_or_default(), req.reward, req.trace, limits, model, rewards, &params)?;
    let partial_images = req.partial_images.unwrap_or(0) as usize;
    Ok(Validated { params, steering, adapters, random_seed, partial_images })
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
    spec.validate(&lim).map_err(|(field, message)| ApiError::invalid(&field, format!("`{field}` {message}")))?;
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
    if let (SteeringSpec::Reno(_), Some(r)) = (&spec, &reward) {
        if !r.differentiable() {
            return Err(ApiError::invalid(
                "reward",
                format!("ReNO needs a differentiable reward; `{}` is not (GET /v1/rewards says which are)", r.name()),
            ));
        }
    }
    if params.init_latents.is_some() && !matches!(spec, SteeringSpec::None | SteeringSpec::Reno(_)) {
        return Err(ApiError::invalid(
            "init_latents",
            format!("`init_latents` works with steering methods none and reno; `{method}` starts from many noises"),
        ));
    }
    let r = crate::steering::resolve(&model.info, params, &spec);
    // Other sampler problems are reported by the sampler checks.
    if let Ok(sampler) = crate::sampling::build_for(r.scheduler, &model.info.scheduler, r.steps, r.eta) {
        if let Err(e) = crate::steering::check_plan(&spec, sampler.as_ref(), limits.max_reno_steps) {
            let noise_field = if r.scheduler == SamplerKind::Ddim { "eta" } else { "scheduler" };
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
