//! `tiller generate --steering/--reward/--trace` end to end on the analytic `models/toy-gmm`:
//! PNGs, rewards on stderr, one JSON trace line per image on stdout, replay, agreement with the
//! HTTP API, and clear errors.

mod http_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use tiller::config::Config;
use tiller::engine::{Engine, EngineOptions, EngineState, LoadedModel};

fn tiller() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiller"));
    c.env("RUST_LOG", "warn").env_remove("TILLER_CONFIG").env_remove("TILLER_MODELS_DIR");
    c
}

fn toy_gmm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/toy-gmm")
}

fn run(args: &[&str]) -> Output {
    let out = tiller().args(args).output().unwrap();
    assert!(out.status.success(), "tiller {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `tiller generate` on toy-gmm with `extra`; expects failure and returns stderr.
fn fail(extra: &[&str]) -> String {
    let model = toy_gmm().to_string_lossy().into_owned();
    let mut args = vec!["generate", "--model", &model, "--prompt", "x", "--steps", "3", "--device", "cpu"];
    args.extend(extra);
    let dir = tempfile::tempdir().unwrap();
    let out = tiller().args(&args).current_dir(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{extra:?} should fail; stderr:\n{stderr}");
    assert!(!dir.path().join("output.png").exists(), "{extra:?} wrote an image");
    stderr
}

/// Mean of all RGB bytes of a PNG, in [0, 1].
fn brightness(png: &[u8]) -> f64 {
    let rgb = image::load_from_memory(png).unwrap().to_rgb8().into_raw();
    rgb.iter().map(|&v| v as f64).sum::<f64>() / (rgb.len() as f64 * 255.0)
}

/// `reward R` of each `image I (seed S): reward R` line of stderr, by image.
fn stderr_rewards(stderr: &str) -> Vec<(u64, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("image ")?;
            let seed = rest.split("(seed ").nth(1)?.split(')').next()?.parse().ok()?;
            let reward = rest.rsplit("reward ").next()?.trim().parse().ok()?;
            Some((seed, reward))
        })
        .collect()
}

fn fk_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "ignored",
        "--steering",
        r#"{"method":"fk","particles":4}"#,
        "--reward",
        "brightness",
        "--trace",
        "--steps",
        "10",
        "--seed",
        "3",
        "-n",
        "2",
        "--device",
        "cpu",
        "-o",
        out,
    ]
}

