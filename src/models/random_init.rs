//! Random-weight components in the published layout (config.json + safetensors), for
//! benchmarks and tests that need a model of a given size without downloading one.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::unet_2d::{UNet2DConditionModel, UNet2DConfig};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::error::{Result, TillerError};
use crate::sampling::SeededNoise;

/// Re-draw every variable: normalisation weights ≈ 1, biases small, other weights
/// N(0, 1/fan_in) so activations stay of order one through deep stacks.
fn randomise(vm: &VarMap, seed: u64) -> Result<()> {
    let data = vm.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut noise = SeededNoise::new(seed);
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let z = Tensor::from_vec(noise.sample_vec(shape.elem_count()), shape.clone(), &Device::Cpu)?;
        let is_norm = name.contains("norm");
        let value = if name.ends_with("bias") {
            (z * 0.02)?
        } else if is_norm {
            ((z * 0.05)? + 1.0)?
        } else {
            let dims = shape.dims();
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            (z * (1.0 / (fan_in as f64).sqrt()))?
        };
        var.set(&value.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn write(dir: &Path, config: &serde_json::Value, vm: &VarMap) -> Result<()> {
    write_as(dir, config, vm, "diffusion_pytorch_model.safetensors")
}

fn write_as(dir: &Path, config: &serde_json::Value, vm: &VarMap, weights: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TillerError::file(dir, e.to_string()))?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(config).expect("json"))
        .map_err(|e| TillerError::file(&cfg, e.to_string()))?;
    vm.save(dir.join(weights))?;
    Ok(())
}

/// Write `dir/config.json` and random weights for a UNet described by diffusers config JSON.
pub fn write_random_unet(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<()> {
    let parsed: UNet2DConfig =
        serde_json::from_value(config.clone()).map_err(|e| TillerError::field("unet config", e.to_string()))?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    UNet2DConditionModel::load(vb, &parsed)?;
    randomise(&vm, seed)?;
    write(dir, config, &vm)
}

/// Write `dir/config.json` and random weights for an AutoencoderKL.
pub fn write_random_vae(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<()> {
    let parsed: AutoencoderKLConfig =
        serde_json::from_value(config.clone()).map_err(|e| TillerError::field("vae config", e.to_string()))?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    // Building twice creates the encoder too: the first pass registers decoder tensors, after
    // which `encoder.conv_in.weight` is requested explicitly.
    vb.get((parsed.block_out_channels[0], parsed.in_channels, 3, 3), "encoder.conv_in.weight")?;
    AutoencoderKL::load(vb, &parsed)?;
    randomise(&vm, seed)?;
    write(dir, config, &vm)
}

/// Write `dir/config.json` and random weights (`model.safetensors`, transformers' layout) for a
/// CLIP text encoder described by its transformers config JSON.
pub fn write_random_clip_text(dir: &Path, config: &serde_json::Value, seed: u64) -> Result<()> {
    let parsed: ClipTextConfig =
        serde_json::from_value(config.clone()).map_err(|e| TillerError::field("text encoder config", e.to_string()))?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    // Registered first so the loader takes the `text_model.`-prefixed names transformers saves.
    vb.get((parsed.vocab_size, parsed.hidden_size), "text_model.embeddings.token_embedding.weight")?;
    ClipTextModel::load(vb, &parsed)?;
    randomise(&vm, seed)?;
    write_as(dir, config, &vm, "model.safetensors")
}
