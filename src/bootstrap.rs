//! What the commands that run a model locally share (`tiller generate`, `tiller eval shapes`):
//! finding the model directory, loading it with `--lora` adapters merged, and turning
//! `--steering` / `--reward` into the same checked request the HTTP API builds. The command
//! modules import this one; it imports none of them.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::Config;
use crate::error::{Result, TillerError};
use crate::pipeline::GenerationParams;

/// Steering, reward and LoRA options of `tiller generate` and `tiller eval shapes`.
#[derive(Debug, Args)]
pub struct SteerArgs {
    /// Steering strategy as JSON, as in the HTTP request's `steering`, e.g.
    /// '{"method": "fk", "particles": 8, "beta": 4}'.
    #[arg(long, value_name = "JSON")]
    pub steering: Option<String>,
    /// Reward as JSON, as in the HTTP request's `reward`: '"brightness"',
    /// '{"name": "color", "target": [1, 0, 0]}' or a list of weighted terms.
    #[arg(long, value_name = "JSON")]
    pub reward: Option<String>,
    /// Config file whose `[rewards.*]` tables define named rewards (CLIP, http, ...).
    #[arg(long, env = "TILLER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// LoRA adapter to apply (repeatable): a .safetensors file, a PEFT/diffusers directory, or
    /// the name of one under --adapters-dir, with an optional weight after the last `:`
    /// (default 1; e.g. `--lora pixel-art:0.8`). The adapters are merged into the weights.
    #[arg(long = "lora", value_name = "PATH_OR_NAME[:SCALE]")]
    pub lora: Vec<String>,
    /// Where --lora names are looked up (`NAME.safetensors` or `NAME/`).
    #[arg(long, default_value = "adapters", value_name = "DIR")]
    pub adapters_dir: PathBuf,
}

/// Files that make a directory a LoRA adapter (PEFT and diffusers layouts).
const ADAPTER_DIR_FILES: [&str; 2] = ["adapter_model.safetensors", "pytorch_lora_weights.safetensors"];

/// Split a `--lora` argument into the adapter and its scale: the text after the last `:` is the
/// scale when it parses as a number (paths may contain `:`).
pub fn split_lora_arg(arg: &str) -> (&str, Option<f64>) {
    match arg.rsplit_once(':') {
        Some((head, tail)) if !head.is_empty() => match tail.trim().parse::<f64>() {
            Ok(scale) => (head, Some(scale)),
            Err(_) => (arg, None),
        },
        _ => (arg, None),
    }
}

