//! CLIP vision tower (transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection`) and the
//! dual-encoder `CLIPModel` (both towers, both projections, `logit_scale`), loaded by the published
//! tensor names. Checkpoints with the same layout and other sizes (PickScore, LAION CLIP-H,
//! aesthetic-predictor backbones) load through their `config.json` alone.
//!
//! Everything on the image path is built from [`super::nn`] helpers, so the image embedding is
//! differentiable with respect to the pixel values whenever those are part of an autograd graph.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::clip_text::{ClipTextConfig, ClipTextModel, EncoderLayer, LayerDims};
use super::nn::{Activation, LayerNorm, Linear};
use super::weights::{in_component, load_component, read_config};
use crate::error::TillerError;

/// The `vision_config` section of a CLIP `config.json`; missing fields take transformers'
/// `CLIPVisionConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "default_vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_vision_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_vision_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_vision_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size", deserialize_with = "square")]
    pub image_size: usize,
    #[serde(default = "default_patch_size", deserialize_with = "square")]
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_vision_hidden() -> usize {
    768
}
fn default_vision_intermediate() -> usize {
    3072
}
fn default_vision_layers() -> usize {
    12
}
fn default_vision_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// transformers accepts `image_size`/`patch_size` as a number or a pair; the tower is square.
fn square<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Pair(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::One(n) => Ok(n),
        Size::Pair(v) if v.len() == 2 && v[0] == v[1] => Ok(v[0]),
        Size::Pair(v) => Err(serde::de::Error::custom(format!("only square sizes are supported, got {v:?}"))),
    }
}

impl ClipVisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// Output of the vision tower for a batch of pixel values.
pub struct ClipVisionOutput {
    /// (B, 1 + patches, D) after the last encoder layer (no `post_layernorm`, as transformers).
    pub last_hidden_state: Tensor,
    /// (B, D) `post_layernorm` of the class token (transformers' `pooler_output`).
    pub pooled: Tensor,
    /// (B, P) `visual_projection(pooled)`; `pooled` itself when the model has no projection.
    pub image_embeds: Tensor,
}

