//! `tiller generate` end to end on the tiny fixture model: PNG output, latents files, replay.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Shape};
use tiller::sampling::NoiseSource;

fn tiller() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiller"));
    c.env("RUST_LOG", "warn");
    c
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn run(args: &[&str]) -> std::process::Output {
    let out = tiller().args(args).output().unwrap();
    assert!(out.status.success(), "tiller {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn save_latents_then_init_latents_replays_identically() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let models = fixtures().to_string_lossy().into_owned();
    let (a_st, a_png, b_st, b_png) = (p("a.safetensors"), p("a.png"), p("b.safetensors"), p("b.png"));
    let (noise_st, c_png, d_png) = (p("noise.safetensors"), p("c.png"), p("d.png"));
    // Stochastic sampler, CFG, negative prompt: everything must replay.
    let common = [
        "generate",
        "--models-dir",
        &models,
        "--model",
        "sd15-tiny",
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blue",
        "--scheduler",
        "euler-ancestral",
        "--steps",
        "3",
        "--guidance",
        "5",
        "--width",
        "32",
        "--height",
        "16",
        "--seed",
        "7",
        "--device",
        "cpu",
    ];
    let mut a = common.to_vec();
    a.extend(["--save-latents", &a_st, "--output", &a_png]);
    let out = run(&a);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("seed 7"), "{stderr}");

    let saved = tensors(&dir.path().join("a.safetensors"));
    assert_eq!(saved["latents"].dims(), [1, 4, 8, 16]);
    assert_eq!(saved["init_latents"].dims(), [1, 4, 8, 16]);
    assert_eq!(saved["image"].dims(), [1, 3, 16, 32]);
    let image = values(&saved["image"]);
    assert!(image.iter().all(|v| (0.0..=1.0).contains(v)));

    // The PNG is round(image * 255).
    let png = image::open(dir.path().join("a.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (32, 16));
    let (h, w) = (16usize, 32usize);
    for (i, px) in png.pixels().enumerate() {
        let (y, x) = (i / w, i % w);
        for c in 0..3 {
            let v = image[c * h * w + y * w + x];
            assert_eq!(px.0[c], (v * 255.0).round() as u8, "pixel ({x},{y}) channel {c}");
        }
    }

    // Replay from the saved file (its init_latents), same seed: identical bytes.
    let mut b = common.to_vec();
    b.extend(["--init-latents", &a_st, "--save-latents", &b_st, "--output", &b_png]);
    run(&b);
    assert_eq!(std::fs::read(p("a.png")).unwrap(), std::fs::read(p("b.png")).unwrap());
    let replay = tensors(&dir.path().join("b.safetensors"));
    assert_eq!(values(&saved["latents"]), values(&replay["latents"]));

    // A plain init file with `latents` = the noise seed 7 draws replays the seed-only run too.
    let noise = tiller::pipeline::PerImageNoise::new(7, 1).next(&Shape::from((1, 4, 8, 16)), &Device::Cpu).unwrap();
    assert_eq!(values(&noise), values(&saved["init_latents"]));
    tiller::util::tensor_io::save_tensors(&dir.path().join("noise.safetensors"), &[("latents", &noise)]).unwrap();
    let mut c = common.to_vec();
    c.extend(["--init-latents", &noise_st, "--output", &c_png]);
    run(&c);
    assert_eq!(std::fs::read(p("a.png")).unwrap(), std::fs::read(p("c.png")).unwrap());

    // Different seed: different image.
    let mut d: Vec<&str> = common.to_vec();
    let i = d.iter().position(|s| *s == "7").unwrap();
    d[i] = "8";
    d.extend(["--output", &d_png]);
    run(&d);
    assert_ne!(std::fs::read(p("a.png")).unwrap(), std::fs::read(p("d.png")).unwrap());
}

#[test]
fn several_images_get_numbered_paths_and_model_can_be_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("turbo-tiny");
    let out = dir.path().join("img.png");
    run(&[
        "generate",
        "--model",
        &model.to_string_lossy(),
        "--prompt",
        "x",
        "-n",
        "2",
        "--seed",
        "1",
        "--output",
        &out.to_string_lossy(),
    ]);
    assert!(dir.path().join("img_0.png").is_file());
    assert!(dir.path().join("img_1.png").is_file());
    assert!(!out.exists());
    // Each PNG records its own seed in the `parameters` chunk web UIs read.
    for (i, seed) in [(0, 1), (1, 2)] {
        let bytes = std::fs::read(dir.path().join(format!("img_{i}.png"))).unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let chunk = reader.info().uncompressed_latin1_text.iter().find(|c| c.keyword == "parameters").cloned();
        let text = chunk.expect("parameters chunk").text;
        assert!(text.starts_with("x\n") && text.contains(&format!("Seed: {seed},")), "{text}");
    }
    // The extension picks the format.
    let jpg = dir.path().join("img.jpg");
    run(&[
        "generate",
        "--model",
        &model.to_string_lossy(),
        "--prompt",
        "x",
        "--seed",
        "1",
        "--quality",
        "80",
        "--output",
        &jpg.to_string_lossy(),
    ]);
    let bytes = std::fs::read(&jpg).unwrap();
    assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Jpeg);
}

