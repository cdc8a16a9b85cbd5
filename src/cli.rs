//! The `tiller` command line: `serve`, `generate`, `models`, `openapi`, `shapes`, `eval`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, DTypeSpec, DeviceSpec};
use crate::error::{Result, TillerError};
use crate::pipeline::{GenerationParams, Progress};
use crate::sampling::SamplerKind;

#[derive(Debug, Parser)]
#[command(name = "tiller", version, about = "Inference server for diffusion image models")]
pub struct Cli {
    /// Log lines as text (default) or as one JSON object per line (for log collectors).
    #[arg(long, global = true, env = "TILLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate images from a prompt and write PNGs (and optionally latents).
    Generate(Box<GenerateArgs>),
    /// List the models under the models root.
    Models(ModelsArgs),
    /// Print the OpenAPI document (the committed openapi/openapi.json).
    Openapi,
    /// The shapes world (spec v1): `tiller shapes sample` writes sampled scenes.
    Shapes(crate::shapes::cli::ShapesArgs),
    /// Evaluate a model: `tiller eval shapes` scores it on the shapes world.
    Eval(crate::shapes::cli::EvalArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see tiller.example.toml).
    #[arg(long, env = "TILLER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Models root (overrides models.root).
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Listen address (overrides server.bind).
    #[arg(long, value_name = "HOST:PORT")]
    pub bind: Option<String>,
    /// Model used when a request names none (overrides models.default).
    #[arg(long, value_name = "NAME")]
    pub default_model: Option<String>,
    /// auto, cpu or cuda:N (overrides models.device).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
    /// f32, f16 or bf16 (overrides models.dtype; only f32 on CPU).
    #[arg(long)]
    pub dtype: Option<DTypeSpec>,
}

