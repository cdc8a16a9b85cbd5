//! Parity of image edits with diffusers 0.42's `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` (4-channel UNet, latent blending) on the sd15-tiny fixture:
//! the steps run, every step's latents, the final latents and the decoded image, from the same
//! Gaussian draws (`scripts/fixtures/make_edit_fixtures.py` records them by source).
//! Tolerance: max |error| ≤ 1e-4 · max |ref| per tensor, in f32.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tiller::models::stable_diffusion::{LoadOptions, StableDiffusion};
use tiller::models::DiffusionModel;
use tiller::pipeline::edit::{self, EditInput};
use tiller::pipeline::Conditioning;
use tiller::sampling::{build_sampler, edit_start, FromStep, SamplerKind, SchedulerConfig};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn assert_close(case: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{case}: shape");
    let got = got.to_dtype(DType::F64).unwrap();
    let want = want.to_dtype(DType::F64).unwrap();
    let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
    println!("{case:<40} max|err| {err:.3e}  max|ref| {scale:.3e}  rel {:.3e}", err / scale);
    assert!(err / scale <= TOL, "{case}: relative error {:.3e} > {TOL:e}", err / scale);
}

fn run_case(stem: &str) {
    let dir = fixtures().join("refs");
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join(format!("{stem}.safetensors")), &Device::Cpu).unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, clip_skip: 0 };
    let name = json["model"].as_str().unwrap();
    let model = StableDiffusion::load(name, &fixtures().join("models").join(name), &opts).unwrap();
    let cfg: SchedulerConfig = serde_json::from_value(json["scheduler_config"].clone()).unwrap();
    let kind = match json["scheduler"].as_str().unwrap() {
        "DDIMScheduler" => SamplerKind::Ddim,
        "DDPMScheduler" => SamplerKind::Ddpm,
        "EulerDiscreteScheduler" => SamplerKind::Euler,
        other => panic!("{other}"),
    };
    let steps = json["num_inference_steps"].as_u64().unwrap() as usize;
    let strength = json["strength"].as_f64().unwrap();
    let full = build_sampler(kind, &cfg, steps, json["eta"].as_f64().unwrap()).unwrap();
    let sampler = FromStep::new(full, edit_start(steps, strength).unwrap());
    use tiller::sampling::Sampler as _;
    let want_ts: Vec<f64> = t["timesteps"].to_vec1().unwrap();
    let got_ts: Vec<f64> = (0..sampler.num_steps()).map(|i| sampler.timestep(i)).collect();
    assert_eq!(got_ts.len(), want_ts.len(), "{stem}: the steps run");
    for (a, b) in got_ts.iter().zip(&want_ts) {
        assert!((a - b).abs() < 1e-3, "{stem}: timesteps {got_ts:?} vs {want_ts:?}");
    }

    let input = EditInput { image: t["image"].clone(), mask: t.get("mask").cloned(), strength };
    // The draws by source: the image's posterior sample comes before the starting noise; the
    // masked image's (inpainting UNets) after it. At strength 1 the 9-channel pipeline never
    // samples the image (it starts from noise alone), so any tensor stands in for it.
    let draws: Vec<&str> = json["draws"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    let noise_at = draws.iter().position(|d| *d == "noise_0").unwrap();
    let eps_image = if noise_at > 0 { t[draws[noise_at - 1]].clone() } else { t["noise_0"].zeros_like().unwrap() };
    let eps_masked = draws[noise_at + 1..].iter().find(|d| d.starts_with("vae")).map(|d| t[*d].clone());
    let eps_masked = if model.info().inpainting { eps_masked } else { None };
    let latents = edit::encode(&model, &input, &eps_image, eps_masked.as_ref()).unwrap();
    let noise = &t["noise_0"];
    let guidance = json["guidance_scale"].as_f64().unwrap();
    let cond =
        Conditioning::new(&model, json["prompt"].as_str().unwrap(), json["negative_prompt"].as_str(), guidance, 1)
            .unwrap();
    let mut x = edit::start(&sampler, &latents, noise).unwrap();
    let mut k = 0;
    for i in 0..sampler.num_steps() {
        let x_in = sampler.scale_model_input(&x, i).unwrap();
        let out = cond.predict_with(&model, &x_in, sampler.timestep(i), latents.unet_input.as_ref()).unwrap();
        let z = sampler.step_needs_noise(i).then(|| {
            k += 1;
            t[&format!("step_{}", k - 1)].clone()
        });
        x = sampler.step(&x, &out, i, z.as_ref()).unwrap();
        x = edit::blend(&sampler, &latents, &x, i, noise).unwrap();
        assert_close(&format!("{stem} step {i}"), &x, &t[&format!("latents_step_{i}")]);
    }
    assert_eq!(json["draws"].as_array().unwrap().iter().filter(|d| d.as_str().unwrap().starts_with("step")).count(), k);
    assert_close(&format!("{stem} latents"), &x, &t["latents"]);
    assert_close(&format!("{stem} image"), &model.decode(&x).unwrap(), &t["decoded"]);
}

#[test]
fn img2img_matches_diffusers() {
    for case in ["img2img_ddim", "img2img_ddim_eta1", "img2img_euler"] {
        run_case(&format!("edit_{case}"));
    }
}

#[test]
fn inpainting_matches_diffusers() {
    for case in ["inpaint_ddim_full", "inpaint_euler", "inpaint_ddpm"] {
        run_case(&format!("edit_{case}"));
    }
}

#[test]
fn the_inpainting_unet_matches_diffusers() {
    for case in ["inpaint9_ddim_full", "inpaint9_euler"] {
        run_case(&format!("edit_{case}"));
    }
}
