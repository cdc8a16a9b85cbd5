//! Single-file (original LDM layout) checkpoints: the fixtures' single files, made by
//! `scripts/fixtures/make_single_file_fixtures.py` and checked there to load in diffusers'
//! `from_single_file` as the same model, give the same image as their diffusers directories
//! (SD 1.x with the CLIP text encoder, SD 2.x with OpenCLIP's fused attention); unknown layouts
//! are refused with a message that says what the file is.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tiller::models::loader::load_model;
use tiller::pipeline::{generate, GenerationParams};
use tiller::sampling::SamplerKind;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `dir` as a single-file model: the pipeline's configs and tokenizer, no weight files, and
/// `checkpoint` beside them.
fn single_file_dir(model: &str, checkpoint: &Path, into: &Path) {
    let src = fixtures().join("models").join(model);
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let name = rel.file_name().unwrap().to_string_lossy();
        if name.ends_with(".safetensors") {
            continue;
        }
        let dst = into.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dst).unwrap();
    }
    std::fs::copy(checkpoint, into.join(checkpoint.file_name().unwrap())).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn image(dir: &Path) -> candle_core::Tensor {
    let model = load_model("m", dir, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let p = GenerationParams {
        prompt: "a red circle left of a blue square".into(),
        negative_prompt: Some("blurry".into()),
        n: 1,
        steps: Some(4),
        guidance_scale: Some(7.5),
        scheduler: Some(SamplerKind::Ddim),
        seed: 3,
        ..Default::default()
    };
    generate(model.as_ref(), &p, &mut |_| true).unwrap().images
}

#[test]
fn single_files_give_the_same_image_as_their_directories() {
    for model in ["sd15-tiny", "sd2-tiny"] {
        let tmp = tempfile::tempdir().unwrap();
        let file = fixtures().join("single_file").join(format!("{model}.safetensors"));
        single_file_dir(model, &file, tmp.path());
        let want = image(&fixtures().join("models").join(model));
        let got = image(tmp.path());
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{model}: the single file's image differs by up to {diff}");
    }
}

fn write(path: &Path, tensors: &[(&str, candle_core::Tensor)]) {
    let map: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn unknown_layouts_are_refused_saying_what_the_file_is() {
    let z = candle_core::Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let cases: Vec<(Vec<(&str, candle_core::Tensor)>, &str)> = vec![
        (vec![("conditioner.embedders.0.transformer.text_model.x", z.clone())], "SDXL"),
        (vec![("some.other.model", z.clone())], "model.diffusion_model"),
        (vec![("model.diffusion_model.input_blocks.99.0.in_layers.0.weight", z.clone())], "input_blocks.99"),
    ];
    for (tensors, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("model.safetensors");
        write(&file, &tensors);
        let dir = tmp.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        single_file_dir("sd15-tiny", &file, &dir);
        let err = load_model("m", &dir, &Device::Cpu, DType::F32).err().expect("refused").to_string();
        assert!(err.contains(want) && err.contains("single-file layout"), "{err}");
    }
    // Two checkpoints in one directory: which one is meant is not guessed.
    let tmp = tempfile::tempdir().unwrap();
    single_file_dir("sd15-tiny", &fixtures().join("single_file/sd15-tiny.safetensors"), tmp.path());
    std::fs::copy(fixtures().join("single_file/sd2-tiny.safetensors"), tmp.path().join("other.safetensors")).unwrap();
    let err = load_model("m", tmp.path(), &Device::Cpu, DType::F32).err().expect("refused").to_string();
    assert!(err.contains("several single-file checkpoints"), "{err}");
}