/// The LoRA file a `--lora` adapter names, and the adapter's name: an existing file or
/// directory, else `NAME.safetensors` or `NAME/` under `adapters_dir`.
pub fn resolve_lora(spec: &str, adapters_dir: &Path) -> Result<(String, PathBuf)> {
    let in_dir = |d: &Path| ADAPTER_DIR_FILES.iter().map(|f| d.join(f)).find(|f| f.is_file());
    let named = |p: &Path, file: PathBuf| -> (String, PathBuf) {
        let name = if p.is_dir() { p.file_name() } else { p.file_stem() };
        (name.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string()), file)
    };
    let as_path = Path::new(spec);
    if as_path.is_file() {
        return Ok(named(as_path, as_path.to_path_buf()));
    }
    if as_path.is_dir() {
        return in_dir(as_path).map(|f| named(as_path, f)).ok_or_else(|| {
            TillerError::field("lora", format!("directory {spec} holds no {}", ADAPTER_DIR_FILES.join(" or ")))
        });
    }
    let file = adapters_dir.join(format!("{spec}.safetensors"));
    if file.is_file() {
        return Ok((spec.to_string(), file));
    }
    let dir = adapters_dir.join(spec);
    if let Some(f) = dir.is_dir().then(|| in_dir(&dir)).flatten() {
        return Ok((spec.to_string(), f));
    }
    let known: Vec<String> = std::fs::read_dir(adapters_dir)
        .map(|rd| {
            let mut v: Vec<String> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || in_dir(p).is_some())
                .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    Err(TillerError::field(
        "lora",
        format!(
            "`{spec}` is not a LoRA file or directory, nor an adapter under {} (known: {})",
            adapters_dir.display(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ),
    ))
}

/// Load the `--lora` adapters with their scales.
pub fn load_loras(args: &[String], adapters_dir: &Path) -> Result<crate::adapters::AdapterSet> {
    use crate::api::validate::MAX_ADAPTER_SCALE;
    let mut set = crate::adapters::AdapterSet::default();
    let mut seen: Vec<(String, PathBuf)> = Vec::new();
    for arg in args {
        let (spec, scale) = split_lora_arg(arg);
        // A path that itself ends in `:<number>` wins over the split.
        let ((name, file), scale) = match resolve_lora(spec, adapters_dir) {
            Ok(r) => (r, scale.unwrap_or(1.0)),
            Err(e) if spec != arg.as_str() => match resolve_lora(arg, adapters_dir) {
                Ok(r) => (r, 1.0),
                Err(_) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        if !scale.is_finite() || scale.abs() > MAX_ADAPTER_SCALE {
            return Err(TillerError::field(
                "lora",
                format!("{arg}: the scale must be between -{MAX_ADAPTER_SCALE} and {MAX_ADAPTER_SCALE}, got {scale}"),
            ));
        }
        let canon = file.canonicalize().unwrap_or_else(|_| file.clone());
        if let Some((prev, _)) = seen.iter().find(|(n, p)| *n == name || *p == canon) {
            return Err(TillerError::field("lora", format!("{arg}: adapter `{prev}` is given twice")));
        }
        seen.push((name.clone(), canon));
        let adapter = crate::adapters::Adapter::load(&name, &file)
            .map_err(|e| TillerError::field("lora", format!("{}: {e}", file.display())))?;
        set.items.push((std::sync::Arc::new(adapter), scale));
    }
    Ok(set)
}

/// A model argument: an existing directory, or a name under `models_dir`.
pub fn resolve_model_dir(model: &str, models_dir: &Path) -> Result<(String, PathBuf)> {
    let is_model = |d: &Path| {
        d.join("model_index.json").is_file() || d.join(crate::models::gaussian_mixture::CONFIG_FILE).is_file()
    };
    let as_path = PathBuf::from(model);
    let dir = if is_model(&as_path) {
        as_path
    } else {
        let under = models_dir.join(model);
        if is_model(&under) {
            under
        } else {
            let known = crate::models::loader::discover_models(models_dir)
                .map(|v| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            return Err(TillerError::ModelNotFound(format!(
                "{model}` (not a model directory, nor a model under {}; known: {}",
                models_dir.display(),
                if known.is_empty() { "none".to_string() } else { known }
            )));
        }
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| model.to_string());
    Ok((name, dir))
}

/// Load a model and merge the `--lora` adapters into it (reported on stderr).
pub fn load_with_loras(
    name: &str,
    dir: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    lora: &[String],
    adapters_dir: &Path,
) -> Result<std::sync::Arc<dyn crate::models::DiffusionModel>> {
    let adapters = load_loras(lora, adapters_dir)?;
    with_adapters(name, crate::models::loader::load_model(name, dir, device, dtype)?, &adapters)
}

/// `model` with `adapters` merged into its weights (the model itself when there are none).
pub fn with_adapters(
    name: &str,
    model: std::sync::Arc<dyn crate::models::DiffusionModel>,
    adapters: &crate::adapters::AdapterSet,
) -> Result<std::sync::Arc<dyn crate::models::DiffusionModel>> {
    if adapters.is_empty() {
        return Ok(model);
    }
    use crate::adapters::registry::{MergePolicy, VariantCache};
    let (variant, info) = VariantCache::new(usize::MAX, MergePolicy::Always, false)
        .get(name, &model, adapters)
        .map_err(|e| TillerError::field("lora", e.to_string()))?;
    let list: Vec<String> = adapters
        .items
        .iter()
        .map(|(a, s)| format!("{} ×{s} ({:?}, {} modules)", a.name, a.file.format, a.file.layers.len()))
        .collect();
    eprintln!("adapters: {}; merged in {:.0} ms", list.join(", "), info.map(|i| i.build_ms).unwrap_or_default());
    Ok(variant)
}

/// The checks of [`crate::steering::check_plan`] for a local run, with the config's ReNO step cap.
pub fn check_steering_plan(
    model: &dyn crate::models::DiffusionModel,
    params: &GenerationParams,
    spec: &crate::steering::SteeringSpec,
    config: Option<&Path>,
) -> Result<()> {
    let resolved = crate::steering::resolve(model.info(), params, spec);
    if let Ok(sampler) = model.info().sampler(&resolved) {
        let max_reno_steps = Config::load(config)?.limits.max_reno_steps;
        crate::steering::check_plan(spec, sampler.as_ref(), model.info().scheduler.family(), max_reno_steps)
            .map_err(|e| TillerError::field(e.field("scheduler"), e.to_string()))?;
    }
    Ok(())
}

/// Parse `--steering` / `--reward` and build the reward from the built-ins, the rewards shipped
/// under the models directory and the config's `[rewards.*]`, with the same checks as the HTTP
/// API.
pub fn steering_request(
    steering: Option<&str>,
    reward: Option<&str>,
    trace: bool,
    config: Option<&Path>,
    models_dir: &Path,
    device: &candle_core::Device,
) -> Result<crate::steering::SteeringRequest> {
    use crate::reward::{RewardError, RewardRegistry, RewardSpec};
    use crate::steering::{SteeringLimits, SteeringSpec};
    let spec: SteeringSpec = match steering {
        // The HTTP API's parser, so that errors name the field the same way.
        Some(j) => crate::util::json::parse_as_field("steering", j.as_bytes())
            .map_err(|e| TillerError::Other(anyhow::anyhow!("--steering: {}", e.message)))?,
        None => SteeringSpec::None,
    };
    spec.validate(&SteeringLimits::unlimited())?;
    let to_err = |e: RewardError| match e {
        RewardError::Invalid(f) => TillerError::InvalidField(f),
        other => TillerError::field("reward", other.to_string()),
    };
    let reward = match reward {
        Some(j) => {
            // A bare name needs no JSON quotes.
            let json = if serde_json::from_str::<serde_json::Value>(j).is_ok() {
                j.to_string()
            } else {
                serde_json::Value::String(j.to_string()).to_string()
            };
            let spec: RewardSpec = crate::util::json::parse_as_field("reward", json.as_bytes())
                .map_err(|e| TillerError::Other(anyhow::anyhow!("--reward: {}", e.message)))?;
            let cfg = Config::load(config)?;
            let configs = crate::reward::registry::with_shipped(&cfg.rewards, models_dir);
            Some(RewardRegistry::new(&configs, device)?.build(&spec).map_err(to_err)?)
        }
        None => None,
    };
    Ok(crate::steering::SteeringRequest { spec, reward, trace })
}
