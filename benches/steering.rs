//! Reward versus denoiser evaluations (NFE) for every steering strategy, and the share of wall
//! time spent outside denoiser calls.
//!
//! Two models:
//! * `gmm`: the shipped analytic Gaussian mixture (`models/toy-gmm`, 3×8×8) with `brightness`,
//!   DDIM η = 1, 50 steps; exact tilted-target numbers are printed for reference. Its denoiser is
//!   a closed-form posterior mean and nearly free, so its time shares say little.
//! * `sd-fixture`: the tiny SD 1.5 fixture (DDIM η = 1, 20 steps, CFG 7.5) for the population
//!   methods and the tiny SD-Turbo fixture (1-step Euler, no CFG) for ReNO, with `brightness`
//!   and `jpeg_compressibility` (not ReNO: not differentiable).
//!
//! Every row's reward is compared with the `none` row of the same model and sampler measured in
//! the same run. `cargo bench --bench steering` prints one markdown table per model and reward
//! and writes `target/bench-steering/results.json`. Arguments (after `--`) or env vars:
//! `quick` / `TILLER_BENCH_QUICK=1` for a smoke run; `gmm` or `sd` to run one model only;
//! `TILLER_BENCH_REPS` repetitions per GMM row (median wall time; default 3).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::{json, Value};
use tiller::models::gaussian_mixture::GaussianMixtureModel;
use tiller::models::DiffusionModel;
use tiller::reward::brightness::Brightness;
use tiller::reward::jpeg::JpegReward;
use tiller::reward::Reward;
use tiller::sampling::{build_sampler, Sampler, SamplerKind, TimestepSpacing};
use tiller::steering::best_of_n::BestOfNSpec;
use tiller::steering::fk::{FkSpec, Potential, ResampleSchedule, Select};
use tiller::steering::reno::RenoSpec;
use tiller::steering::svdd::SvddSpec;
use tiller::steering::{run, PhaseTimings, Resampler, SteerContext, Steered, SteeringSpec};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Sizes of one bench run.
struct Plan {
    quick: bool,
    reps: usize,
    gmm_images: usize,
    gmm_steps: usize,
    gmm_k: Vec<usize>,
    sd_images: usize,
    sd_steps: usize,
    sd_k: Vec<usize>,
    sd_jpeg_k: Vec<usize>,
    reno_iters: Vec<usize>,
    sd_reno_iters: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let reps = std::env::var("TILLER_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3usize).max(1);
        if quick {
            Self {
                quick,
                reps: 1,
                gmm_images: 8,
                gmm_steps: 10,
                gmm_k: vec![4],
                sd_images: 2,
                sd_steps: 4,
                sd_k: vec![2],
                sd_jpeg_k: vec![2],
                reno_iters: vec![3],
                sd_reno_iters: vec![2],
            }
        } else {
            Self {
                quick,
                reps,
                gmm_images: 64,
                gmm_steps: 50,
                gmm_k: vec![4, 16],
                sd_images: 8,
                sd_steps: 20,
                sd_k: vec![2, 4],
                sd_jpeg_k: vec![4],
                reno_iters: vec![10, 30],
                sd_reno_iters: vec![10, 30],
            }
        }
    }
}

/// One configuration to measure: a label, the strategy, and the label of its baseline row.
struct Case {
    label: String,
    spec: SteeringSpec,
    baseline: &'static str,
}

fn case(label: impl Into<String>, spec: SteeringSpec, baseline: &'static str) -> Case {
    Case { label: label.into(), spec, baseline }
}

fn fk(k: usize, potential: Potential, beta: f64, select: Select) -> SteeringSpec {
    SteeringSpec::Fk(FkSpec {
        particles: k,
        potential,
        beta,
        resample: ResampleSchedule::default(),
        resampler: Resampler::Systematic,
        ess_threshold: None,
        select,
    })
}

