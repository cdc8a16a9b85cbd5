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
    /// Stream scenes to stdout as fixed-size binary records, for training scripts.
    ///
    /// Record i (scene i of the seed): 1 byte category index (spec order), 1 byte caption length
    /// L, 94 bytes caption (UTF-8, first L bytes meaningful, zero-padded), then 64×64×3 bytes of
    /// RGB pixels, row-major: 12,384 bytes in all. Ends after --count records, or never.
    Stream(StreamArgs),
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Generator seed; record i is scene i of the seed (the same scene `sample` writes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// First scene index.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Number of records; unlimited when absent (the reader closes the pipe when done).
    #[arg(long)]
    pub count: Option<u64>,
}

/// Bytes of one `tiller shapes stream` record.
pub const STREAM_RECORD_BYTES: usize = 2 + STREAM_CAPTION_BYTES + (CANVAS * CANVAS * 3) as usize;
const STREAM_CAPTION_BYTES: usize = 94;

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Generator seed; scene i is stream i of the seed's ChaCha12 generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of scenes.
    #[arg(long, required_unless_present = "per_category", conflicts_with = "per_category")]
    pub count: Option<u64>,
    /// Write the evaluation scenes instead: N per category, exactly the captions `tiller eval
    /// shapes --seed` uses (seed 2026 there), so other implementations can be judged with
    /// `tiller eval shapes --images`.
    #[arg(long, value_name = "N")]
    pub per_category: Option<u64>,
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
    #[arg(long, value_name = "NAME_OR_DIR", required_unless_present_any = ["ground_truth", "images"])]
    pub model: Option<String>,
    /// Judge the renderer's own images instead of a model's (a sanity check: must score 1.0).
    #[arg(long, conflicts_with_all = ["model", "images"])]
    pub ground_truth: bool,
    /// Judge images made elsewhere: DIR/captions.jsonl lists `{"file", "caption", "category"?}`
    /// per image (the layout `tiller shapes sample` writes), files relative to DIR.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub images: Option<PathBuf>,
    /// Check the model's VAE instead of generating: encode and decode each evaluation scene,
    /// report the mean absolute error (on [0, 1]) and the evaluator's accuracy on the
    /// reconstructions.
    #[arg(long, requires = "model")]
    pub reconstruct: bool,
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
    /// DDIM η; default 0 (1 under FK and SVDD, which need noise).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Steering, reward and LoRA options as for `tiller generate`: e.g. `--lora shapes-lcm
    /// --scheduler lcm --steps 4 --guidance 1`, `--steering '{"method": "fk"}' --reward
    /// shapes_clip` (the report then gives each image's mean reward and the cost per image).
    #[command(flatten)]
    pub steer: crate::bootstrap::SteerArgs,
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
        ShapesCommand::Stream(a) => stream(a),
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
    let png = crate::util::encode::encode_rgb(img.as_raw(), img.width(), img.height())?;
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
    let scenes: Box<dyn Iterator<Item = Scene>> = match (args.count, args.per_category) {
        (_, Some(n)) => Box::new(eval_scenes(args.seed, n).into_iter()),
        (Some(count), None) => Box::new((0..count).map(|i| sample_scene(args.seed, i))),
        (None, None) => return Err(TillerError::field("count", "give --count or --per-category")),
    };
    let mut written = 0u64;
    for (i, scene) in scenes.enumerate() {
        written += 1;
        let file = format!("{i:06}.png");
        write_png(&args.out.join(&file), &scene.render())?;
        let mut v = scene.to_json();
        v["file"] = file.into();
        v["index"] = i.into();
        lines.write(&v)?;
    }
    lines.finish()?;
    eprintln!("wrote {} scenes (shapes world v{SPEC_VERSION}, seed {}) to {}", written, args.seed, args.out.display());
    Ok(())
}

/// One scene as a `tiller shapes stream` record.
pub fn stream_record(scene: &Scene) -> Vec<u8> {
    let caption = &scene.caption;
    let bytes = caption.as_bytes();
    assert!(bytes.len() <= STREAM_CAPTION_BYTES, "caption longer than a stream record holds");
    let mut out = Vec::with_capacity(STREAM_RECORD_BYTES);
    out.push(scene.category().index() as u8);
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
    out.resize(2 + STREAM_CAPTION_BYTES, 0);
    out.extend_from_slice(scene.render().as_raw());
    out
}

