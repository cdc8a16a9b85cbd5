//! The `tiller` command line: `serve`, `generate`, `models`, `openapi`, `shapes`, `eval`.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bootstrap::{
    check_steering_plan, load_loras, resolve_model_dir, steering_request, with_adapters, SteerArgs,
};
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
    /// A/B experiments offline: `tiller experiment run` runs prompts through every arm.
    Experiment(crate::experiments::offline::ExperimentArgs),
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
    /// Directory of the embedded experiments database (overrides storage.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
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
        if let Some(d) = &self.data_dir {
            cfg.storage.data_dir = d.clone();
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
    if args.guidance.is_some() && ignores_guidance(model.as_ref())? {
        eprintln!(
            "note: model {name} takes no guidance (a guidance-distilled model such as FLUX.1-schnell); --guidance is \
             ignored"
        );
    }
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
        crate::pipeline::GenerationError::InvalidInput(f) => TillerError::InvalidField(f),
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
pub fn list_models(args: &ModelsArgs) -> Result<()> {
    for (name, dir) in crate::models::loader::discover_models(&args.models_dir)? {
        println!("{name}\t{}", dir.display());
    }
    Ok(())
}

/// A model that neither runs classifier-free guidance nor embeds the scale (FLUX.1-schnell).
fn ignores_guidance(model: &dyn crate::models::DiffusionModel) -> candle_core::Result<bool> {
    Ok(model.info().guidance_embedding && model.guidance_embedding(1.0, 1)?.is_none())
}
