//! `tiller shapes sample` (write sampled scenes) and `tiller eval shapes` (score a model, or the
//! renderer itself, with the shapes-world evaluator).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::eval::{judge, Report};
use super::world::{sample_scene, sample_scene_of, tensor_to_image, Category, Scene, CANVAS, SPEC_VERSION};
use crate::config::{DTypeSpec, DeviceSpec};
use crate::error::{Result, TillerError};
use crate::pipeline::{GenerationParams, Progress};
use crate::sampling::SamplerKind;

#[derive(Debug, Args)]
pub struct ShapesArgs {
    #[command(subcommand)]
    pub command: ShapesCommand,
}

#[derive(Debug, Subcommand)]
pub enum ShapesCommand {
    /// Write sampled scenes of the shapes world: N PNGs (64×64) and captions.jsonl.
    Sample(SampleArgs),
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Generator seed; scene i is stream i of the seed's ChaCha12 generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of scenes.
    #[arg(long)]
    pub count: u64,
    /// Output directory (created): 000000.png, ... and captions.jsonl.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Score a text-to-image model on the shapes world (spec v1): per-category and mean accuracy.
    Shapes(Box<EvalShapesArgs>),
}

#[derive(Debug, Args)]
pub struct EvalShapesArgs {
    /// Model directory, or the name of one under --models-dir.
    #[arg(long, value_name = "NAME_OR_DIR", required_unless_present = "ground_truth")]
    pub model: Option<String>,
    /// Judge the renderer's own images instead of a model's (a sanity check: must score 1.0).
    #[arg(long, conflicts_with = "model")]
    pub ground_truth: bool,
    /// Evaluation captions per category.
    #[arg(long, default_value_t = 50)]
    pub per_category: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Sampler.
    #[arg(long, default_value = "ddim")]
    pub scheduler: SamplerKind,
    /// Classifier-free guidance scale; default the model's.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Evaluation seed: captions are drawn from it, and caption k (in category order) is generated
    /// with noise seed `seed + k`.
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Save each judged image (64×64 PNG) with results.jsonl and report.json here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
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
}

/// Run `tiller shapes ...`.
pub fn run_shapes(args: &ShapesArgs) -> Result<()> {
    match &args.command {
        ShapesCommand::Sample(a) => sample(a),
    }
}

/// Run `tiller eval ...`.
pub fn run_eval(args: &EvalArgs) -> Result<()> {
    match &args.command {
        EvalCommand::Shapes(a) => eval_shapes(a),
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TillerError::file(dir, format!("cannot create: {e}")))
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    let png = crate::util::png::encode_rgb(img.as_raw(), img.width(), img.height())?;
    std::fs::write(path, png).map_err(|e| TillerError::file(path, format!("cannot write: {e}")))
}

fn progress_bar(len: u64, quiet: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images {elapsed_precise} ({eta})")
    {
        bar.set_style(style);
    }
    bar
}

struct Lines {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Lines {
    fn create(path: PathBuf) -> Result<Self> {
        let f = std::fs::File::create(&path).map_err(|e| TillerError::file(&path, format!("cannot create: {e}")))?;
        Ok(Self { path, file: std::io::BufWriter::new(f) })
    }
    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| TillerError::file(&self.path, format!("cannot write: {e}")))
    }
    fn finish(mut self) -> Result<()> {
        self.file.flush().map_err(|e| TillerError::file(&self.path, format!("cannot write: {e}")))
    }
}

/// `tiller shapes sample`: scene i of `seed` as `{i:06}.png`, and one line of captions.jsonl
/// per scene: `{"file", "index", "caption", "category", "objects": [{color, shape, size, x, y,
/// center}], "relation"?}` (x, y: top-left corner of the box).
pub fn sample(args: &SampleArgs) -> Result<()> {
    create_dir(&args.out)?;
    let mut lines = Lines::create(args.out.join("captions.jsonl"))?;
    for i in 0..args.count {
        let scene = sample_scene(args.seed, i);
        let file = format!("{i:06}.png");
        write_png(&args.out.join(&file), &scene.render())?;
        let mut v = scene.to_json();
        v["file"] = file.into();
        v["index"] = i.into();
        lines.write(&v)?;
    }
    lines.finish()?;
    eprintln!(
        "wrote {} scenes (shapes world v{SPEC_VERSION}, seed {}) to {}",
        args.count,
        args.seed,
        args.out.display()
    );
    Ok(())
}