pub struct ClipVisionModel {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` at the root of the checkpoint; the tower's tensors may carry the `vision_model.` prefix
    /// (every published CLIP checkpoint) or not. `projection_dim` loads `visual_projection` (a
    /// `CLIPModel`'s top-level `projection_dim`, or the vision config's for
    /// `CLIPVisionModelWithProjection`).
    pub fn load(vb: VarBuilder, config: &ClipVisionConfig, projection_dim: Option<usize>) -> Result<Self> {
        let c = config;
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            candle_core::bail!("image_size {} is not a multiple of patch_size {}", c.image_size, c.patch_size);
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!("hidden_size {} is not a multiple of {} heads", c.hidden_size, c.num_attention_heads);
        }
        let act = Activation::parse(&c.hidden_act)?;
        let vm = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb.clone()
        };
        let h = c.hidden_size;
        let emb = vm.pp("embeddings");
        let patch_embedding = emb.get((h, c.num_channels, c.patch_size, c.patch_size), "patch_embedding.weight")?;
        let class_embedding = emb.get(h, "class_embedding")?;
        let position_embedding = emb.get((c.num_patches() + 1, h), "position_embedding.weight")?;
        let dims = LayerDims {
            hidden: h,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(vm.pp("encoder.layers").pp(i.to_string()), dims, act))
            .collect::<Result<Vec<_>>>()?;
        let visual_projection = match projection_dim {
            Some(p) => Some(Linear::load(vb.pp("visual_projection"), h, p, false)?),
            None => None,
        };
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            // sic: transformers' name for the layer norm before the encoder.
            pre_layrnorm: LayerNorm::load(vm.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(vm.pp("post_layernorm"), h, c.layer_norm_eps)?,
            visual_projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Encode normalised pixel values (B, C, image_size, image_size).
    pub fn forward(&self, pixels: &Tensor) -> Result<ClipVisionOutput> {
        let (b, c, hh, ww) = pixels.dims4()?;
        let cfg = &self.config;
        if c != cfg.num_channels || hh != cfg.image_size || ww != cfg.image_size {
            candle_core::bail!(
                "CLIP vision tower expects pixel values ({b}, {}, {s}, {s}), got {:?}",
                cfg.num_channels,
                pixels.dims(),
                s = cfg.image_size
            );
        }
        let pixels = pixels.to_dtype(self.patch_embedding.dtype())?;
        // Non-overlapping patches: a stride-p convolution. candle's conv2d has a backward pass.
        let patches = pixels.conv2d(&self.patch_embedding, 0, cfg.patch_size, 1, 1)?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let h = cfg.hidden_size;
        let cls = self.class_embedding.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        let pooled = self.post_layernorm.forward(&x.i((.., 0))?)?;
        let image_embeds = match &self.visual_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled.clone(),
        };
        Ok(ClipVisionOutput { last_hidden_state: x, pooled, image_embeds })
    }
}

/// A `CLIPModel` `config.json`: both tower configs and the shared projection size.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Parse a `CLIPModel` config the way transformers reads it: missing fields take the
    /// defaults, and the legacy `*_config_dict` sections override `*_config`.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let section = |name: &str| -> std::result::Result<serde_json::Map<String, Value>, String> {
            let mut out = serde_json::Map::new();
            let mut found = false;
            for key in [format!("{name}_config"), format!("{name}_config_dict")] {
                match v.get(&key) {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(o)) => {
                        found = true;
                        out.extend(o.clone());
                    }
                    Some(_) => return Err(format!("`{key}` must be an object")),
                }
            }
            if !found {
                return Err(format!("no `{name}_config` section: not a CLIPModel config"));
            }
            // Only the fields our configs read; `architectures` may be null in the sections.
            out.remove("architectures");
            Ok(out)
        };
        let mut text = section("text")?;
        for (k, d) in [
            ("vocab_size", 49408),
            ("hidden_size", 512),
            ("intermediate_size", 2048),
            ("num_hidden_layers", 12),
            ("num_attention_heads", 8),
        ] {
            text.entry(k).or_insert(Value::from(d));
        }
        let text: ClipTextConfig =
            serde_json::from_value(Value::Object(text)).map_err(|e| format!("text_config: {e}"))?;
        let vision: ClipVisionConfig =
            serde_json::from_value(Value::Object(section("vision")?)).map_err(|e| format!("vision_config: {e}"))?;
        let projection_dim = match v.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(p) => p.as_u64().ok_or("`projection_dim` must be a positive integer")? as usize,
        };
        Ok(Self { text, vision, projection_dim })
    }

    /// Read `config.json`; errors name the file.
    pub fn load(path: &Path) -> crate::error::Result<Self> {
        let v: Value = read_config(path)?;
        Self::from_json(&v).map_err(|e| TillerError::file(path, format!("malformed CLIP config: {e}")))
    }
}

/// transformers' `CLIPModel`: text and vision towers, their projections into the shared space and
/// the learnt temperature.
pub struct ClipModel {
    text: ClipTextModel,
    text_projection: Linear,
    vision: ClipVisionModel,
    logit_scale: f64,
    config: ClipConfig,
}

impl ClipModel {
    /// Build from tensors named as in a `CLIPModel` checkpoint.
    pub fn from_var_builder(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        let text_cfg = ClipTextConfig { architectures: Vec::new(), ..config.text.clone() };
        let text = ClipTextModel::load(vb.clone(), &text_cfg)?;
        let text_projection =
            Linear::load(vb.pp("text_projection"), config.text.hidden_size, config.projection_dim, false)?;
        let vision = ClipVisionModel::load(vb.clone(), &config.vision, Some(config.projection_dim))?;
        let scale = vb.get_unchecked("logit_scale")?;
        if scale.elem_count() != 1 {
            candle_core::bail!("logit_scale must hold one value, got shape {:?}", scale.dims());
        }
        let logit_scale = scale.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        Ok(Self { text, text_projection, vision, logit_scale, config: config.clone() })
    }

    /// Load `dir/config.json` and `dir/model.safetensors` (or a sharded set) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::error::Result<Self> {
        if !dir.is_dir() {
            return Err(TillerError::file(dir, "CLIP model directory is missing"));
        }
        let config = ClipConfig::load(&dir.join("config.json"))?;
        let weights = load_component(dir, "model", None, dtype, device)?;
        in_component(dir, Self::from_var_builder(weights.var_builder(), &config))
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn vision(&self) -> &ClipVisionModel {
        &self.vision
    }

    pub fn text(&self) -> &ClipTextModel {
        &self.text
    }

    /// The raw `logit_scale` parameter; similarities are multiplied by its exponential.
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }

    /// (B, P) projected text embeddings of (B, L) token ids (not normalised).
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(&self.text.forward(ids, 0)?.pooled)
    }

    /// (B, P) projected image embeddings of normalised pixel values (not normalised).
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(pixels)?.image_embeds)
    }
}
