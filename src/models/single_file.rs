//! Single-file Stable Diffusion checkpoints: the original (LDM) layout that AUTOMATIC1111 and
//! ComfyUI users download, one `.safetensors` holding the UNet under `model.diffusion_model.`,
//! the VAE under `first_stage_model.` and the text encoder under `cond_stage_model.` (CLIP for
//! SD 1.x, OpenCLIP with fused q/k/v for SD 2.x). Each key is renamed to the diffusers name our
//! networks load, by the block arithmetic of the two layouts, from the components' configs.
//!
//! The file carries no configs and no tokenizer, so a single-file model is a directory with the
//! diffusers configs of its family (`model_index.json`, `scheduler/`, `tokenizer/`,
//! `unet/config.json`, `vae/config.json`, `text_encoder/config.json`: a published pipeline
//! without its weight files) and the one checkpoint beside them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::clip_text::ClipTextConfig;
use super::unet_2d::UNet2DConfig;
use super::vae::AutoencoderKLConfig;
use super::weights::{find_weight_files, ComponentWeights};
use crate::error::{Result, TillerError};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP: &str = "cond_stage_model.transformer.";
const OPEN_CLIP: &str = "cond_stage_model.model.";

/// The single checkpoint of a model directory whose components have configs but no weights:
/// `Some(path)` when `dir` holds exactly one top-level `.safetensors` and `unet/` has no weight
/// file; an error when it holds several.
pub fn find(dir: &Path) -> Result<Option<PathBuf>> {
    if find_weight_files(&dir.join("unet"), "diffusion_pytorch_model", None).is_ok() {
        return Ok(None);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TillerError::file(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    match files.len() {
        0 => Ok(None),
        1 => Ok(files.pop()),
        _ => Err(TillerError::file(
            dir,
            format!(
                "several single-file checkpoints ({}); keep one per model directory",
                files.iter().filter_map(|f| f.file_name()).map(|f| f.to_string_lossy()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// (LDM prefix, diffusers prefix, renames of the first name inside).
type Prefix = (String, String, &'static [(&'static str, &'static str)]);

const RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut", "conv_shortcut")];
const VAE_ATTENTION: &[(&str, &str)] =
    &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];

fn p(ldm: impl Into<String>, diffusers: impl Into<String>, inner: &'static [(&'static str, &'static str)]) -> Prefix {
    (ldm.into(), diffusers.into(), inner)
}

fn unet_prefixes(cfg: &UNet2DConfig) -> Result<Vec<Prefix>> {
    let nb = cfg.block_out_channels.len();
    let layers = cfg.layers_per_block.expand(nb, "layers_per_block")?;
    let attn = |t: &String| t.contains("CrossAttn");
    let mut out = vec![
        p("input_blocks.0.0.", "conv_in.", &[]),
        p("time_embed.0.", "time_embedding.linear_1.", &[]),
        p("time_embed.2.", "time_embedding.linear_2.", &[]),
        p("out.0.", "conv_norm_out.", &[]),
        p("out.2.", "conv_out.", &[]),
        p("middle_block.0.", "mid_block.resnets.0.", RESNET),
        p("middle_block.1.", "mid_block.attentions.0.", &[]),
        p("middle_block.2.", "mid_block.resnets.1.", RESNET),
    ];
    let mut i = 1;
    for (b, (&l, kind)) in layers.iter().zip(&cfg.down_block_types).enumerate() {
        for j in 0..l {
            out.push(p(format!("input_blocks.{i}.0."), format!("down_blocks.{b}.resnets.{j}."), RESNET));
            if attn(kind) {
                out.push(p(format!("input_blocks.{i}.1."), format!("down_blocks.{b}.attentions.{j}."), &[]));
            }
            i += 1;
        }
        if b + 1 < nb {
            out.push(p(format!("input_blocks.{i}.0.op."), format!("down_blocks.{b}.downsamplers.0.conv."), &[]));
            i += 1;
        }
    }
    let mut i = 0;
    for (b, kind) in cfg.up_block_types.iter().enumerate() {
        let l = layers[nb - 1 - b];
        for j in 0..=l {
            out.push(p(format!("output_blocks.{i}.0."), format!("up_blocks.{b}.resnets.{j}."), RESNET));
            if attn(kind) {
                out.push(p(format!("output_blocks.{i}.1."), format!("up_blocks.{b}.attentions.{j}."), &[]));
            }
            if j == l && b + 1 < nb {
                let k = if attn(kind) { 2 } else { 1 };
                out.push(p(format!("output_blocks.{i}.{k}.conv."), format!("up_blocks.{b}.upsamplers.0.conv."), &[]));
            }
            i += 1;
        }
    }
    Ok(out)
}

fn vae_prefixes(cfg: &AutoencoderKLConfig) -> Vec<Prefix> {
    let nb = cfg.block_out_channels.len();
    let l = cfg.layers_per_block;
    let mut out = vec![
        p("encoder.norm_out.", "encoder.conv_norm_out.", &[]),
        p("decoder.norm_out.", "decoder.conv_norm_out.", &[]),
        // Same names in both layouts.
        p("encoder.conv_in.", "encoder.conv_in.", &[]),
        p("encoder.conv_out.", "encoder.conv_out.", &[]),
        p("decoder.conv_in.", "decoder.conv_in.", &[]),
        p("decoder.conv_out.", "decoder.conv_out.", &[]),
        p("quant_conv.", "quant_conv.", &[]),
        p("post_quant_conv.", "post_quant_conv.", &[]),
    ];
    for part in ["encoder", "decoder"] {
        out.push(p(format!("{part}.mid.block_1."), format!("{part}.mid_block.resnets.0."), VAE_RESNET));
        out.push(p(format!("{part}.mid.block_2."), format!("{part}.mid_block.resnets.1."), VAE_RESNET));
        out.push(p(format!("{part}.mid.attn_1."), format!("{part}.mid_block.attentions.0."), VAE_ATTENTION));
    }
    for b in 0..nb {
        for j in 0..l {
            out.push(p(
                format!("encoder.down.{b}.block.{j}."),
                format!("encoder.down_blocks.{b}.resnets.{j}."),
                VAE_RESNET,
            ));
        }
        if b + 1 < nb {
            out.push(p(
                format!("encoder.down.{b}.downsample.conv."),
                format!("encoder.down_blocks.{b}.downsamplers.0.conv."),
                &[],
            ));
        }
        // The decoder's `up` list runs from the lowest resolution's opposite end.
        let k = nb - 1 - b;
        for j in 0..=l {
            out.push(p(
                format!("decoder.up.{k}.block.{j}."),
                format!("decoder.up_blocks.{b}.resnets.{j}."),
                VAE_RESNET,
            ));
        }
        if b + 1 < nb {
            out.push(p(
                format!("decoder.up.{k}.upsample.conv."),
                format!("decoder.up_blocks.{b}.upsamplers.0.conv."),
                &[],
            ));
        }
    }
    out
}

/// The diffusers name of `key` (relative to its component's prefix) by the longest matching
/// LDM prefix; `None` when no prefix matches.
fn rename(key: &str, prefixes: &[Prefix]) -> Option<String> {
    let (ldm, diffusers, inner) =
        prefixes.iter().filter(|(l, _, _)| key.starts_with(l.as_str())).max_by_key(|(l, _, _)| l.len())?;
    let mut rest = key[ldm.len()..].to_string();
    if let Some((from, to)) = inner.iter().find(|(from, _)| rest.starts_with(&format!("{from}."))) {
        rest = format!("{to}{}", &rest[from.len()..]);
    }
    Some(format!("{diffusers}{rest}"))
}

/// The OpenCLIP text tower (SD 2.x) under transformers' CLIP names; q/k/v are split from the
/// fused projection, and layers past the config's count (SD 2's penultimate-layer use) dropped.
fn open_clip(key: &str, t: &Tensor, cfg: &ClipTextConfig, out: &mut HashMap<String, Tensor>) -> Result<bool> {
    let tm = "text_model.";
    let simple = match key {
        "token_embedding.weight" => Some("embeddings.token_embedding.weight"),
        "positional_embedding" => Some("embeddings.position_embedding.weight"),
        "ln_final.weight" => Some("final_layer_norm.weight"),
        "ln_final.bias" => Some("final_layer_norm.bias"),
        "text_projection" | "logit_scale" | "attn_mask" => return Ok(true),
        _ => None,
    };
    if let Some(name) = simple {
        out.insert(format!("{tm}{name}"), t.clone());
        return Ok(true);
    }
    let Some(rest) = key.strip_prefix("transformer.resblocks.") else { return Ok(false) };
    let Some((layer, rest)) = rest.split_once('.') else { return Ok(false) };
    let Ok(layer) = layer.parse::<usize>() else { return Ok(false) };
    if layer >= cfg.num_hidden_layers {
        return Ok(true);
    }
    let base = format!("{tm}encoder.layers.{layer}.");
    let renamed = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ]
    .iter()
    .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{base}{to}{r}")));
    if let Some(name) = renamed {
        out.insert(name, t.clone());
        return Ok(true);
    }
    let fused = match rest {
        "attn.in_proj_weight" => "weight",
        "attn.in_proj_bias" => "bias",
        _ => return Ok(false),
    };
    let d = cfg.hidden_size;
    if t.dim(0)? != 3 * d {
        return Err(TillerError::Other(anyhow::anyhow!("`{key}` has {} rows, expected 3 × {d}", t.dim(0)?)));
    }
    for (i, q) in ["q", "k", "v"].iter().enumerate() {
        out.insert(format!("{base}self_attn.{q}_proj.{fused}"), t.narrow(0, i * d, d)?);
    }
    Ok(true)
}

/// Split and rename a single-file checkpoint into the three components' weights.
pub fn load(
    file: &Path,
    unet_cfg: &UNet2DConfig,
    vae_cfg: &AutoencoderKLConfig,
    te_cfg: &ClipTextConfig,
    dtype: DType,
    device: &Device,
) -> Result<(ComponentWeights, ComponentWeights, ComponentWeights)> {
    let fail = |m: String| TillerError::file(file, m);
    // SAFETY: read-only map; every tensor is copied out before it is dropped (as load_component).
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
        .map_err(|e| fail(format!("not a valid safetensors file: {e}")))?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if !names.iter().any(|n| n.starts_with(UNET)) {
        let hint = if names.iter().any(|n| n.starts_with("conditioner.embedders.")) {
            "an SDXL checkpoint (`conditioner.embedders.*`): SDXL single files are not supported yet"
        } else {
            "no `model.diffusion_model.*` keys: not a Stable Diffusion 1.x/2.x checkpoint in the original layout"
        };
        return Err(fail(format!("unknown single-file layout: {hint}")));
    }
    let unet_p = unet_prefixes(unet_cfg)?;
    let vae_p = vae_prefixes(vae_cfg);
    let (mut unet, mut vae, mut te) = (HashMap::new(), HashMap::new(), HashMap::new());
    let mut unknown = Vec::new();
    for name in &names {
        let load = || -> Result<Tensor> {
            let t = st.load(name, &Device::Cpu).map_err(|e| fail(format!("tensor `{name}`: {e}")))?;
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        if let Some(k) = name.strip_prefix(UNET) {
            match rename(k, &unet_p) {
                Some(n) => {
                    unet.insert(n, load()?);
                }
                None => unknown.push(name.clone()),
            }
        } else if let Some(k) = name.strip_prefix(VAE) {
            match rename(k, &vae_p) {
                Some(n) => {
                    let mut t = load()?;
                    // The original mid-block attention projections are 1×1 convolutions.
                    if n.contains("mid_block.attentions.0.to_") && n.ends_with(".weight") && t.rank() == 4 {
                        t = t.squeeze(3)?.squeeze(2)?;
                    }
                    vae.insert(n, t);
                }
                None => unknown.push(name.clone()),
            }
        } else if let Some(k) = name.strip_prefix(CLIP) {
            if k.ends_with("position_ids") {
                continue;
            }
            let k = if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") };
            te.insert(k, load()?);
        } else if let Some(k) = name.strip_prefix(OPEN_CLIP) {
            if !open_clip(k, &load()?, te_cfg, &mut te)? {
                unknown.push(name.clone());
            }
        }
        // Everything else (EMA copies, the training schedule's buffers) is not part of the model.
    }
    if !unknown.is_empty() {
        unknown.truncate(5);
        return Err(fail(format!(
            "unknown single-file layout: keys {} match no block of the configs",
            unknown.join(", ")
        )));
    }
    if te.is_empty() {
        return Err(fail("the checkpoint has no text encoder (`cond_stage_model.*`)".into()));
    }
    let weights = |tensors, sub: &str| ComponentWeights {
        dir: file.parent().unwrap_or(Path::new(".")).join(sub),
        files: vec![file.to_path_buf()],
        tensors,
        dtype,
        device: device.clone(),
    };
    Ok((weights(unet, "unet"), weights(vae, "vae"), weights(te, "text_encoder")))
}
