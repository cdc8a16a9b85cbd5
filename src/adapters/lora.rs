//! Reading LoRA files: format detection and normalisation of PEFT/diffusers, old diffusers and
//! kohya/A1111 key layouts into one list of low-rank deltas.
//!
//! Every layer becomes (component, module key, down, up, scale) with the delta
//! ΔW = scale · up · down (convolutions: up (out, r, 1, 1) after down (r, in, kh, kw)). Which
//! module a key names is decided later, against the target model's own weight names
//! ([`super::apply::TargetIndex`]), so kohya's underscore-mangled names need no hand-written
//! table for SD 1.x/2.x, and a file for another model family fails to match.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::AdapterError;

/// Which network a layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
    /// The denoising transformer of flow models (SD3, FLUX).
    Transformer,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Transformer => "transformer",
        }
    }
}

/// The key layout a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// diffusers `save_lora_weights` / PEFT: `unet.<module>.lora_A.weight`.
    Peft,
    /// Older diffusers: `unet.<...>.processor.to_q_lora.down.weight`,
    /// `text_encoder.<...>.q_proj.lora_linear_layer.down.weight`.
    DiffusersOld,
    /// kohya / A1111: `lora_unet_<module_with_underscores>.lora_down.weight` + `.alpha`.
    Kohya,
}

/// How a layer names its target module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleKey {
    /// A dotted diffusers/transformers module path (`down_blocks.0.attentions.0.proj_in`).
    Dotted(String),
    /// kohya's path with dots replaced by underscores.
    Underscored(String),
}

impl std::fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleKey::Dotted(s) | ModuleKey::Underscored(s) => f.write_str(s),
        }
    }
}

/// One low-rank delta, f32 on the CPU.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub component: Component,
    pub key: ModuleKey,
    /// (r, in) or (r, in, kh, kw).
    pub down: Tensor,
    /// (out, r) or (out, r, 1, 1).
    pub up: Tensor,
    /// alpha / r (or alpha / √r for rsLoRA); the user's weight multiplies it.
    pub scale: f64,
    /// The file's key for this layer (without the `.lora_down.weight` suffix), for messages.
    pub source: String,
}

impl LoraLayer {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }
}

/// A parsed LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub format: LoraFormat,
    pub layers: Vec<LoraLayer>,
}

impl LoraFile {
    /// Largest rank among the layers.
    pub fn rank(&self) -> usize {
        self.layers.iter().map(|l| l.rank()).max().unwrap_or(0)
    }
}

/// PEFT scaling configuration (LoraConfig's fields that matter for inference).
#[derive(Debug, Clone, Default)]
pub struct PeftScaling {
    pub lora_alpha: Option<f64>,
    pub r: Option<usize>,
    pub use_rslora: bool,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub rank_pattern: BTreeMap<String, usize>,
}

