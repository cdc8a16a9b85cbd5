//! LoRA parity with diffusers 0.42 `load_lora_weights` + `set_adapters` on the sd15-tiny fixture:
//! PEFT and kohya files of the same deltas (linear, conv 3×3 and 1×1, text encoder), one adapter
//! at weight 0.7, two stacked at 0.7 / 0.4, and an rsLoRA adapter; merged and unmerged paths.
//! References: tests/fixtures/refs/lora_sd15-tiny.* (scripts/fixtures/make_lora_fixtures.py).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tiller::adapters::apply::{delta, resolve, ResolvedLayer};
use tiller::adapters::Adapter;
use tiller::models::stable_diffusion::{LoadOptions, StableDiffusion};
use tiller::models::DiffusionModel;

const TOL: f64 = 1e-4;

fn refs() -> (HashMap<String, Tensor>, serde_json::Value) {
    let t = candle_core::safetensors::load("tests/fixtures/refs/lora_sd15-tiny.safetensors", &Device::Cpu).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/refs/lora_sd15-tiny.json").unwrap()).unwrap();
    (t, j)
}

fn base() -> StableDiffusion {
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, clip_skip: 0 };
    StableDiffusion::load("sd15-tiny", Path::new("tests/fixtures/models/sd15-tiny"), &opts).unwrap()
}

fn layers(model: &StableDiffusion, file: &str) -> Vec<ResolvedLayer> {
    let a = Adapter::load(file, &Path::new("tests/fixtures/lora").join(file)).unwrap();
    let (l, warnings) = resolve(&a.file.layers, model.adapter_targets().unwrap(), false).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    l
}

/// max|a − b| / max|b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    d / m.max(1e-12)
}

struct Outputs {
    text: Tensor,
    unet: Tensor,
    e2e: Tensor,
}

fn run(model: &StableDiffusion, r: &HashMap<String, Tensor>) -> Outputs {
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let text = model.text_encoder().forward(&ids, 0).unwrap().hidden_states;
    let latent = &r["latent"];
    let unet = model
        .unet()
        .forward(
            latent,
            &tiller::models::timesteps(500.0, latent.dim(0).unwrap(), latent.device()).unwrap(),
            &r["text_hidden_base"],
            None,
        )
        .unwrap();
    let e2e = model
        .unet()
        .forward(
            latent,
            &tiller::models::timesteps(500.0, latent.dim(0).unwrap(), latent.device()).unwrap(),
            &text,
            None,
        )
        .unwrap();
    Outputs { text, unet, e2e }
}

fn check_case(case: &str, kohya: bool) {
    let (r, j) = refs();
    let c = &j["cases"][case];
    let key = if kohya { "kohya_files" } else { "files" };
    let files: Vec<String> = serde_json::from_value(c[key].clone()).unwrap();
    let weights: Vec<f64> = serde_json::from_value(c["weights"].clone()).unwrap();
    let model = base();
    let resolved: Vec<Vec<ResolvedLayer>> = files.iter().map(|f| layers(&model, f)).collect();
    let set: Vec<(f64, &[ResolvedLayer])> = weights.iter().zip(&resolved).map(|(w, l)| (*w, l.as_slice())).collect();
    for merge in [true, false] {
        let v = model.with_adapters(&set, merge).unwrap();
        let o = run(&v, &r);
        let (et, eu, ee) = (
            rel(&o.text, &r[&format!("text_hidden_{case}")]),
            rel(&o.unet, &r[&format!("unet_out_{case}")]),
            rel(&o.e2e, &r[&format!("unet_out_e2e_{case}")]),
        );
        eprintln!(
            "{case} ({}, {}): text {et:.2e}, unet {eu:.2e}, end-to-end {ee:.2e}",
            if kohya { "kohya" } else { "peft" },
            if merge { "merged" } else { "unmerged" }
        );
        assert!(et < TOL && eu < TOL && ee < TOL, "{case}: text {et}, unet {eu}, e2e {ee}");
    }
    // The adapter changed the outputs (the references are not the base outputs).
    assert!(rel(&r[&format!("unet_out_e2e_{case}")], &r["unet_out_base"]) > 0.01 || case == "c");
}

