//! Loading model directories: published layouts load unchanged (single, sharded and variant
//! weight files), and every broken file gives an error naming the file and the problem.

mod http_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use http_support::copy_dir;
use tiller::models::loader::{discover_models, load_model};
use tiller::models::{DiffusionModel, PromptEmbedding};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

fn unet_output(model: &dyn DiffusionModel) -> Tensor {
    let refs = candle_core::safetensors::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refs/unet_sd15-tiny.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ctx = PromptEmbedding { hidden_states: refs["encoder_hidden_states"].clone(), pooled: None, truncated: vec![] };
    let ts = tiller::models::timesteps(751.0, refs["sample"].dim(0).unwrap(), &Device::Cpu).unwrap();
    model.predict(&refs["sample"], &ts, &ctx, None).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn load_err(dir: &Path) -> String {
    match load_model("m", dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_fixture_layout_loads_and_is_discovered() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let found: Vec<String> = discover_models(&root).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        found,
        [
            "flux-dev-tiny",
            "flux-schnell-tiny",
            "lcm-tiny",
            "sd15-inpaint-tiny",
            "sd15-tiny",
            "sd2-tiny",
            "sd3-t5-tiny",
            "sd3-tiny",
            "sd35-tiny",
            "sdxl-tiny",
            "turbo-tiny"
        ]
    );
    for name in &found {
        if name.starts_with("sd3") || name.starts_with("flux") {
            let m = load_model(name, &root.join(name), &Device::Cpu, DType::F32).unwrap();
            assert_eq!((m.info().latent_channels, m.info().patch_size), (16, 2), "{name}");
            continue;
        }
        let m = load_model(name, &root.join(name), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(m.info().latent_channels, 4);
        assert_eq!(m.info().vae_scale_factor, 2);
        assert_eq!(m.info().default_size, (16, 16));
        assert_eq!(m.info().guidance_embedding, name == "lcm-tiny");
        // The 9-channel UNet of the inpainting pipeline.
        assert_eq!(m.info().inpainting, name == "sd15-inpaint-tiny");
        assert_eq!(m.info().zero_empty_negative, name == "sdxl-tiny");
    }
}

#[test]
fn sharded_weights_with_index_load_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    copy_dir(&fixture("sd15-tiny"), &dir);
    let unet = dir.join("unet");
    let single = unet.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let shard = i % 2;
        shards[shard].insert((*n).clone(), tensors[*n].clone());
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", shard + 1);
        weight_map.insert((*n).clone(), serde_json::Value::String(file));
    }
    for (i, s) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            s,
            unet.join(format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    std::fs::remove_file(&single).unwrap();
    std::fs::remove_file(unet.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();

    let sharded = load_model("sharded", &dir, &Device::Cpu, DType::F32).unwrap();
    let plain = load_model("plain", &fixture("sd15-tiny"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_diff(&unet_output(sharded.as_ref()), &unet_output(plain.as_ref())), 0.0);

    // A shard named in the index but missing is reported by name.
    std::fs::remove_file(unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("diffusion_pytorch_model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
}

#[test]
fn broken_directories_name_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("nope");
    assert!(load_err(&missing).contains("does not exist"));

    let no_index = tmp.path().join("no_index");
    copy_dir(&fixture("sd15-tiny"), &no_index);
    std::fs::remove_file(no_index.join("model_index.json")).unwrap();
    let err = load_err(&no_index);
    assert!(err.contains("model_index.json") && err.contains("missing"), "{err}");

    let bad_cfg = tmp.path().join("bad_cfg");
    copy_dir(&fixture("sd15-tiny"), &bad_cfg);
    std::fs::write(bad_cfg.join("unet/config.json"), "{ not json").unwrap();
    let err = load_err(&bad_cfg);
    assert!(err.contains("unet/config.json") && err.contains("malformed"), "{err}");

    let no_vae = tmp.path().join("no_vae");
    copy_dir(&fixture("sd15-tiny"), &no_vae);
    std::fs::remove_dir_all(no_vae.join("vae")).unwrap();
    let err = load_err(&no_vae);
    assert!(err.contains("vae") && err.contains("missing component"), "{err}");

    let truncated = tmp.path().join("truncated");
    copy_dir(&fixture("sd15-tiny"), &truncated);
    let f = truncated.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&truncated);
    assert!(err.contains("vae/diffusion_pytorch_model.safetensors") && err.contains("safetensors"), "{err}");

    let pickle = tmp.path().join("pickle");
    copy_dir(&fixture("sd15-tiny"), &pickle);
    std::fs::remove_file(pickle.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(pickle.join("vae/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    let err = load_err(&pickle);
    assert!(err.contains("diffusion_pytorch_model.bin") && err.contains("safetensors"), "{err}");

    let wrong_shape = tmp.path().join("wrong_shape");
    copy_dir(&fixture("sd15-tiny"), &wrong_shape);
    let cfg_path = wrong_shape.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["cross_attention_dim"] = serde_json::json!(64);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_err(&wrong_shape);
    assert!(err.contains("unet") && err.contains("do not match config.json"), "{err}");

    let sdxl = tmp.path().join("sdxl");
    copy_dir(&fixture("sd15-tiny"), &sdxl);
    let idx_path = sdxl.join("model_index.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["_class_name"] = serde_json::json!("StableDiffusionXLPipeline");
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let err = load_err(&sdxl);
    assert!(err.contains("text_encoder_2"), "an SDXL pipeline without its second encoder: {err}");
    idx["_class_name"] = serde_json::json!("KandinskyPipeline");
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let err = load_err(&sdxl);
    assert!(err.contains("KandinskyPipeline") && err.contains("not supported"), "{err}");
    // A FLUX pipeline needs its T5 encoder.
    idx["_class_name"] = serde_json::json!("FluxPipeline");
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let err = load_err(&sdxl);
    assert!(err.contains("tokenizer_2") || err.contains("scheduler"), "{err}");

    // SD3 listing a T5 encoder it does not ship: the missing directory is named.
    let sd3 = tmp.path().join("sd3");
    copy_dir(&fixture("sd3-tiny"), &sd3);
    let idx_path = sd3.join("model_index.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["text_encoder_3"] = serde_json::json!(["transformers", "T5EncoderModel"]);
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let err = load_err(&sd3);
    assert!(err.contains("text_encoder_3"), "{err}");
}

#[test]
fn bf16_on_cpu_is_refused_with_a_reason() {
    let err = match load_model("m", &fixture("sd15-tiny"), &Device::Cpu, DType::BF16) {
        Ok(_) => panic!("bf16 on CPU must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bf16") && err.contains("f32"), "{err}");
}