impl PeftScaling {
    /// Read LoraConfig fields from a JSON object (adapter_config.json or one component's entry
    /// of diffusers' `lora_adapter_metadata`).
    pub fn from_json(v: &serde_json::Value) -> Self {
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let map_f = |k: &str| -> BTreeMap<String, f64> {
            v.get(k)
                .and_then(|m| m.as_object())
                .map(|m| m.iter().filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f))).collect())
                .unwrap_or_default()
        };
        Self {
            lora_alpha: num("lora_alpha"),
            r: num("r").map(|x| x as usize),
            use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            alpha_pattern: map_f("alpha_pattern"),
            rank_pattern: map_f("rank_pattern").into_iter().map(|(k, x)| (k, x as usize)).collect(),
        }
    }

    /// PEFT's per-module scale for a module with rank `rank` (read from the tensors, as
    /// diffusers does). Patterns match a module whose path equals the key or ends with `.key`.
    pub fn scale(&self, module: &str, rank: usize) -> f64 {
        let matches = |k: &str| module == k || module.ends_with(&format!(".{k}"));
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
            // No alpha anywhere: diffusers sets lora_alpha = r, i.e. scale 1.
            .unwrap_or(rank as f64);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// Where the scaling of a PEFT file comes from: `adapter_config.json` beside it wins over the
/// safetensors metadata.
#[derive(Debug, Clone, Default)]
pub struct ScalingSources {
    /// Parsed `adapter_config.json`, if present.
    pub adapter_config: Option<serde_json::Value>,
}

/// Detect the format of `tensors` and normalise every layer.
pub fn parse(
    tensors: HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
    sources: &ScalingSources,
) -> Result<LoraFile, AdapterError> {
    if tensors.is_empty() {
        return Err(AdapterError::invalid("the file holds no tensors"));
    }
    let kohya =
        tensors.keys().all(|k| ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"].iter().any(|p| k.starts_with(p)));
    if kohya {
        return parse_kohya(tensors);
    }
    if tensors.keys().any(|k| k.contains(".lora_A.") || k.ends_with(".lora_A")) {
        return parse_peft(tensors, metadata, sources);
    }
    if tensors.keys().any(|k| k.contains("_lora.down.") || k.contains(".lora_linear_layer.down.")) {
        return parse_old_diffusers(tensors);
    }
    let mut sample: Vec<&String> = tensors.keys().collect();
    sample.sort();
    sample.truncate(3);
    Err(AdapterError::invalid(format!(
        "unrecognised LoRA key layout (expected kohya `lora_unet_*.lora_down.weight` or PEFT \
         `unet.*.lora_A.weight`); first keys: {sample:?}"
    )))
}

fn component_of_prefix(key: &str) -> Option<(Component, &str)> {
    for (prefix, c) in [
        ("unet.", Component::Unet),
        ("text_encoder.", Component::TextEncoder),
        ("text_encoder_2.", Component::TextEncoder2),
        ("transformer.", Component::Transformer),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return Some((c, rest));
        }
    }
    None
}

/// Pair `<stem><down_suffix>` with `<stem><up_suffix>`; every key must belong to a pair (or be
/// accepted by `extra`). Returns stem → (down, up).
fn pair_up(
    tensors: &mut HashMap<String, Tensor>,
    down_suffixes: &[&str],
    up_suffixes: &[&str],
) -> Result<BTreeMap<String, (Tensor, Tensor)>, AdapterError> {
    let mut stems: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for k in keys {
        if let Some((stem, _)) = down_suffixes.iter().find_map(|s| k.strip_suffix(s).map(|st| (st.to_string(), s))) {
            let t = tensors.remove(&k).expect("listed");
            stems.entry(stem).or_default().0 = Some(t);
        } else if let Some((stem, _)) = up_suffixes.iter().find_map(|s| k.strip_suffix(s).map(|st| (st.to_string(), s)))
        {
            let t = tensors.remove(&k).expect("listed");
            stems.entry(stem).or_default().1 = Some(t);
        }
    }
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    for (stem, (d, u)) in stems {
        match (d, u) {
            (Some(d), Some(u)) => {
                out.insert(stem, (d, u));
            }
            (Some(_), None) => missing.push(format!("{stem}: up/B matrix missing")),
            (None, Some(_)) => missing.push(format!("{stem}: down/A matrix missing")),
            (None, None) => {}
        }
    }
    if !missing.is_empty() {
        return Err(AdapterError::invalid(format!("unpaired LoRA tensors: {}", missing.join("; "))));
    }
    Ok(out)
}

fn to_f32(t: Tensor) -> Result<Tensor, AdapterError> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// Check ranks and dimensionality of a (down, up) pair.
fn check_pair(stem: &str, down: &Tensor, up: &Tensor) -> Result<(), AdapterError> {
    let (d, u) = (down.dims(), up.dims());
    let ok = match (d.len(), u.len()) {
        (2, 2) => u[1] == d[0],
        (4, 4) => u[1] == d[0] && u[2] == 1 && u[3] == 1,
        _ => false,
    };
    if !ok || d[0] == 0 {
        return Err(AdapterError::invalid(format!(
            "{stem}: down {d:?} and up {u:?} are not a rank-r pair ((r, in[, k, k]) and (out, r[, 1, 1]))"
        )));
    }
    Ok(())
}

fn leftovers(tensors: &HashMap<String, Tensor>) -> Result<(), AdapterError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    Err(AdapterError::invalid(format!(
        "{} keys are not LoRA tensors of this format: {}",
        keys.len(),
        keys.iter().take(10).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    )))
}

