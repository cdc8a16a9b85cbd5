//! CLIP text encoder (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`), built
//! from the component's `config.json` and loaded by the published tensor names.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{attention, Activation, LayerNorm, Linear};

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

impl ClipTextConfig {
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }
}

/// Sizes of one pre-norm transformer layer; CLIP's text and vision towers share the layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
}

#[derive(Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(vb: VarBuilder, d: LayerDims, act: Activation) -> Result<Self> {
        let h = d.hidden;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), h, d.eps)?,
            q_proj: Linear::load(attn.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(attn.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(attn.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(attn.pp("out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), h, d.eps)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), h, d.intermediate, true)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), d.intermediate, h, true)?,
            heads: d.heads,
            act,
        })
    }

    /// `mask` is added to the attention scores (the text tower's causal mask; none for vision).
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = self.q_proj.forward(&h)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let a = self.out_proj.forward(&attention(&q, &k, &v, self.heads, mask)?)?;
        let x = (x + a)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// Output of the text encoder for a batch of token ids.
pub struct ClipTextOutput {
    /// (B, L, D) after `final_layer_norm` (or the layer chosen by `clip_skip`).
    pub hidden_states: Tensor,
    /// (B, D) final hidden state at the end-of-text token (projected when the model has a
    /// `text_projection`).
    pub pooled: Tensor,
}

#[derive(Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` at the root of `model.safetensors`. Accepts both the `text_model.`-prefixed names and
    /// flat ones.
    pub fn load(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let act = Activation::parse(&config.hidden_act)?;
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let h = config.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = emb.get((config.vocab_size, h), "token_embedding.weight")?;
        let position_embedding = emb.get((config.max_position_embeddings, h), "position_embedding.weight")?;
        let dims = LayerDims {
            hidden: h,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(tm.pp("encoder.layers").pp(i.to_string()), dims, act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(tm.pp("final_layer_norm"), h, config.layer_norm_eps)?;
        let text_projection = if config.with_projection() {
            let dim = config.projection_dim.unwrap_or(h);
            Some(Linear::load(vb.pp("text_projection"), h, dim, false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encode (B, L) token ids. `clip_skip = k` returns `final_layer_norm` of the hidden state
    /// k layers before the last (diffusers' convention); 0 = last layer.
    pub fn forward(&self, ids: &Tensor, clip_skip: usize) -> Result<ClipTextOutput> {
        let keep = self.layers.len().saturating_sub(clip_skip);
        self.encode(ids, keep, clip_skip > 0)
    }

    /// Encode for SDXL pipelines: the hidden states are transformers' `hidden_states[-(k + 2)]`,
    /// the raw output of the layer before the last (`clip_skip = k` more layers before it), with
    /// no final layer norm.
    pub fn forward_penultimate(&self, ids: &Tensor, clip_skip: usize) -> Result<ClipTextOutput> {
        let keep = self.layers.len().saturating_sub(clip_skip + 1);
        if keep == 0 {
            candle_core::bail!("clip_skip {clip_skip} leaves no layer of {}", self.layers.len());
        }
        self.encode(ids, keep, false)
    }

    /// Run the layers; the hidden states are the output of the first `keep` layers (normed by
    /// `final_layer_norm` when `norm_kept`, or when they are the last layer's).
    fn encode(&self, ids: &Tensor, keep: usize, norm_kept: bool) -> Result<ClipTextOutput> {
        let (b, l) = ids.dims2()?;
        if l > self.config.max_position_embeddings {
            candle_core::bail!("{l} tokens exceed max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let dtype = self.token_embedding.dtype();
        let tok = self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, ()))?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = causal_mask(l, dtype, ids.device())?;
        let mut kept = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, Some(&mask))?;
            if i + 1 == keep {
                kept = x.clone();
            }
        }
        let hidden_full = self.final_layer_norm.forward(&x)?;
        let hidden_states = if keep >= self.layers.len() {
            hidden_full.clone()
        } else if norm_kept {
            self.final_layer_norm.forward(&kept)?
        } else {
            kept
        };
        // Pooled output at the first end-of-text token.
        let ids_v: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let rows = ids_v
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let pos = eos_position(row, self.config.eos_token_id);
                hidden_full.i((i, pos))?.unsqueeze(0)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut pooled = Tensor::cat(&rows, 0)?;
        if let Some(p) = &self.text_projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(ClipTextOutput { hidden_states, pooled })
    }
}

/// transformers: with the legacy `eos_token_id == 2` the position is argmax(ids) (eos has the
/// largest id in CLIP's vocabulary), otherwise the first occurrence of `eos_token_id`.
fn eos_position(ids: &[u32], eos: u32) -> usize {
    let argmax = || ids.iter().enumerate().fold(0, |best, (i, &v)| if v > ids[best] { i } else { best });
    if eos == 2 {
        return argmax();
    }
    ids.iter().position(|&t| t == eos).unwrap_or_else(argmax)
}

fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(v, (1, l, l), device)?.to_dtype(dtype)
}