#[test]
fn fk_writes_pngs_rewards_and_trace_lines() {
    let dir = tempfile::tempdir().unwrap();
    let model = toy_gmm().to_string_lossy().into_owned();
    let out_path = dir.path().join("out.png").to_string_lossy().into_owned();
    let out = run(&fk_args(&model, &out_path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);

    // 10 steps × 4 particles × 2 images, no CFG on a prompt-free model.
    assert!(stderr.contains("done (fk): 80 denoiser evaluations"), "{stderr}");
    // The default schedule for 10 steps: every step from 2 to 8 (the 0.2–0.8 window), then the
    // terminal scoring: 8 × 2 × 4 particles.
    assert!(stderr.contains("64 reward evaluations"), "{stderr}");
    let rewards = stderr_rewards(&stderr);
    assert_eq!(rewards.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 4], "{stderr}");

    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect();
    assert_eq!(lines.len(), 2, "one trace line per image:\n{stdout}");
    assert!(!dir.path().join("out.png").exists());
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["image"], i);
        assert_eq!(line["seed"], 3 + i as u64);
        let png = std::fs::read(dir.path().join(format!("out_{i}.png"))).unwrap();
        let reward = line["reward"].as_f64().unwrap();
        assert!((reward - brightness(&png)).abs() <= 0.5 / 255.0 + 1e-5, "{reward} vs {}", brightness(&png));
        assert_eq!(reward as f32, rewards[i].1 as f32, "stdout and stderr agree");
        let trace = line["trace"].as_array().unwrap();
        let kinds: Vec<&str> = trace.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["resample", "resample", "resample", "resample", "resample", "resample", "resample", "final"]
        );
        let steps: Vec<u64> = trace.iter().map(|e| e["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [2, 3, 4, 5, 6, 7, 8, 10], "{line}");
        let w: f64 = trace[0]["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((w - 1.0).abs() < 1e-9);
        let ess = trace[0]["ess"].as_f64().unwrap();
        assert!((1.0 - 1e-9..=4.0 + 1e-9).contains(&ess), "{ess}");
    }

    // Without --trace, stdout stays empty; the images replay byte for byte.
    let replay = dir.path().join("replay.png").to_string_lossy().into_owned();
    let mut args = fk_args(&model, &replay);
    args.retain(|a| *a != "--trace");
    let again = run(&args);
    assert!(again.stdout.is_empty(), "{}", String::from_utf8_lossy(&again.stdout));
    for i in 0..2 {
        assert_eq!(
            std::fs::read(dir.path().join(format!("out_{i}.png"))).unwrap(),
            std::fs::read(dir.path().join(format!("replay_{i}.png"))).unwrap(),
            "image {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_http_make_the_same_steered_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = toy_gmm().to_string_lossy().into_owned();
    let out_path = dir.path().join("cli.png").to_string_lossy().into_owned();
    let args: Vec<String> = fk_args(&model, &out_path).into_iter().map(String::from).collect();
    let out = tokio::task::spawn_blocking(move || tiller().args(&args).output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let engine = Engine::start(
        Box::new(|| {
            tiller::models::loader::load_model(
                "toy-gmm",
                &toy_gmm(),
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )
            .map(|m| vec![LoadedModel::new("toy-gmm", m)])
            .map_err(|e| e.to_string())
        }),
        EngineOptions::default(),
    );
    assert_eq!(engine.wait_ready_blocking(Duration::from_secs(30)), EngineState::Ready);
    let s = http_support::start(engine, &Config::default()).await;
    let (st, body) = s
        .generate(json!({"prompt": "ignored", "n": 2, "seed": 3, "steps": 10, "reward": "brightness",
                         "steering": {"method": "fk", "particles": 4}}))
        .await;
    assert_eq!(st, 200, "{body}");
    use base64::Engine as _;
    for i in 0..2 {
        let http = base64::engine::general_purpose::STANDARD.decode(body["data"][i]["b64_json"].as_str().unwrap());
        let cli = std::fs::read(dir.path().join(format!("cli_{i}.png"))).unwrap();
        assert_eq!(http.unwrap(), cli, "image {i}");
    }
}

#[test]
fn bad_steering_json_names_the_field() {
    let e = fail(&["--steering", r#"{"method":"fk","partilces":4}"#, "--reward", "brightness"]);
    assert!(e.contains("steering.partilces") && e.contains("particles"), "{e}");
    let e = fail(&["--steering", r#"{"method":"fk","particles":"four"}"#, "--reward", "brightness"]);
    assert!(e.contains("steering.particles"), "{e}");
    let e = fail(&["--steering", r#"{"method":"fk","particles":0}"#, "--reward", "brightness"]);
    assert!(e.contains("steering.particles"), "{e}");
    let e = fail(&["--steering", r#"{"method":"smc"}"#, "--reward", "brightness"]);
    assert!(e.contains("steering.method") && e.contains("smc") && e.contains("fk"), "{e}");
    let e = fail(&["--steering", r#"{"particles":4}"#, "--reward", "brightness"]);
    assert!(e.contains("steering.method"), "{e}");
    let e = fail(&["--steering", r#"{"method":"none","particles":4}"#]);
    assert!(e.contains("steering.particles"), "{e}");
    let e = fail(&["--steering", "{method: fk}"]);
    assert!(e.contains("steering") && e.contains("JSON"), "{e}");
}

#[test]
fn reward_errors_are_clear() {
    let e = fail(&["--steering", r#"{"method":"reno","iterations":2}"#, "--reward", "jpeg_compressibility"]);
    assert!(e.contains("differentiable") && e.contains("jpeg_compressibility"), "{e}");
    let e = fail(&["--steering", r#"{"method":"fk"}"#]);
    assert!(e.contains("reward"), "{e}");
    let e = fail(&["--steering", r#"{"method":"fk"}"#, "--reward", "sharpness"]);
    assert!(e.contains("sharpness") && e.contains("brightness"), "{e}");
    let e = fail(&["--steering", r#"{"method":"fk"}"#, "--reward", "color"]);
    assert!(e.contains("target"), "{e}");
    let e = fail(&["--steering", r#"{"method":"fk"}"#, "--reward", "brightness", "--eta", "0"]);
    assert!(e.contains("stochastic"), "{e}");
}

/// The flow model through the CLI: `--scheduler flow-sde` saves and replays its latents, and
/// `--steering flowchef` steers it; a VP sampler on it is refused naming `--scheduler`.
#[test]
fn flow_model_samples_replays_and_steers_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/toy-flow").to_string_lossy().into_owned();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (a_st, a_png, b_png, c_png) = (p("a.safetensors"), p("a.png"), p("b.png"), p("c.png"));
    let common =
        ["generate", "--model", &model, "--prompt", "x", "--scheduler", "flow-sde", "--steps", "8", "--seed", "5"];
    let mut a = common.to_vec();
    a.extend(["--device", "cpu", "--save-latents", &a_st, "-o", &a_png]);
    run(&a);
    let mut b = common.to_vec();
    b.extend(["--device", "cpu", "--init-latents", &a_st, "-o", &b_png]);
    run(&b);
    assert_eq!(std::fs::read(&a_png).unwrap(), std::fs::read(&b_png).unwrap(), "flow-sde replays from its file");

    let mut c = common.to_vec();
    c.extend([
        "--device",
        "cpu",
        "--steering",
        r#"{"method":"flowchef","step_size":2.0}"#,
        "--reward",
        "brightness",
        "-o",
        &c_png,
    ]);
    let out = run(&c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("done (flowchef)"), "{stderr}");
    let (plain, steered) = (brightness(&std::fs::read(&a_png).unwrap()), brightness(&std::fs::read(&c_png).unwrap()));
    assert!(steered > plain, "flowchef brightness {steered} vs plain {plain}");

    let out = tiller()
        .args(["generate", "--model", &model, "--prompt", "x", "--scheduler", "ddim", "--device", "cpu"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("flow-euler or flow-sde"), "{stderr}");
}