fn parse_kohya(mut tensors: HashMap<String, Tensor>) -> Result<LoraFile, AdapterError> {
    // DoRA magnitudes would need the base weight norm; refuse them rather than apply a wrong delta.
    if let Some(k) = tensors.keys().find(|k| k.ends_with(".dora_scale")) {
        return Err(AdapterError::invalid(format!("DoRA (`{k}`) is not supported")));
    }
    let mut alphas: HashMap<String, f64> = HashMap::new();
    let alpha_keys: Vec<String> = tensors.keys().filter(|k| k.ends_with(".alpha")).cloned().collect();
    for k in alpha_keys {
        let t = tensors.remove(&k).expect("listed");
        if t.elem_count() != 1 {
            return Err(AdapterError::invalid(format!("{k}: alpha must be a scalar, got shape {:?}", t.dims())));
        }
        let v = to_f32(t)?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        if !v.is_finite() {
            return Err(AdapterError::invalid(format!("{k}: alpha is not finite")));
        }
        alphas.insert(k.trim_end_matches(".alpha").to_string(), v);
    }
    let pairs = pair_up(&mut tensors, &[".lora_down.weight"], &[".lora_up.weight"])?;
    leftovers(&tensors)?;
    let mut layers = Vec::with_capacity(pairs.len());
    for (stem, (down, up)) in pairs {
        let (down, up) = (to_f32(down)?, to_f32(up)?);
        check_pair(&stem, &down, &up)?;
        let rank = down.dims()[0];
        // No alpha (or 0): scale 1, as kohya, A1111 and ComfyUI do.
        let scale = match alphas.remove(&stem) {
            Some(a) if a != 0.0 => a / rank as f64,
            _ => 1.0,
        };
        let (component, name) = if let Some(r) = stem.strip_prefix("lora_unet_") {
            (Component::Unet, r)
        } else if let Some(r) = stem.strip_prefix("lora_te1_") {
            (Component::TextEncoder, r)
        } else if let Some(r) = stem.strip_prefix("lora_te2_") {
            (Component::TextEncoder2, r)
        } else if let Some(r) = stem.strip_prefix("lora_te_") {
            (Component::TextEncoder, r)
        } else {
            return Err(AdapterError::invalid(format!("{stem}: unknown kohya prefix")));
        };
        layers.push(LoraLayer {
            component,
            key: ModuleKey::Underscored(name.to_string()),
            down,
            up,
            scale,
            source: stem.clone(),
        });
    }
    if let Some(k) = alphas.keys().next() {
        return Err(AdapterError::invalid(format!("{k}.alpha has no lora_down/lora_up pair")));
    }
    Ok(LoraFile { format: LoraFormat::Kohya, layers })
}

/// Per-component PEFT scaling: adapter_config.json, else diffusers' `lora_adapter_metadata`
/// (a JSON object keyed by component, or `<component>.<field>` flat keys), else none.
fn peft_scalings(metadata: &HashMap<String, String>, sources: &ScalingSources) -> HashMap<Component, PeftScaling> {
    let mut out = HashMap::new();
    if let Some(cfg) = &sources.adapter_config {
        let s = PeftScaling::from_json(cfg);
        for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2, Component::Transformer] {
            out.insert(c, s.clone());
        }
        return out;
    }
    if let Some(meta) =
        metadata.get("lora_adapter_metadata").and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
    {
        for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2, Component::Transformer] {
            if let Some(v) = meta.get(c.name()) {
                out.insert(c, PeftScaling::from_json(v));
            } else {
                // Flat form: {"unet.r": 4, "unet.lora_alpha": 8, ...}
                let prefix = format!("{}.", c.name());
                let flat: serde_json::Map<String, serde_json::Value> = meta
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v.clone())))
                            .collect()
                    })
                    .unwrap_or_default();
                if !flat.is_empty() {
                    out.insert(c, PeftScaling::from_json(&serde_json::Value::Object(flat)));
                }
            }
        }
    }
    out
}

