//! Stable Diffusion 3 against diffusers: tiny `StableDiffusion3Pipeline`s made by
//! `scripts/fixtures/make_sd3_fixtures.py` — without the T5 encoder (`sd3-tiny`, and `sd35-tiny`
//! with SD3.5's RMS qk-norm) and with it (`sd3-t5-tiny`: a SentencePiece tokenizer.json and a
//! gated-GELU T5EncoderModel) — load unchanged; T5's tokens and hidden states, `encode_prompt`,
//! one transformer call on a non-square latent with rows at different timesteps, and full
//! flow-matching runs with and without CFG match within 1e-4 of the reference's largest value.

mod parity_support;

use candle_core::{DType, Device};
use parity_support::{check_flow_run, close, fixtures, flow_runs, refs};
use tiller::models::sd3::StableDiffusion3;
use tiller::models::stable_diffusion::LoadOptions;
use tiller::models::DiffusionModel;
use tiller::sampling::SamplerKind;

const MODELS: [&str; 3] = ["sd3-tiny", "sd35-tiny", "sd3-t5-tiny"];

fn load(name: &str) -> StableDiffusion3 {
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, clip_skip: 0 };
    StableDiffusion3::load(name, &fixtures().join("models").join(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn sd3_loads_as_a_flow_model() {
    for m in MODELS {
        let model = load(m);
        let info = model.info();
        assert_eq!(info.family, "stable-diffusion-3");
        assert_eq!(info.latent_channels, 16);
        assert_eq!(info.patch_size, 2);
        assert_eq!(info.defaults.sampler, SamplerKind::FlowEuler);
        assert_eq!((info.defaults.steps, info.defaults.guidance_scale), (28, 7.0));
        assert_eq!(info.scheduler.class_name(), "FlowMatchEulerDiscreteScheduler");
        // The generic loader picks the SD3 pipeline by its class name.
        let any = tiller::models::loader::load_model(m, &fixtures().join("models").join(m), &Device::Cpu, DType::F32)
            .unwrap();
        assert_eq!(any.info().family, "stable-diffusion-3");
        // 12 position-table patches of 2 latent pixels of 2 image pixels: 48 pixels a side.
        assert_eq!(info.max_side, Some(48));
        let params = tiller::pipeline::GenerationParams {
            prompt: "x".into(),
            n: 1,
            width: Some(64),
            height: Some(16),
            steps: Some(1),
            ..Default::default()
        };
        let req = tiller::steering::SteeringRequest::default();
        match tiller::steering::generate(any.as_ref(), &params, &req, &mut |_| true) {
            Err(tiller::pipeline::GenerationError::InvalidInput(f)) => assert_eq!(f.field, "size"),
            other => panic!("a side beyond the position table must be refused as `size`: {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn sd3_text_and_transformer_match_diffusers() {
    for m in MODELS {
        let model = load(m);
        let (t, json) = refs(&format!("text_{m}"));
        let prompts: Vec<String> =
            json["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let emb = model.encode_prompts(&prompts).unwrap();
        close(&format!("{m} prompt_embeds"), &emb.hidden_states, &t["prompt_embeds"]);
        close(&format!("{m} pooled"), emb.pooled.as_ref().unwrap(), &t["pooled"]);

        let (t, _) = refs(&format!("transformer_{m}"));
        let out = model.transformer().forward(&t["sample"], &t["timesteps"], &t["context"], &t["pooled"]).unwrap();
        close(&format!("{m} transformer (non-square, two timesteps)"), &out, &t["out"]);
    }
}

#[test]
fn sd3_runs_match_diffusers() {
    let runs = flow_runs("sd3");
    assert_eq!(runs.len(), 9, "{runs:?}");
    for stem in runs {
        let (_, json) = refs(&stem);
        let model = load(json["model"].as_str().unwrap());
        check_flow_run(&model, &stem);
    }
}

#[test]
fn t5_tokens_and_hidden_states_match_transformers() {
    let dir = fixtures().join("models/sd3-t5-tiny");
    let tok = tiller::models::tokenizer::T5Tokenizer::from_dir(&dir.join("tokenizer_3")).unwrap();
    let cfg: tiller::models::t5::T5Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("text_encoder_3/config.json")).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(dir.join("text_encoder_3/model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let t5 = tiller::models::t5::T5EncoderModel::load(vb, &cfg).unwrap();
    let (t, json) = refs("text_sd3-t5-tiny");
    let prompts: Vec<String> =
        json["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let (ids, _) = tok.encode_batch(&prompts, 256, &Device::Cpu).unwrap();
    let want = t["input_ids_3"].to_dtype(DType::U32).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), want.to_vec2::<u32>().unwrap(), "T5 token ids");
    close("t5 last_hidden_state", &t5.forward(&want).unwrap(), &t["t5_last_hidden_state"]);
}