#[test]
fn base_outputs_match_diffusers() {
    let (r, _) = refs();
    let o = run(&base(), &r);
    assert!(rel(&o.text, &r["text_hidden_base"]) < TOL);
    assert!(rel(&o.unet, &r["unet_out_base"]) < TOL);
}

#[test]
fn single_adapter_peft_and_kohya_match_diffusers() {
    check_case("a", false);
    check_case("a", true);
}

#[test]
fn stacked_adapters_match_diffusers() {
    check_case("ab", false);
    check_case("ab", true);
}

#[test]
fn rslora_adapter_matches_diffusers() {
    check_case("c", false);
    check_case("c", true);
}

#[test]
fn transformers_v4_text_encoder_names_match_diffusers() {
    check_case("a_legacy", false);
}

#[test]
fn kohya_and_peft_give_identical_weights() {
    let model = base();
    for (p, k) in [
        ("lora_a_peft.safetensors", "lora_a_kohya.safetensors"),
        ("lora_c_peft.safetensors", "lora_c_kohya.safetensors"),
    ] {
        let (lp, lk) = (layers(&model, p), layers(&model, k));
        assert_eq!(lp.len(), lk.len());
        let by_module: HashMap<_, _> = lk.iter().map(|l| ((l.component, l.module.clone()), l)).collect();
        for l in &lp {
            let m = by_module[&(l.component, l.module.clone())];
            let a = (delta(l).unwrap() * l.scale).unwrap();
            let b = (delta(m).unwrap() * m.scale).unwrap();
            assert!(rel(&a, &b) < 1e-6, "{}: {}", l.module, rel(&a, &b));
        }
    }
}

#[test]
fn explicit_deltas_match_the_reference_math() {
    let (r, j) = refs();
    let model = base();
    let files = [("A", "lora_a_peft.safetensors"), ("B", "lora_b_peft.safetensors"), ("C", "lora_c_peft.safetensors")];
    let loaded: HashMap<&str, Vec<ResolvedLayer>> = files.iter().map(|(n, f)| (*n, layers(&model, f))).collect();
    for d in j["deltas"].as_array().unwrap() {
        let module = d["module"].as_str().unwrap();
        let names: Vec<&str> = d["adapter"].as_str().unwrap().split('+').collect();
        let weights: Vec<f64> = match &d["weight"] {
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap()).collect(),
            x => vec![x.as_f64().unwrap()],
        };
        let mut sum: Option<Tensor> = None;
        for (name, w) in names.iter().zip(&weights) {
            let l = loaded[name].iter().find(|l| l.module.ends_with(module)).unwrap();
            let t = (delta(l).unwrap() * (w * l.scale)).unwrap();
            sum = Some(match sum {
                Some(s) => (s + t).unwrap(),
                None => t,
            });
        }
        let e = rel(&sum.unwrap(), &r[d["tensor"].as_str().unwrap()]);
        assert!(e < 1e-6, "{module}: {e}");
    }
}

#[test]
fn variants_never_touch_the_base_weights() {
    let (r, _) = refs();
    let model = base();
    let l = layers(&model, "lora_a_peft.safetensors");
    let before = run(&model, &r);
    let _merged = model.with_adapters(&[(0.7, l.as_slice())], true).unwrap();
    let _unmerged = model.with_adapters(&[(0.7, l.as_slice())], false).unwrap();
    let after = run(&model, &r);
    assert_eq!(rel(&after.unet, &before.unet), 0.0);
    assert_eq!(rel(&after.text, &before.text), 0.0);
}

