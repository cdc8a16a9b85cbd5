//! `tiller experiment run`: an experiment offline. Every prompt of a file goes through every arm
//! at the same seeds on local models, through the server's own request validation, engine and
//! metrics, and the results table is the one `GET /v1/experiments/{name}/results` gives, written
//! as JSON and Markdown.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use super::store::Record;
use super::{results, ArmSpec, Assignment, ExperimentResults, ExperimentSpec, Status};
use crate::config::Config;
use crate::error::{Result, TillerError};

/// The `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineConfig {
    pub name: String,
    /// Model for arms that name none; default: the models root's default.
    #[serde(default)]
    pub model: Option<String>,
    pub arms: Vec<ArmSpec>,
    #[serde(default)]
    pub metrics: Vec<String>,
    /// Seeds every prompt runs with, in every arm (matched); default [0].
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

#[derive(Debug, clap::Args)]
pub struct ExperimentRunArgs {
    /// TOML: `name`, `model`, `metrics`, `seeds` and `[[arms]]` tables with `name` and
    /// `request` (generation fields), as an experiment's arms.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Prompts, one per line (blank lines and lines starting with `#` are skipped).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    #[arg(long, env = "TILLER_MODELS_DIR", default_value = "models", value_name = "DIR")]
    pub models_dir: PathBuf,
    #[arg(long, default_value = "adapters", value_name = "DIR")]
    pub adapters_dir: PathBuf,
    /// Write OUT.json and OUT.md (default: the experiment's name in the current directory).
    #[arg(long, value_name = "OUT")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ExperimentCommand {
    /// Run every prompt through every arm at matched seeds and write the results table.
    Run(ExperimentRunArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    pub command: ExperimentCommand,
}

pub fn run_command(args: &ExperimentArgs) -> Result<()> {
    match &args.command {
        ExperimentCommand::Run(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| TillerError::Other(e.into()))?;
            let table = rt.block_on(run(a))?;
            let out = a.out.clone().unwrap_or_else(|| PathBuf::from(&table.experiment));
            let json = out.with_extension("json");
            let md = out.with_extension("md");
            let write =
                |p: &Path, text: String| std::fs::write(p, text).map_err(|e| TillerError::file(p, e.to_string()));
            write(&json, serde_json::to_string_pretty(&table).unwrap_or_default())?;
            let markdown = markdown(&table);
            write(&md, markdown.clone())?;
            print!("{markdown}");
            eprintln!("wrote {} and {}", json.display(), md.display());
            Ok(())
        }
    }
}

pub async fn run(args: &ExperimentRunArgs) -> Result<ExperimentResults> {
    let text = std::fs::read_to_string(&args.config).map_err(|e| TillerError::file(&args.config, e.to_string()))?;
    let cfg: OfflineConfig = toml::from_str(&text).map_err(|e| TillerError::file(&args.config, e.to_string()))?;
    let spec = ExperimentSpec {
        name: cfg.name.clone(),
        arms: cfg.arms.clone(),
        metrics: cfg.metrics.clone(),
        assignment: Assignment::Random,
    };
    spec.check().map_err(|e| TillerError::file(&args.config, e.text()))?;
    let prompts: Vec<String> = std::fs::read_to_string(&args.prompts)
        .map_err(|e| TillerError::file(&args.prompts, e.to_string()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(TillerError::file(&args.prompts, "no prompts"));
    }
    let mut config = Config::default();
    config.models.root = args.models_dir.clone();
    config.adapters.root = args.adapters_dir.clone();
    config.models.default = cfg.model.clone();
    let engine = crate::api::engine_from_config(&config)?;
    if engine.wait_ready_blocking(std::time::Duration::from_secs(600)) != crate::engine::EngineState::Ready {
        return Err(TillerError::Other(anyhow::anyhow!("the models did not load")));
    }
    let state = crate::api::AppState::new(engine.clone(), &config, &candle_core::Device::Cpu)?;
    let metrics =
        crate::api::experiments::metric_rewards(&state, &spec).map_err(|e| TillerError::field("metrics", e.message))?;
    let mut records = Vec::new();
    let total = spec.arms.len() * prompts.len() * cfg.seeds.len();
    for arm in &spec.arms {
        for prompt in &prompts {
            for &seed in &cfg.seeds {
                let mut body = arm.request.clone();
                body.insert("prompt".into(), Value::String(prompt.clone()));
                body.insert("seed".into(), Value::from(seed));
                let req = crate::util::json::parse_value(Value::Object(body))
                    .map_err(|e| TillerError::field(format!("arms.{}.request", arm.name), e.text()))?;
                let mut label = None;
                let t0 = Instant::now();
                let mut p = crate::api::handlers::prepare_parsed(&state, req, None, None, &mut label)
                    .map_err(|e| TillerError::field(format!("arm `{}`", arm.name), e.message))?;
                p.job.metrics = metrics.clone();
                let handle = engine.submit(p.job).map_err(|e| TillerError::Other(anyhow::anyhow!("{e:?}")))?;
                let out = match handle.wait().await {
                    crate::engine::JobEvent::Completed(out) => out,
                    crate::engine::JobEvent::Failed(e) => {
                        return Err(TillerError::Other(anyhow::anyhow!("arm `{}`: {e}", arm.name)))
                    }
                    _ => return Err(TillerError::Cancelled),
                };
                let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
                records.extend(Record::of_job(&spec.name, &arm.name, None, prompt, &out, latency_ms));
                eprint!("\r{} / {total} generations", records.len());
            }
        }
    }
    eprintln!();
    engine.shutdown();
    Ok(results(&spec, Status::Stopped, &records, &[]))
}

fn interval(ci: Option<[f64; 2]>) -> String {
    ci.map(|[a, b]| format!("[{a:.3}, {b:.3}]")).unwrap_or_else(|| "–".into())
}

/// The results as a Markdown table: one row per arm.
pub fn markdown(r: &ExperimentResults) -> String {
    let metrics: Vec<&String> = r.arms.first().map(|a| a.metrics.keys().collect()).unwrap_or_default();
    let mut s = format!("# {}\n\n| arm | n |", r.experiment);
    for m in &metrics {
        s.push_str(&format!(" {m} (95 % CI) | vs control (always-valid CI) |"));
    }
    s.push_str(" NFE | latency p50 ms |\n|---|---|");
    for _ in &metrics {
        s.push_str("---|---|");
    }
    s.push_str("---|---|\n");
    for a in &r.arms {
        s.push_str(&format!("| {} | {} |", a.name, a.n));
        for m in &metrics {
            let x = &a.metrics[*m];
            let vs = x
                .vs_control
                .as_ref()
                .map(|d| match d.always_valid_ci {
                    Some(ci) => format!("{:+.3} {}", d.diff, interval(Some(ci))),
                    // Below 10 images per arm only the fixed-sample interval exists; say so.
                    None => format!("{:+.3} {} (fixed-sample)", d.diff, interval(d.ci)),
                })
                .unwrap_or_else(|| "control".into());
            s.push_str(&format!(" {:.3} {} | {vs} |", x.mean, interval(x.ci)));
        }
        s.push_str(&format!(
            " {:.1} | {} |\n",
            a.cost.nfe,
            a.cost.latency_p50_ms.map(|l| format!("{l:.0}")).unwrap_or_default()
        ));
    }
    s.push_str(&format!("\n{}\n", r.note));
    s
}