/// The evaluation captions: `per_category` scenes of each category, in the spec's category
/// order, from the evaluation sampler of `seed`.
pub fn eval_scenes(seed: u64, per_category: u64) -> Vec<Scene> {
    Category::ALL.iter().flat_map(|&c| (0..per_category).map(move |i| sample_scene_of(seed, c, i))).collect()
}

/// `tiller eval shapes`.
pub fn eval_shapes(args: &EvalShapesArgs) -> Result<()> {
    if args.per_category == 0 {
        return Err(TillerError::field("per-category", "must be at least 1"));
    }
    let scenes = eval_scenes(args.seed, args.per_category);
    let model = match (&args.model, args.ground_truth) {
        (Some(m), false) => {
            let (name, dir) = crate::cli::resolve_model_dir(m, &args.models_dir)?;
            let device = args.device.open()?;
            let dtype = args.dtype.check_device(&device)?;
            let model = crate::models::loader::load_model(&name, &dir, &device, dtype)?;
            let (h, w) = model.info().default_size;
            let probe = params(args, String::new(), args.seed);
            let r = crate::pipeline::resolve_for(model.info(), &probe);
            eprintln!(
                "model {name}: {w}x{h}, {} steps of {:?}, guidance {}, seed {}; {} captions",
                r.steps,
                r.scheduler,
                r.guidance_scale,
                args.seed,
                scenes.len()
            );
            if (h, w) != (CANVAS as usize, CANVAS as usize) {
                eprintln!("note: the model's default size is {w}x{h}; images are resized to 64x64 (nearest neighbour) before judging");
            }
            Some(model)
        }
        (None, true) => {
            eprintln!("ground truth: judging the renderer's own images, {} captions, seed {}", scenes.len(), args.seed);
            None
        }
        _ => return Err(TillerError::field("model", "give --model or --ground-truth")),
    };
    let mut saved = match &args.out {
        Some(dir) => {
            create_dir(dir)?;
            Some(Lines::create(dir.join("results.jsonl"))?)
        }
        None => None,
    };
    let bar = progress_bar(scenes.len() as u64, args.quiet);
    let mut outcomes = Vec::with_capacity(scenes.len());
    let mut counters = [0u64; 5];
    for (k, scene) in scenes.iter().enumerate() {
        let seed = args.seed.wrapping_add(k as u64);
        let img = match &model {
            None => scene.render(),
            Some(m) => {
                let p = params(args, scene.caption.clone(), seed);
                let out = crate::pipeline::generate(m.as_ref(), &p, &mut |_: Progress| true).map_err(|e| match e {
                    crate::pipeline::GenerationError::InvalidInput { field, message } => {
                        TillerError::field(field, message)
                    }
                    other => TillerError::Other(anyhow::anyhow!("generation failed: {other}")),
                })?;
                let img = tensor_to_image(&out.images.get(0)?)?;
                if img.dimensions() == (CANVAS, CANVAS) {
                    img
                } else {
                    image::imageops::resize(&img, CANVAS, CANVAS, image::imageops::FilterType::Nearest)
                }
            }
        };
        let cat = scene.category();
        let j = judge(&scene.caption, &img);
        // The sampler's category, not the parser's (a same-shape two_objects caption reads as colors).
        outcomes.push((j.category.map(|_| cat), j.correct));
        if let (Some(lines), Some(dir)) = (saved.as_mut(), &args.out) {
            let i = counters[cat.index()];
            counters[cat.index()] += 1;
            let file = format!("{}_{i:04}.png", cat.name());
            write_png(&dir.join(&file), &img)?;
            lines.write(&serde_json::json!({
                "file": file, "caption": scene.caption, "category": cat, "seed": seed,
                "correct": j.correct, "reason": j.reason, "detected": j.detected,
            }))?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = Report::from_outcomes(outcomes);
    let json = serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?;
    if let (Some(lines), Some(dir)) = (saved, &args.out) {
        lines.finish()?;
        let p = dir.join("report.json");
        std::fs::write(&p, &json).map_err(|e| TillerError::file(&p, format!("cannot write: {e}")))?;
        eprintln!("wrote {} images, results.jsonl and report.json to {}", scenes.len(), dir.display());
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn params(args: &EvalShapesArgs, prompt: String, seed: u64) -> GenerationParams {
    GenerationParams {
        prompt,
        negative_prompt: None,
        n: 1,
        width: None,
        height: None,
        steps: Some(args.steps),
        guidance_scale: args.guidance,
        scheduler: Some(args.scheduler),
        eta: None,
        seed,
        init_latents: None,
    }
}