fn parse_peft(
    mut tensors: HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
    sources: &ScalingSources,
) -> Result<LoraFile, AdapterError> {
    if let Some(k) = tensors.keys().find(|k| k.contains("lora_magnitude_vector")) {
        return Err(AdapterError::invalid(format!("DoRA (`{k}`) is not supported")));
    }
    // `.lora_A.<adapter>.weight` (adapter name embedded) is normalised to `.lora_A.weight`.
    let renamed: HashMap<String, Tensor> = tensors
        .drain()
        .map(|(k, t)| {
            let k = match (k.find(".lora_A."), k.find(".lora_B.")) {
                (Some(i), _) | (_, Some(i)) if k.ends_with(".weight") && k[i + 8..].contains('.') => {
                    format!("{}.weight", &k[..i + 7])
                }
                _ => k,
            };
            (k, t)
        })
        .collect();
    let mut tensors = renamed;
    let pairs = pair_up(&mut tensors, &[".lora_A.weight", ".lora_A"], &[".lora_B.weight", ".lora_B"])?;
    leftovers(&tensors)?;
    let scalings = peft_scalings(metadata, sources);
    let mut layers = Vec::with_capacity(pairs.len());
    for (stem, (down, up)) in pairs {
        let (down, up) = (to_f32(down)?, to_f32(up)?);
        check_pair(&stem, &down, &up)?;
        let (component, module) = component_of_prefix(&stem).ok_or_else(|| {
            AdapterError::invalid(format!("{stem}: expected a `unet.`, `text_encoder.` or `text_encoder_2.` prefix"))
        })?;
        // diffusers reads the rank from lora_B's second dimension.
        let rank = up.dims()[1];
        let scale = scalings.get(&component).map(|s| s.scale(module, rank)).unwrap_or(1.0);
        layers.push(LoraLayer {
            component,
            key: ModuleKey::Dotted(module.to_string()),
            down,
            up,
            scale,
            source: stem.clone(),
        });
    }
    Ok(LoraFile { format: LoraFormat::Peft, layers })
}

fn parse_old_diffusers(mut tensors: HashMap<String, Tensor>) -> Result<LoraFile, AdapterError> {
    let pairs = pair_up(
        &mut tensors,
        &["_lora.down.weight", ".lora_linear_layer.down.weight"],
        &["_lora.up.weight", ".lora_linear_layer.up.weight"],
    )?;
    leftovers(&tensors)?;
    let mut layers = Vec::with_capacity(pairs.len());
    for (stem, (down, up)) in pairs {
        let (down, up) = (to_f32(down)?, to_f32(up)?);
        check_pair(&stem, &down, &up)?;
        let (component, rest) = component_of_prefix(&stem)
            .ok_or_else(|| AdapterError::invalid(format!("{stem}: expected a `unet.` or `text_encoder.` prefix")))?;
        // `...attn1.processor.to_q` → `...attn1.to_q`; `to_out` → `to_out.0`.
        let module = match rest.split_once(".processor.") {
            Some((head, proj)) => {
                let proj = if proj == "to_out" { "to_out.0" } else { proj };
                format!("{head}.{proj}")
            }
            None => rest.to_string(),
        };
        layers.push(LoraLayer {
            component,
            key: ModuleKey::Dotted(module),
            down,
            up,
            scale: 1.0,
            source: stem.clone(),
        });
    }
    Ok(LoraFile { format: LoraFormat::DiffusersOld, layers })
}

