//! FLUX.1 against diffusers: tiny `FluxPipeline`s made by `scripts/fixtures/make_flux_fixtures.py`
//! (`flux-dev-tiny` with the guidance embedding and dynamic shifting, `flux-schnell-tiny`
//! without either) load unchanged; `encode_prompt` (T5 states, CLIP's pooled output), one
//! transformer call on a non-square latent with rows at two timesteps, and full runs (packing,
//! rotary positions, the FLUX sigma spacing) match within 1e-4 of the reference's largest value.

mod parity_support;

use candle_core::{DType, Device, Tensor};
use parity_support::{check_flow_run, close, fixtures, flow_runs, refs};
use tiller::models::flux::Flux;
use tiller::models::stable_diffusion::LoadOptions;
use tiller::models::DiffusionModel;
use tiller::sampling::SamplerKind;

const MODELS: [&str; 2] = ["flux-dev-tiny", "flux-schnell-tiny"];

fn load(name: &str) -> Flux {
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, clip_skip: 0 };
    Flux::load(name, &fixtures().join("models").join(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn flux_loads_with_each_variants_defaults() {
    for m in MODELS {
        let any = tiller::models::loader::load_model(m, &fixtures().join("models").join(m), &Device::Cpu, DType::F32)
            .unwrap();
        let info = any.info();
        assert_eq!(info.family, "flux");
        assert_eq!((info.latent_channels, info.patch_size), (16, 2));
        assert_eq!(info.defaults.sampler, SamplerKind::FlowEuler);
        let dev = m.starts_with("flux-dev");
        assert_eq!((info.defaults.steps, info.defaults.guidance_scale), if dev { (28, 3.5) } else { (4, 0.0) });
        // A request naming the other flow sampler keeps the pipeline's numbers.
        assert_eq!(info.defaults_for(SamplerKind::FlowSde), if dev { (28, 3.5) } else { (4, 0.0) });
        // Guidance is an embedding (dev) or ignored (schnell): never classifier-free guidance.
        assert!(!tiller::pipeline::uses_cfg(any.as_ref(), 7.0));
        assert_eq!(any.guidance_embedding(3.5, 2).unwrap().is_some(), dev);
    }
}

#[test]
fn flux_packing_round_trips() {
    let x = Tensor::arange(0f32, 2.0 * 16.0 * 4.0 * 6.0, &Device::Cpu).unwrap().reshape((2, 16, 4, 6)).unwrap();
    let packed = Flux::pack(&x).unwrap();
    assert_eq!(packed.dims(), [2, 6, 64]);
    let back = Flux::unpack(&packed, 4, 6).unwrap();
    assert_eq!(
        back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        Flux::image_ids(4, 6),
        vec![[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
    );
}

#[test]
fn flux_text_and_transformer_match_diffusers() {
    for m in MODELS {
        let model = load(m);
        let (t, json) = refs(&format!("text_{m}"));
        let prompts: Vec<String> =
            json["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let emb = model.encode_prompts(&prompts).unwrap();
        close(&format!("{m} prompt_embeds (T5)"), &emb.hidden_states, &t["prompt_embeds"]);
        close(&format!("{m} pooled (CLIP)"), emb.pooled.as_ref().unwrap(), &t["pooled"]);

        let (t, _) = refs(&format!("transformer_{m}"));
        let ctx = tiller::models::PromptEmbedding {
            hidden_states: t["context"].clone(),
            pooled: Some(t["pooled"].clone()),
            truncated: vec![],
        };
        let g = model.guidance_embedding(3.5, 2).unwrap();
        let out = model.predict(&t["sample"], &t["timesteps"], &ctx, g.as_ref()).unwrap();
        close(&format!("{m} transformer (non-square, two timesteps)"), &out, &t["out"]);
    }
}

#[test]
fn flux_runs_match_diffusers() {
    let runs = flow_runs("flux");
    assert_eq!(runs.len(), 4, "{runs:?}");
    for stem in runs {
        let (_, json) = refs(&stem);
        let model = load(json["model"].as_str().unwrap());
        assert!(!check_flow_run(&model, &stem), "{stem}: FLUX never uses CFG");
    }
}