/// The population methods (everything but ReNO) with sizes from `ks`.
fn population_cases(ks: &[usize]) -> Vec<Case> {
    let mut cases = vec![case("none", SteeringSpec::None, "none")];
    for &k in ks {
        cases.push(case(format!("best_of_n N={k}"), SteeringSpec::BestOfN(BestOfNSpec { n: k }), "none"));
    }
    for &k in ks {
        cases.push(case(format!("fk k={k} diff β=4"), fk(k, Potential::Diff, 4.0, Select::Sample), "none"));
        cases.push(case(format!("fk k={k} max β=4 best"), fk(k, Potential::Max, 4.0, Select::Best), "none"));
    }
    for &k in ks {
        cases.push(case(format!("svdd M={k} α=0"), SteeringSpec::Svdd(SvddSpec { candidates: k, alpha: 0.0 }), "none"));
    }
    cases
}

const RENO_BASE: &str = "none (1-step)";

fn reno_cases(iters: &[usize]) -> Vec<Case> {
    let mut cases = vec![case(RENO_BASE, SteeringSpec::None, RENO_BASE)];
    for &it in iters {
        cases.push(case(
            format!("reno {it} it"),
            SteeringSpec::Reno(RenoSpec { iterations: it, ..RenoSpec::default() }),
            RENO_BASE,
        ));
    }
    cases
}

/// What a model, sampler and reward are run with.
struct Setup<'a> {
    model: &'a dyn DiffusionModel,
    sampler: &'a dyn Sampler,
    sampler_desc: String,
    reward: &'a dyn Reward,
    guidance: f64,
    seeds: Vec<u64>,
}

impl Setup<'_> {
    fn ctx(&self) -> SteerContext<'_> {
        let info = self.model.info();
        let (h, w) = info.default_size;
        let f = info.vae_scale_factor;
        SteerContext {
            model: self.model,
            sampler: self.sampler,
            reward: Some(self.reward),
            prompt: "a bright picture",
            negative_prompt: None,
            guidance_scale: self.guidance,
            seeds: self.seeds.clone(),
            latent_shape: (info.latent_channels, h / f, w / f),
            init_latents: None,
            edit: None,
            trace: false,
        }
    }

    /// Run `spec` `reps` times; the run with the median wall time, and its wall time (ms).
    fn measure(&self, spec: &SteeringSpec, reps: usize) -> (Steered, f64) {
        let ctx = self.ctx();
        let mut runs: Vec<(Steered, f64)> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                let out = run(&ctx, spec, &mut |_| true).expect("steering run");
                (out, t.elapsed().as_secs_f64() * 1e3)
            })
            .collect();
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        runs.swap_remove(runs.len() / 2)
    }
}

/// One measured row.
struct Row {
    label: String,
    baseline: String,
    images: usize,
    nfe: f64,
    reward_evals: f64,
    wall_ms: f64,
    mean: f64,
    se: f64,
    bright: Option<f64>,
    timings: PhaseTimings,
}

impl Row {
    fn share(&self, ms: f64) -> f64 {
        ms / self.wall_ms.max(1e-12)
    }

    /// 1 − denoise / wall: everything that is not a denoiser call (forward, or ReNO's backward).
    fn outside(&self) -> f64 {
        1.0 - self.share(self.timings.denoise_ms)
    }

    fn json(&self, base: &Row) -> Value {
        let n = self.images as f64;
        let t = &self.timings;
        json!({
            "method": self.label,
            "baseline": self.baseline,
            "images": self.images,
            "nfe_per_image": self.nfe,
            "nfe_ratio": self.nfe / base.nfe,
            "reward_evals_per_image": self.reward_evals,
            "wall_ms_per_image": self.wall_ms / n,
            "wall_ms_total": self.wall_ms,
            "mean_reward": self.mean,
            "stderr_reward": self.se,
            "reward_gain": self.mean - base.mean,
            "reward_ratio": if base.mean > 0.0 { json!(self.mean / base.mean) } else { Value::Null },
            "bright_fraction": self.bright,
            "share_outside_denoiser": self.outside(),
            "share_encode": self.share(t.encode_ms),
            "share_reward": self.share(t.reward_ms),
            "share_decode": self.share(t.decode_ms),
            "share_other": self.share(t.other_ms),
            "timings_ms_total": t,
        })
    }
}

fn mean_se(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, (var / n).sqrt())
}