/// `tiller shapes stream`: records to stdout until `count` or a closed pipe.
pub fn stream(args: &StreamArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let end = args.count.map(|c| args.start + c).unwrap_or(u64::MAX);
    for i in args.start..end {
        if let Err(e) = out.write_all(&stream_record(&sample_scene(args.seed, i))) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(TillerError::Other(anyhow::anyhow!("writing to stdout: {e}")));
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(TillerError::Other(anyhow::anyhow!("writing to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// `tiller eval shapes --reconstruct`: the VAE round trip of the evaluation scenes.
fn reconstruct(args: &EvalShapesArgs, scenes: &[Scene]) -> Result<()> {
    let m = args.model.as_deref().ok_or_else(|| TillerError::field("model", "--reconstruct needs --model"))?;
    let (name, dir) = crate::bootstrap::resolve_model_dir(m, &args.models_dir)?;
    let device = args.device.open()?;
    let dtype = args.dtype.check_device(&device)?;
    let opts =
        crate::models::stable_diffusion::LoadOptions { dtype, device: device.clone(), variant: None, clip_skip: 0 };
    let model = crate::models::stable_diffusion::StableDiffusion::load(&name, &dir, &opts)?;
    eprintln!("model {name}: VAE round trip of {} evaluation scenes (seed {})", scenes.len(), args.seed);
    let r = super::roundtrip::vae_round_trip(model.vae(), scenes, &device, 32)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).map_err(anyhow::Error::from)?);
    } else {
        println!("{}", r.report.table());
        println!(
            "mean absolute error {:.4} (worst scene {:.4}); detections match on {}/{} reconstructions ({:.1} %)",
            r.mae,
            r.max_scene_mae,
            r.detections_match,
            r.scenes,
            100.0 * r.match_rate
        );
    }
    Ok(())
}

/// An image at the canvas size the evaluator judges (nearest-neighbour resize when it differs).
fn to_canvas(img: image::RgbImage) -> image::RgbImage {
    if img.dimensions() == (CANVAS, CANVAS) {
        img
    } else {
        image::imageops::resize(&img, CANVAS, CANVAS, image::imageops::FilterType::Nearest)
    }
}

/// `tiller eval shapes --images DIR`: judge saved images against their captions.
fn judge_images(dir: &Path, json: bool) -> Result<()> {
    let list = dir.join("captions.jsonl");
    let text = std::fs::read_to_string(&list).map_err(|e| TillerError::file(&list, format!("cannot read: {e}")))?;
    let mut outcomes = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |m: String| TillerError::file(&list, format!("line {}: {m}", n + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let (Some(file), Some(caption)) = (v["file"].as_str(), v["caption"].as_str()) else {
            return Err(bad("needs string fields `file` and `caption`".into()));
        };
        let path = dir.join(file);
        let img =
            image::open(&path).map_err(|e| TillerError::file(&path, format!("cannot read image: {e}")))?.to_rgb8();
        let img = to_canvas(img);
        let j = judge(caption, &img);
        let sampled = v["category"].as_str().and_then(Category::from_name);
        outcomes.push((j.category.map(|c| sampled.unwrap_or(c)), j.correct));
    }
    eprintln!("judged {} images listed in {}", outcomes.len(), list.display());
    let report = Report::from_outcomes(outcomes);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?);
    } else {
        println!("{}", report.table());
    }
    Ok(())
}

/// The evaluation captions: `per_category` scenes of each category, in the spec's category
/// order, from the evaluation sampler of `seed`.
pub fn eval_scenes(seed: u64, per_category: u64) -> Vec<Scene> {
    Category::ALL.iter().flat_map(|&c| (0..per_category).map(move |i| sample_scene_of(seed, c, i))).collect()
}

/// `tiller eval shapes`.
pub fn eval_shapes(args: &EvalShapesArgs) -> Result<()> {
    if let Some(dir) = &args.images {
        return judge_images(dir, args.json);
    }
    if args.per_category == 0 {
        return Err(TillerError::field("per-category", "must be at least 1"));
    }
    let scenes = eval_scenes(args.seed, args.per_category);
    if args.reconstruct {
        return reconstruct(args, &scenes);
    }
    let model = match (&args.model, args.ground_truth) {
        (Some(m), false) => {
            let (name, dir) = crate::bootstrap::resolve_model_dir(m, &args.models_dir)?;
            let device = args.device.open()?;
            let dtype = args.dtype.check_device(&device)?;
            let model = crate::bootstrap::load_with_loras(
                &name,
                &dir,
                &device,
                dtype,
                &args.steer.lora,
                &args.steer.adapters_dir,
            )?;
            let (h, w) = model.info().default_size;
            let probe = params(args, String::new(), args.seed);
            let r = crate::pipeline::resolve_for(model.info(), &probe);
            eprintln!(
                "model {name}: {w}x{h}, {} steps of {}, guidance {}, seed {}; {} captions",
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
    let steering = match &model {
        Some(m) => {
            let req = crate::bootstrap::steering_request(
                args.steer.steering.as_deref(),
                args.steer.reward.as_deref(),
                false,
                args.steer.config.as_deref(),
                &args.models_dir,
                m.device(),
            )?;
            let probe = params(args, String::new(), args.seed);
            crate::bootstrap::check_steering_plan(m.as_ref(), &probe, &req.spec, args.steer.config.as_deref())?;
            req
        }
        None => Default::default(),
    };
    let bar = progress_bar(scenes.len() as u64, args.quiet);
    let mut outcomes = Vec::with_capacity(scenes.len());
    let mut counters = [0u64; 5];
    let mut cost = Cost::default();
    let started = std::time::Instant::now();
    for (k, scene) in scenes.iter().enumerate() {
        let seed = args.seed.wrapping_add(k as u64);
        let mut reward = None;
        let img = match &model {
            None => scene.render(),
            Some(m) => {
                let p = params(args, scene.caption.clone(), seed);
                let out = crate::steering::generate(m.as_ref(), &p, &steering, &mut |_: Progress| true).map_err(
                    |e| match e {
                        crate::pipeline::GenerationError::InvalidInput(f) => TillerError::InvalidField(f),
                        other => TillerError::Other(anyhow::anyhow!("generation failed: {other}")),
                    },
                )?;
                let st = &out.steered;
                cost.add(st);
                reward = st.images[0].reward;
                to_canvas(tensor_to_image(&st.decoded.get(0)?)?)
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
                "correct": j.correct, "reason": j.reason, "detected": j.detected, "reward": reward,
            }))?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = Report::from_outcomes(outcomes);
    let mut value = report.to_json();
    if model.is_some() {
        let images = scenes.len() as f64;
        value["cost"] = cost.per_image(images, started.elapsed().as_secs_f64());
        value["steering"] = serde_json::to_value(&steering.spec).unwrap_or_default();
        value["reward"] = steering.reward.as_ref().map(|r| r.name().to_string()).into();
    }
    let json = serde_json::to_string_pretty(&value).map_err(anyhow::Error::from)?;
    if let (Some(lines), Some(dir)) = (saved, &args.out) {
        lines.finish()?;
        let p = dir.join("report.json");
        std::fs::write(&p, &json).map_err(|e| TillerError::file(&p, format!("cannot write: {e}")))?;
        eprintln!("wrote {} images, results.jsonl and report.json to {}", scenes.len(), dir.display());
    }
    if args.json {
        println!("{json}");
    } else {
        println!("{}", report.table());
        if model.is_some() {
            println!("{}", cost.line(scenes.len() as f64, started.elapsed().as_secs_f64()));
        }
    }
    Ok(())
}

/// What an evaluation spent, summed over its images.
#[derive(Debug, Default)]
struct Cost {
    denoiser_evals: usize,
    reward_evals: usize,
    backward_evals: usize,
    reward_sum: f64,
    rewarded: usize,
}

impl Cost {
    fn add(&mut self, s: &crate::steering::Steered) {
        self.denoiser_evals += s.denoiser_evals;
        self.reward_evals += s.reward_evals;
        self.backward_evals += s.backward_evals;
        for r in s.images.iter().filter_map(|i| i.reward) {
            self.reward_sum += r as f64;
            self.rewarded += 1;
        }
    }

    fn mean_reward(&self) -> Option<f64> {
        (self.rewarded > 0).then(|| self.reward_sum / self.rewarded as f64)
    }

    fn per_image(&self, images: f64, seconds: f64) -> serde_json::Value {
        serde_json::json!({
            "denoiser_evals_per_image": self.denoiser_evals as f64 / images,
            "reward_evals_per_image": self.reward_evals as f64 / images,
            "backward_evals_per_image": self.backward_evals as f64 / images,
            "mean_reward": self.mean_reward(),
            "seconds": seconds,
            "seconds_per_image": seconds / images,
        })
    }

    fn line(&self, images: f64, seconds: f64) -> String {
        let reward = self.mean_reward().map(|r| format!(", mean reward {r:.3}")).unwrap_or_default();
        format!(
            "per image: {:.0} denoiser evaluations, {:.1} reward evaluations, {:.0} backward; {:.2} s{reward}",
            self.denoiser_evals as f64 / images,
            self.reward_evals as f64 / images,
            self.backward_evals as f64 / images,
            seconds / images
        )
    }
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
        eta: args.eta,
        seed,
        init_latents: None,
        edit: None,
    }
}