impl ServeArgs {
    /// Defaults < config file < TILLER_* environment < flags.
    pub fn config(&self) -> Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if let Some(d) = &self.models_dir {
            cfg.models.root = d.clone();
        }
        if let Some(b) = &self.bind {
            cfg.server.bind = b.clone();
        }
        if let Some(m) = &self.default_model {
            cfg.models.default = Some(m.clone());
        }
        if let Some(d) = self.device {
            cfg.models.device = d;
        }
        if let Some(d) = self.dtype {
            cfg.models.dtype = d;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Models root.
    #[arg(long, env = "TILLER_MODELS_DIR", default_value = "models", value_name = "DIR")]
    pub models_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory, or the name of one under --models-dir.
    #[arg(long, value_name = "DIR_OR_NAME")]
    pub model: String,
    /// Text prompt.
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt (the unconditional branch of classifier-free guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Sampler; default from the model's scheduler_config.json.
    #[arg(long)]
    pub scheduler: Option<SamplerKind>,
    /// Denoising steps; default 50 (4 for LCM, 1 for SD-Turbo).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; default 7.5 (8.5 for LCM, 0 for SD-Turbo).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// DDIM eta (0 = deterministic).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Seed; default random (printed). Image i uses seed + i.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Image width in pixels; default the model's.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels; default the model's.
    #[arg(long)]
    pub height: Option<usize>,
    /// Number of images.
    #[arg(short = 'n', long = "n", default_value_t = 1)]
    pub n: usize,
    /// safetensors file with the initial noise: an f32 tensor `latents` (n, C, H/f, W/f), or a
    /// file written by --save-latents (its `init_latents` is used, replaying that run).
    #[arg(long, value_name = "FILE")]
    pub init_latents: Option<PathBuf>,
    /// Write a safetensors file with `latents` (final latents), `image` (f32 NCHW in [0,1]) and
    /// `init_latents` (the initial noise).
    #[arg(long, value_name = "FILE")]
    pub save_latents: Option<PathBuf>,
    /// Image path; its extension picks the format (`.png`, `.jpg`/`.jpeg`, `.webp`; PNG
    /// otherwise, with the generation parameters in a `parameters` chunk). With -n > 1 the
    /// images are PATH_0.png, PATH_1.png, ... Default: output.png unless only --save-latents is
    /// given.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// JPEG quality, 1 to 100.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// Where model names are looked up.
    #[arg(long, env = "TILLER_MODELS_DIR", default_value = "models", value_name = "DIR")]
    pub models_dir: PathBuf,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceSpec,
    /// f32, f16 or bf16 (only f32 on CPU).
    #[arg(long, default_value = "f32")]
    pub dtype: DTypeSpec,
    /// Hide the progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub steer: SteerArgs,
    /// Print each image's steering trace (JSON, one line per image) on stdout.
    #[arg(long)]
    pub trace: bool,
}

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

/// Run `tiller generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    if args.n == 0 {
        return Err(TillerError::field("n", "must be at least 1"));
    }
    let (name, dir) = resolve_model_dir(&args.model, &args.models_dir)?;
    let device = args.device.open()?;
    let dtype = args.dtype.check_device(&device)?;
    let init_latents = match &args.init_latents {
        Some(p) => Some(crate::util::tensor_io::load_init_latents(p)?),
        None => None,
    };
    let adapters = load_loras(&args.steer.lora, &args.steer.adapters_dir)?;
    let model = with_adapters(&name, crate::models::loader::load_model(&name, &dir, &device, dtype)?, &adapters)?;
    let seed = args.seed.unwrap_or_else(|| rand::random::<u64>() >> 11);
    let params = GenerationParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        n: args.n,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance,
        scheduler: args.scheduler,
        eta: args.eta,
        seed,
        init_latents,
        edit: None,
    };
    let steering = steering_request(
        args.steer.steering.as_deref(),
        args.steer.reward.as_deref(),
        args.trace,
        args.steer.config.as_deref(),
        &args.models_dir,
        &device,
    )?;
    check_steering_plan(model.as_ref(), &params, &steering.spec, args.steer.config.as_deref())?;
    let resolved = crate::steering::resolve(model.info(), &params, &steering.spec);
    eprintln!(
        "model {name}: {}x{}, {} steps of {}, guidance {}, seed {seed}",
        resolved.width, resolved.height, resolved.steps, resolved.scheduler, resolved.guidance_scale
    );
    let bar = indicatif::ProgressBar::new(resolved.steps as u64);
    if args.quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed_precise} ({eta})")
    {
        bar.set_style(style);
    }
    let mut progress = |p: Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    };
    let gen = crate::steering::generate(model.as_ref(), &params, &steering, &mut progress).map_err(|e| match e {
        crate::pipeline::GenerationError::InvalidInput { field, message } => TillerError::field(field, message),
        other => TillerError::Other(anyhow::anyhow!("generation failed: {other}")),
    })?;
    bar.finish_and_clear();
    let out = &gen.steered;
    let t = &out.timings;
    eprintln!(
        "done ({}): {} denoiser evaluations, {} reward evaluations; encode {:.0} ms, denoise {:.0} ms, \
         reward {:.0} ms, decode {:.0} ms, other {:.0} ms{}",
        steering.spec.method(),
        out.denoiser_evals,
        out.reward_evals,
        t.encode_ms,
        t.denoise_ms,
        t.reward_ms,
        t.decode_ms,
        t.other_ms,
        if out.prompt_truncated { " (prompt truncated)" } else { "" }
    );
    let latents = candle_core::Tensor::cat(&out.images.iter().map(|i| i.latents.clone()).collect::<Vec<_>>(), 0)?;
    // The noise that replays each image: ReNO's optimised noise, else the run's own.
    let replay_noise = match out.images.iter().map(|i| i.optimized_noise.clone()).collect::<Option<Vec<_>>>() {
        Some(v) => Some(candle_core::Tensor::cat(&v, 0)?),
        None => out.init_latents.clone(),
    };
    for (i, img) in out.images.iter().enumerate() {
        if let Some(r) = img.reward {
            eprintln!("image {i} (seed {}): reward {r}", gen.seeds[i]);
        }
        if args.trace {
            let line = serde_json::json!({"image": i, "seed": gen.seeds[i], "reward": img.reward, "trace": img.trace});
            println!("{line}");
        }
    }
    if let Some(path) = &args.save_latents {
        use crate::util::tensor_io::{save_tensors, IMAGE, INIT_LATENTS, LATENTS};
        let mut tensors = vec![(LATENTS, &latents), (IMAGE, &out.decoded)];
        if let Some(n) = &replay_noise {
            tensors.push((INIT_LATENTS, n));
        }
        save_tensors(path, &tensors)?;
        eprintln!("wrote {}", path.display());
    }
    let output = match (&args.output, &args.save_latents) {
        (Some(p), _) => Some(p.clone()),
        (None, None) => Some(PathBuf::from("output.png")),
        (None, Some(_)) => None,
    };
    if let Some(path) = output {
        use crate::util::encode::{a1111_parameters, encode_batch_as, Encoding, GenerationInfo, OutputFormat};
        let format = OutputFormat::from_path(&path).unwrap_or_default();
        let spec_json = match &steering.spec {
            crate::steering::SteeringSpec::None => None,
            spec => serde_json::to_string(spec).ok(),
        };
        let parameters = |i: usize| {
            Some(a1111_parameters(&GenerationInfo {
                prompt: &params.prompt,
                negative_prompt: params.negative_prompt.as_deref(),
                steps: resolved.steps,
                sampler: resolved.scheduler,
                guidance_scale: resolved.guidance_scale,
                seed: gen.seeds[i],
                width: resolved.width,
                height: resolved.height,
                eta: resolved.eta,
                model: &name,
                adapters: adapters.items.iter().map(|(a, s)| (a.name.as_str(), *s)).collect(),
                steering: spec_json.clone(),
                reward: steering.reward.as_ref().map(|r| r.name()),
            }))
        };
        let files = encode_batch_as(&out.decoded, Encoding { format, quality: args.quality }, parameters)?;
        for (file, p) in files.iter().zip(crate::util::encode::numbered_paths(&path, files.len())) {
            std::fs::write(&p, file).map_err(|e| TillerError::file(&p, format!("cannot write: {e}")))?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// Run `tiller models`.
/// The checks of [`crate::steering::check_plan`] for a local run, with the config's ReNO step cap.
pub fn check_steering_plan(
    model: &dyn crate::models::DiffusionModel,
    params: &GenerationParams,
    spec: &crate::steering::SteeringSpec,
    config: Option<&Path>,
) -> Result<()> {
    let resolved = crate::steering::resolve(model.info(), params, spec);
    if let Ok(sampler) =
        crate::sampling::build_for(resolved.scheduler, &model.info().scheduler, resolved.steps, resolved.eta)
    {
        let max_reno_steps = Config::load(config)?.limits.max_reno_steps;
        crate::steering::check_plan(spec, sampler.as_ref(), max_reno_steps)
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
    spec.validate(&SteeringLimits::unlimited()).map_err(|(f, m)| TillerError::field(f, m))?;
    let to_err = |e: RewardError| match e {
        RewardError::Invalid { field, message } => TillerError::field(field, message),
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

pub fn list_models(args: &ModelsArgs) -> Result<()> {
    for (name, dir) in crate::models::loader::discover_models(&args.models_dir)? {
        println!("{name}\t{}", dir.display());
    }
    Ok(())
}