/// Run all `cases` on `setup`; `bright` maps a final latent to "is in the bright mode".
/// Whether a final latent (flattened) lies in the bright mode.
type BrightTest<'a> = &'a dyn Fn(&[f32]) -> bool;

fn run_cases(setup: &Setup, cases: &[Case], reps: usize, bright: Option<BrightTest>) -> Vec<Row> {
    let n = setup.seeds.len();
    cases
        .iter()
        .map(|c| {
            let (out, wall_ms) = setup.measure(&c.spec, reps);
            let rewards: Vec<f32> = out.images.iter().map(|i| i.reward.expect("a reward was given")).collect();
            let (mean, se) = mean_se(&rewards);
            let bright = bright.map(|f| {
                let hits = out
                    .images
                    .iter()
                    .filter(|i| f(&i.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                    .count();
                hits as f64 / n as f64
            });
            let row = Row {
                label: c.label.clone(),
                baseline: c.baseline.to_string(),
                images: n,
                nfe: out.denoiser_evals as f64 / n as f64,
                reward_evals: out.reward_evals as f64 / n as f64,
                wall_ms,
                mean,
                se,
                bright,
                timings: out.timings,
            };
            eprintln!(
                "  {:<22} {:>8.0} ms  reward {:.4}  outside denoiser {:.1}%",
                row.label,
                row.wall_ms,
                row.mean,
                100.0 * row.outside()
            );
            row
        })
        .collect()
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

/// A markdown table; gains are against each row's baseline row.
fn table(title: &str, setup_desc: &str, rows: &[Row], reward_fmt: fn(f64) -> String) -> (String, Value) {
    let base = |r: &Row| rows.iter().find(|b| b.label == r.baseline).expect("baseline row measured");
    let has_bright = rows.iter().any(|r| r.bright.is_some());
    let mut s = format!("#### {title}\n\n{setup_desc}\n\n");
    s.push_str(
        "| method | NFE/img | NFE × | reward evals/img | wall ms/img | mean reward ± s.e. | Δ vs base | ×base |",
    );
    if has_bright {
        s.push_str(" bright |");
    }
    s.push_str(" outside denoiser | reward+decode | encode | other |\n|---|");
    let cols = if has_bright { 12 } else { 11 };
    s.push_str(&"---:|".repeat(cols));
    s.push('\n');
    let mut js = Vec::new();
    for r in rows {
        let b = base(r);
        let t = &r.timings;
        s.push_str(&format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.2} | {} ± {} | {:+.4} | {} |",
            r.label,
            r.nfe,
            r.nfe / b.nfe,
            r.reward_evals,
            r.wall_ms / r.images as f64,
            reward_fmt(r.mean),
            reward_fmt(r.se),
            r.mean - b.mean,
            // A ratio only means something for positive rewards (not for −kB).
            if b.mean > 0.0 { format!("{:.3}", r.mean / b.mean) } else { "—".into() },
        ));
        if has_bright {
            s.push_str(&format!(" {:.3} |", r.bright.unwrap_or(f64::NAN)));
        }
        s.push_str(&format!(
            " {} | {} | {} | {} |\n",
            pct(r.outside()),
            pct(r.share(t.reward_ms + t.decode_ms)),
            pct(r.share(t.encode_ms)),
            pct(r.share(t.other_ms))
        ));
        js.push(r.json(b));
    }
    (s, json!({ "title": title, "setup": setup_desc, "rows": js }))
}

fn f4(x: f64) -> String {
    format!("{x:.4}")
}

fn f3(x: f64) -> String {
    format!("{x:.3}")
}

fn gmm(plan: &Plan) -> (String, Value) {
    let dev = Device::Cpu;
    let m = GaussianMixtureModel::load("toy-gmm", &root().join("models/toy-gmm"), &dev).expect("models/toy-gmm");
    let mix = m.mixture().clone();
    let d = mix.dim();
    let cfg = m.info().scheduler.vp().unwrap();
    let reward = Brightness::new();
    let seeds: Vec<u64> = (0..plan.gmm_images as u64).map(|i| 1000 + i).collect();
    let ddim = build_sampler(SamplerKind::Ddim, cfg, plan.gmm_steps, 1.0).unwrap();
    // One step from t = 999: with the model's own `leading` spacing a single DDIM step runs at
    // t = 1 (diffusers' rule: 0·1000 + steps_offset), which treats unit noise as almost clean data
    // and makes the "generator" nearly the identity.
    let mut trailing = cfg.clone();
    trailing.timestep_spacing = Some(TimestepSpacing::Trailing);
    let one = build_sampler(SamplerKind::Ddim, &trailing, 1, 0.0).unwrap();
    let setup = |sampler, sampler_desc| Setup {
        model: &m,
        sampler,
        sampler_desc,
        reward: &reward,
        guidance: 1.0,
        seeds: seeds.clone(),
    };
    let main = setup(ddim.as_ref(), format!("DDIM η=1, {} steps", plan.gmm_steps));
    let reno = setup(one.as_ref(), format!("1-step DDIM η=0 (trailing spacing, t = {})", one.timestep(0)));

    // The bright mode is the component with the largest mean brightness.
    let bright_k = (0..mix.means.len())
        .max_by(|&a, &b| mix.means[a].iter().sum::<f64>().total_cmp(&mix.means[b].iter().sum::<f64>()))
        .unwrap();
    let is_bright = |x: &[f32]| mix.nearest_component(x) == bright_k;

    // brightness = mean of (x + 1)/2 = ½ + bᵀx with b = 1/(2D) (clamping aside).
    let b = vec![0.5 / d as f64; d];
    let bb: f64 = b.iter().map(|v| v * v).sum();
    let exact = |beta: f64| {
        let w = mix.tilted_weights(&b, beta);
        // Each tilted component is N(μ_k + β τ_k² b, τ_k²): its mean reward is ½ + bᵀμ_k + β τ_k² ‖b‖².
        let mean: f64 = (0..w.len())
            .map(|k| {
                let bm: f64 = b.iter().zip(&mix.means[k]).map(|(x, y)| x * y).sum();
                w[k] * (0.5 + bm + beta * mix.stds[k].powi(2) * bb)
            })
            .sum();
        json!({ "beta": beta, "bright_weight": w[bright_k], "mean_reward": mean })
    };
    let reference = [exact(0.0), exact(4.0)];

    // Warm-up (allocations, thread pool) outside the measurements.
    main.measure(&SteeringSpec::BestOfN(BestOfNSpec { n: 4 }), 1);

    eprintln!("gmm: {} images, {}", plan.gmm_images, main.sampler_desc);
    let mut rows = run_cases(&main, &population_cases(&plan.gmm_k), plan.reps, Some(&is_bright));
    eprintln!("gmm: ReNO, {}", reno.sampler_desc);
    rows.extend(run_cases(&reno, &reno_cases(&plan.reno_iters), plan.reps, Some(&is_bright)));

    let desc = format!(
        "`models/toy-gmm` (3×8×8, modes at ∓0.5 with weights 0.7/0.3, std 0.1), reward `brightness`, \
         {} images (seeds 1000…), population methods on {}, ReNO on {}; median of {} runs per row.",
        plan.gmm_images, main.sampler_desc, reno.sampler_desc, plan.reps
    );
    let (mut md, mut js) = table("Gaussian mixture, brightness", &desc, &rows, f4);
    let r = |v: &Value, k: &str| v[k].as_f64().unwrap();
    md.push_str(&format!(
        "\nExact: base distribution bright weight {:.3}, mean reward {:.4}; tilted p·exp(4·r) bright weight \
         {:.3}, mean reward {:.4}; β → ∞: bright weight 1, mean reward ≈ 0.75.\n",
        r(&reference[0], "bright_weight"),
        r(&reference[0], "mean_reward"),
        r(&reference[1], "bright_weight"),
        r(&reference[1], "mean_reward"),
    ));
    js["exact"] = json!(reference);
    (md, js)
}

fn load(name: &str) -> Option<std::sync::Arc<dyn DiffusionModel>> {
    let dir = root().join("tests/fixtures/models").join(name);
    if !dir.join("model_index.json").is_file() {
        eprintln!("skipping {name}: {} missing", dir.display());
        return None;
    }
    Some(tiller::models::loader::load_model(name, &dir, &Device::Cpu, DType::F32).expect("fixture model"))
}

fn sd(plan: &Plan) -> Vec<(String, Value)> {
    let (Some(sd15), Some(turbo)) = (load("sd15-tiny"), load("turbo-tiny")) else { return Vec::new() };
    let seeds: Vec<u64> = (0..plan.sd_images as u64).map(|i| 2000 + i).collect();
    let ddim = build_sampler(SamplerKind::Ddim, sd15.info().scheduler.vp().unwrap(), plan.sd_steps, 1.0).unwrap();
    let euler = build_sampler(SamplerKind::Euler, turbo.info().scheduler.vp().unwrap(), 1, 0.0).unwrap();
    let brightness = Brightness::new();
    let jpeg = JpegReward::compressibility();
    let mut out = Vec::new();
    type Fmt = fn(f64) -> String;
    let rewards: [(&dyn Reward, Fmt, &[usize]); 2] = [(&brightness, f4, &plan.sd_k), (&jpeg, f3, &plan.sd_jpeg_k)];
    for (i, (reward, fmt, ks)) in rewards.into_iter().enumerate() {
        let main = Setup {
            model: sd15.as_ref(),
            sampler: ddim.as_ref(),
            sampler_desc: format!("DDIM η=1, {} steps, CFG 7.5", plan.sd_steps),
            reward,
            guidance: 7.5,
            seeds: seeds.clone(),
        };
        if i == 0 {
            main.measure(&SteeringSpec::BestOfN(BestOfNSpec { n: 2 }), 1);
        }
        eprintln!("sd15-tiny, {}: {} images, {}", reward.name(), plan.sd_images, main.sampler_desc);
        let mut rows = run_cases(&main, &population_cases(ks), 1, None);
        let mut reno_backward = None;
        let mut desc = format!(
            "`sd15-tiny` fixture (16×16 images, 4×8×8 latents), reward `{}`, {} images (seeds 2000…), {}; one run \
             per row",
            reward.name(),
            plan.sd_images,
            main.sampler_desc
        );
        if reward.differentiable() {
            let reno = Setup {
                model: turbo.as_ref(),
                sampler: euler.as_ref(),
                sampler_desc: "`turbo-tiny`, 1-step Euler, no CFG".into(),
                reward,
                guidance: 0.0,
                seeds: seeds.clone(),
            };
            eprintln!("turbo-tiny, {}: ReNO, {}", reward.name(), reno.sampler_desc);
            rows.extend(run_cases(&reno, &reno_cases(&plan.sd_reno_iters), 1, None));
            desc.push_str(&format!("; ReNO rows on {}", reno.sampler_desc));
            reno_backward = Some(decoder_backward_ms(&reno));
        }
        desc.push('.');
        let (mut md, mut js) = table(&format!("SD fixture, {}", reward.name()), &desc, &rows, fmt);
        if let Some(bwd) = reno_backward {
            // reno.rs times the whole backward pass (reward → VAE decoder → UNet) as denoise_ms.
            md.push_str(&format!(
                "\nReNO: the backward pass through the VAE decoder and the reward alone takes {bwd:.2} ms/image \
                 (median of 5), and reno.rs counts it in `denoise_ms`; "
            ));
            let mut fixed = Vec::new();
            for r in rows.iter().filter(|r| r.label.starts_with("reno")) {
                let updates = r.nfe - 1.0; // the last iteration only scores
                let share = r.outside() + r.share(bwd * updates * r.images as f64);
                fixed.push(format!("{} {}", r.label, pct(share)));
                js["reno_outside_with_decoder_backward"][&r.label] = json!(share);
            }
            md.push_str(&format!("moving it out gives an outside-denoiser share of {}.\n", fixed.join(", ")));
            js["reno_decoder_backward_ms_per_image"] = json!(bwd);
        }
        // Same batch as the first best-of-N row, whose denoiser time per latent-step it is set against.
        let k0 = ks[0];
        let bon = rows.iter().find(|r| r.label == format!("best_of_n N={k0}")).expect("best-of-N row");
        let split = reward_split(&main, k0 * plan.sd_images);
        md.push_str(&format!(
            "\nSplit of the reward phase (batch of {} intermediate x̂0, median of 5): VAE decode {:.2} ms/image, \
             `{}` {:.3} ms/image; one guided denoiser step (2 NFE) per latent in the `best_of_n N={}` row (same batch): {:.2} ms.\n",
            split.0,
            split.1,
            reward.name(),
            split.2,
            k0,
            bon.timings.denoise_ms / (bon.nfe * bon.images as f64 / 2.0),
        ));
        js["reward_split"] = json!({ "batch": split.0, "decode_ms_per_image": split.1, "score_ms_per_image": split.2 });
        out.push((md, js));
    }
    out
}

/// ReNO's share of backward time that is not the denoiser's: reward → VAE decoder, per image
/// (median of 5 on a seeded batch of the setup's size).
fn decoder_backward_ms(setup: &Setup) -> f64 {
    let (c, h, w) = setup.ctx().latent_shape;
    let n = setup.seeds.len();
    let z = tiller::sampling::SeededNoise::new(11).sample_vec(n * c * h * w);
    let z = candle_core::Tensor::from_vec(z, (n, c, h, w), setup.model.device()).unwrap();
    let var = candle_core::Var::from_tensor(&z).unwrap();
    let images = setup.model.decode(var.as_tensor()).unwrap();
    let scores = setup.reward.score_tensor(&images, "").unwrap();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            scores.sum_all().unwrap().backward().unwrap();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2] / n as f64
}