/// SDXL: a PEFT LoRA on the UNet (attention, feed-forward and the `text_time` add_embedding)
/// and on both text encoders, written by `StableDiffusionXLPipeline.save_lora_weights`
/// (`scripts/fixtures/make_sdxl_fixtures.py`), gives diffusers' prompt embeddings, pooled
/// embedding and UNet output, merged and unmerged.
#[test]
fn sdxl_lora_on_unet_and_both_text_encoders_matches_diffusers() {
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, clip_skip: 0 };
    let model = StableDiffusion::load("sdxl-tiny", Path::new("tests/fixtures/models/sdxl-tiny"), &opts).unwrap();
    let a = Adapter::load("sdxl_peft", Path::new("tests/fixtures/lora/sdxl_peft.safetensors")).unwrap();
    let (layers, warnings) = resolve(&a.file.layers, model.adapter_targets().unwrap(), false).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let components: std::collections::BTreeSet<String> = layers.iter().map(|l| format!("{:?}", l.component)).collect();
    assert_eq!(components.len(), 3, "UNet and both text encoders: {components:?}");
    let want = candle_core::safetensors::load("tests/fixtures/refs/lora_sdxl-tiny.safetensors", &Device::Cpu).unwrap();
    let unet_in =
        candle_core::safetensors::load("tests/fixtures/refs/unet_sdxl-tiny.safetensors", &Device::Cpu).unwrap();
    for merge in [true, false] {
        let variant = model.with_adapters(&[(1.0, layers.as_slice())], merge).unwrap();
        let emb = variant.encode_prompts(&["a red circle left of a blue square".to_string()]).unwrap();
        let e = rel(&emb.hidden_states, &want["prompt_embeds"]);
        let p = rel(emb.pooled.as_ref().unwrap(), &want["pooled"]);
        let added = tiller::models::unet_2d::AddedCond {
            text_embeds: unet_in["text_embeds"].clone(),
            time_ids: unet_in["time_ids"].clone(),
        };
        let sample = &unet_in["sample"];
        let ts = tiller::models::timesteps(751.0, sample.dim(0).unwrap(), sample.device()).unwrap();
        let out =
            variant.unet().forward_with(sample, &ts, &unet_in["encoder_hidden_states"], None, Some(&added)).unwrap();
        let u = rel(&out, &want["unet_out_t751"]);
        println!("sdxl lora merge={merge}: prompt_embeds {e:.2e} pooled {p:.2e} unet {u:.2e}");
        assert!(e < TOL && p < TOL && u < TOL, "merge={merge}: {e} {p} {u}");
    }
    // The base model is untouched: its embeddings differ from the adapted ones.
    let base = model.encode_prompts(&["a red circle left of a blue square".to_string()]).unwrap();
    assert!(rel(&base.hidden_states, &want["prompt_embeds"]) > 1e-3);
}

/// FLUX and SD3: PEFT LoRA files on the transformer (attention of both streams, feed-forwards,
/// the single blocks' MLP and output, the embedders, SD3's patch convolution), written by
/// `FluxPipeline`/`StableDiffusion3Pipeline.save_lora_weights`
/// (`scripts/fixtures/make_transformer_lora_fixtures.py`), give diffusers' transformer output,
/// merged and unmerged.
#[test]
fn flow_transformer_loras_match_diffusers() {
    for m in ["flux-dev-tiny", "sd3-tiny"] {
        let dir = Path::new("tests/fixtures/models").join(m);
        let model = tiller::models::loader::load_model(m, &dir, &Device::Cpu, DType::F32).unwrap();
        let file = format!("{m}_peft");
        let a = Adapter::load(&file, &Path::new("tests/fixtures/lora").join(format!("{file}.safetensors"))).unwrap();
        let (layers, warnings) = resolve(&a.file.layers, model.adapter_targets().unwrap(), false).unwrap();
        assert!(warnings.is_empty(), "{m}: {warnings:?}");
        assert!(layers.len() >= 8, "{m}: {} layers", layers.len());
        let t =
            candle_core::safetensors::load(format!("tests/fixtures/refs/transformer_{m}.safetensors"), &Device::Cpu)
                .unwrap();
        let want =
            candle_core::safetensors::load(format!("tests/fixtures/refs/lora_{m}.safetensors"), &Device::Cpu).unwrap();
        let ctx = tiller::models::PromptEmbedding {
            hidden_states: t["context"].clone(),
            pooled: Some(t["pooled"].clone()),
            truncated: vec![],
        };
        for merge in [true, false] {
            let variant = model.with_adapters(&[(1.0, layers.as_slice())], merge).unwrap();
            let g = variant.guidance_embedding(3.5, 2).unwrap();
            let out = variant.predict(&t["sample"], &t["timesteps"], &ctx, g.as_ref()).unwrap();
            let e = rel(&out, &want["out"]);
            println!("{m} lora merge={merge}: {e:.2e}");
            assert!(e < TOL, "{m} merge={merge}: {e}");
        }
    }
}