#[test]
fn clear_errors() {
    let models = fixtures().to_string_lossy().into_owned();
    let fail = |args: &[&str]| {
        let out = tiller().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = fail(&["generate", "--models-dir", &models, "--model", "nope", "--prompt", "x"]);
    assert!(e.contains("nope") && e.contains("sd15-tiny"), "{e}");
    let e = fail(&[
        "generate",
        "--models-dir",
        &models,
        "--model",
        "sd15-tiny",
        "--prompt",
        "x",
        "--dtype",
        "bf16",
        "--device",
        "cpu",
    ]);
    assert!(e.contains("bf16"), "{e}");
    let e = fail(&["generate", "--models-dir", &models, "--model", "sd15-tiny", "--prompt", "x", "--scheduler", "dpm"]);
    assert!(e.contains("dpm"), "{e}");
    if !cfg!(feature = "cuda") {
        let e =
            fail(&["generate", "--models-dir", &models, "--model", "sd15-tiny", "--prompt", "x", "--device", "cuda:0"]);
        assert!(e.contains("--features cuda"), "{e}");
        let e = fail(&["serve", "--models-dir", &models, "--device", "cuda:1"]);
        assert!(e.contains("--features cuda"), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not safetensors").unwrap();
    let e = fail(&[
        "generate",
        "--models-dir",
        &models,
        "--model",
        "sd15-tiny",
        "--prompt",
        "x",
        "--init-latents",
        &bad.to_string_lossy(),
    ]);
    assert!(e.contains("bad.safetensors") && e.contains("safetensors"), "{e}");
    let e = fail(&["serve", "--models-dir", &dir.path().to_string_lossy()]);
    assert!(e.contains("no model directories"), "{e}");
    let e = fail(&["serve", "--models-dir", &models, "--default-model", "missing"]);
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn openapi_subcommand_prints_the_committed_document() {
    let out = run(&["openapi"]);
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
}

/// FLUX from the CLI: unpacked `--save-latents`/`--init-latents` (n, 16, H/f, W/f) replay the
/// image; dev takes `--guidance` as its embedding, schnell ignores it with a note.
#[test]
fn flux_generates_replays_and_notes_ignored_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (st, a, b, c) = (p("a.safetensors"), p("a.png"), p("b.png"), p("c.png"));
    let dev = fixtures().join("flux-dev-tiny").to_string_lossy().into_owned();
    let common =
        ["generate", "--model", &dev, "--prompt", "a red circle", "--steps", "3", "--seed", "9", "--device", "cpu"];
    let mut first = common.to_vec();
    first.extend(["--guidance", "3.5", "--width", "16", "--height", "16", "--save-latents", &st, "-o", &a]);
    let out = run(&first);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("takes no guidance"));
    assert_eq!(tensors(Path::new(&st))["init_latents"].dims(), [1, 16, 8, 8], "unpacked latents");
    let mut replay = common.to_vec();
    replay.extend(["--guidance", "3.5", "--width", "16", "--height", "16", "--init-latents", &st, "-o", &b]);
    run(&replay);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    let schnell = fixtures().join("flux-schnell-tiny").to_string_lossy().into_owned();
    let out = run(&[
        "generate",
        "--model",
        &schnell,
        "--prompt",
        "x",
        "--guidance",
        "5",
        "--width",
        "16",
        "--height",
        "16",
        "--device",
        "cpu",
        "-o",
        &c,
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("takes no guidance"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