/// Map an SDXL kohya UNet name in the original Stability block layout
/// (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) to the diffusers underscore form
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`). `layers_per_block` comes from
/// the UNet config (2 for SDXL). Names already in diffusers form are returned unchanged.
pub fn sgm_to_diffusers(name: &str, layers_per_block: usize) -> String {
    let per = layers_per_block + 1;
    let take2 = |s: &str| -> Option<(usize, usize, String)> {
        let mut it = s.splitn(3, '_');
        let a = it.next()?.parse().ok()?;
        let b = it.next()?.parse().ok()?;
        Some((a, b, it.next().unwrap_or("").to_string()))
    };
    let resnet_inner = |rest: &str| -> String {
        for (from, to) in [
            ("in_layers_2", "conv1"),
            ("out_layers_3", "conv2"),
            ("emb_layers_1", "time_emb_proj"),
            ("skip_connection", "conv_shortcut"),
        ] {
            if let Some(r) = rest.strip_prefix(from) {
                return format!("{to}{r}");
            }
        }
        rest.to_string()
    };
    if let Some(rest) = name.strip_prefix("input_blocks_") {
        if let Some((i, j, tail)) = take2(rest) {
            if i == 0 {
                return format!("conv_in{}", if tail.is_empty() { String::new() } else { format!("_{tail}") });
            }
            let (block, within) = ((i - 1) / per, (i - 1) % per);
            return if within == layers_per_block {
                // input_blocks_{i}_0_op → downsamplers_0_conv
                format!("down_blocks_{block}_downsamplers_0_conv")
            } else if j == 0 {
                format!("down_blocks_{block}_resnets_{within}_{}", resnet_inner(&tail))
            } else {
                format!("down_blocks_{block}_attentions_{within}_{tail}")
            };
        }
    }
    if let Some(rest) = name.strip_prefix("middle_block_") {
        if let Some((j, tail)) = rest.split_once('_').and_then(|(a, t)| a.parse::<usize>().ok().map(|a| (a, t))) {
            return match j {
                0 => format!("mid_block_resnets_0_{}", resnet_inner(tail)),
                1 => format!("mid_block_attentions_0_{tail}"),
                _ => format!("mid_block_resnets_1_{}", resnet_inner(tail)),
            };
        }
    }
    if let Some(rest) = name.strip_prefix("output_blocks_") {
        if let Some((i, j, tail)) = take2(rest) {
            let (block, within) = (i / per, i % per);
            if j == 0 {
                return format!("up_blocks_{block}_resnets_{within}_{}", resnet_inner(&tail));
            }
            // The upsampler conv sits at index 1 (no attention) or 2 after the attention.
            if tail.starts_with("conv") {
                return format!("up_blocks_{block}_upsamplers_0_{tail}");
            }
            return format!("up_blocks_{block}_attentions_{within}_{tail}");
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_names_map_to_diffusers_blocks() {
        let m = |s| sgm_to_diffusers(s, 2);
        assert_eq!(
            m("input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(m("input_blocks_1_0_in_layers_2"), "down_blocks_0_resnets_0_conv1");
        assert_eq!(m("input_blocks_3_0_op"), "down_blocks_0_downsamplers_0_conv");
        assert_eq!(m("input_blocks_5_0_skip_connection"), "down_blocks_1_resnets_1_conv_shortcut");
        assert_eq!(m("middle_block_1_proj_in"), "mid_block_attentions_0_proj_in");
        assert_eq!(m("middle_block_2_emb_layers_1"), "mid_block_resnets_1_time_emb_proj");
        assert_eq!(m("output_blocks_2_0_out_layers_3"), "up_blocks_0_resnets_2_conv2");
        assert_eq!(
            m("output_blocks_5_1_transformer_blocks_1_ff_net_2"),
            "up_blocks_1_attentions_2_transformer_blocks_1_ff_net_2"
        );
        assert_eq!(m("output_blocks_2_2_conv"), "up_blocks_0_upsamplers_0_conv");
        assert_eq!(m("down_blocks_0_attentions_0_proj_in"), "down_blocks_0_attentions_0_proj_in");
    }

    #[test]
    fn peft_scale_follows_alpha_rank_and_patterns() {
        let s = PeftScaling::from_json(&serde_json::json!({
            "r": 4, "lora_alpha": 8, "alpha_pattern": {"attn2.to_k": 2}, "use_rslora": false
        }));
        assert_eq!(s.scale("down_blocks.0.attn1.to_q", 4), 2.0);
        assert_eq!(s.scale("down_blocks.0.attn2.to_k", 4), 0.5);
        let rs = PeftScaling { lora_alpha: Some(8.0), use_rslora: true, ..Default::default() };
        assert_eq!(rs.scale("x", 4), 4.0);
        assert_eq!(PeftScaling::default().scale("x", 4), 1.0);
    }
}