/// What one intermediate reward evaluation costs: decoding x̂0 vs scoring the decoded images.
/// (batch, decode ms per image, score ms per image), medians of 5 on a seeded batch.
fn reward_split(setup: &Setup, batch: usize) -> (usize, f64, f64) {
    let (c, h, w) = setup.ctx().latent_shape;
    let x0 = tiller::sampling::SeededNoise::new(7).sample_vec(batch * c * h * w);
    let x0 = candle_core::Tensor::from_vec(x0, (batch, c, h, w), setup.model.device()).unwrap();
    let median = |f: &mut dyn FnMut()| {
        let mut t: Vec<f64> = (0..5)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[2]
    };
    let images = setup.model.decode(&x0).unwrap();
    let decode = median(&mut || {
        setup.model.decode(&x0).unwrap();
    });
    let score = median(&mut || {
        setup.reward.score(&images, "").unwrap();
    });
    (batch, decode / batch as f64, score / batch as f64)
}

fn main() {
    tiller::models::cpu_kernels::tune_process();
    // `cargo bench` passes `--bench`; other words select the mode and the models.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let quick = args.iter().any(|a| a == "quick") || std::env::var("TILLER_BENCH_QUICK").is_ok_and(|v| v == "1");
    let models: Vec<&String> = args.iter().filter(|a| *a != "quick").collect();
    let want = |name: &str| models.is_empty() || models.iter().any(|m| name.contains(m.as_str()));
    let plan = Plan::new(quick);
    let started = Instant::now();
    let mut md = Vec::new();
    let mut results = serde_json::Map::new();
    if want("gmm") {
        let (m, j) = gmm(&plan);
        md.push(m);
        results.insert("gmm".into(), j);
    }
    if want("sd-fixture") {
        let tables = sd(&plan);
        results.insert("sd-fixture".into(), Value::Array(tables.iter().map(|t| t.1.clone()).collect()));
        md.extend(tables.into_iter().map(|t| t.0));
    }
    let secs = started.elapsed().as_secs_f64();
    results.insert(
        "run".into(),
        json!({
            "quick": plan.quick,
            "threads": candle_core::utils::get_num_threads(),
            "wall_s": secs,
        }),
    );
    for m in &md {
        println!("{m}");
    }
    println!("threads {}, total {:.1} s", candle_core::utils::get_num_threads(), secs);
    let out = root().join("target/bench-steering/results.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results)).unwrap()).unwrap();
    println!("wrote {}", display(&out));
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
