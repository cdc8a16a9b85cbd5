//! The T5 encoder (transformers' `T5EncoderModel`, T5 v1.1's gated-GELU feed-forward), built
//! from the component's `config.json` and loaded by the published tensor names (Raffel et al.,
//! "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2020).
//! SD3 and FLUX read its last hidden states as text tokens.
//!
//! T5 differs from CLIP where it matters for parity: RMS layer norms without a mean or bias,
//! attention logits without the 1/√d scale, and a learned bias per head on bucketed relative
//! positions, computed by the first layer and shared by all.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{attention, Activation, Linear};

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_proj")]
    pub feed_forward_proj: String,
}

fn d_buckets() -> usize {
    32
}
fn d_distance() -> usize {
    128
}
fn d_eps() -> f64 {
    1e-6
}
fn d_proj() -> String {
    "relu".into()
}

impl T5Config {
    /// (gated, activation) from `feed_forward_proj` ("gated-gelu", "relu", ...), as transformers
    /// reads it; `gated-gelu` means the tanh GELU (`gelu_new`).
    fn feed_forward(&self) -> Result<(bool, Activation)> {
        let (gated, act) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = if act == "gelu" && gated { Activation::GeluTanh } else { Activation::parse(act)? };
        Ok((gated, act))
    }
}

/// T5's layer norm: x / √(mean(x²) + ε) · weight, in f32 (f64 for f64 inputs).
#[derive(Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(super::nn::reduction_dtype(x.dtype()))?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(x.dtype())?;
        normed.broadcast_mul(&self.weight)
    }
}

#[derive(Clone)]
struct Block {
    norm_attn: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_ff: RmsNorm,
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
}

#[derive(Clone)]
pub struct T5EncoderModel {
    embed: Tensor,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    act: Activation,
    config: T5Config,
}

/// transformers' bidirectional `_relative_position_bucket` for `relative = key − query`.
fn bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut ret = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        ret += n;
    } else {
        let large = max_exact as f32
            + ((n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln()
                * (half - max_exact) as f32);
        ret += (large as i64).min(half - 1);
    }
    ret as usize
}

impl T5EncoderModel {
    /// `vb` at the root of `model.safetensors` (`shared.*`, `encoder.*`).
    pub fn load(vb: VarBuilder, config: &T5Config) -> Result<Self> {
        let c = config;
        let (gated, act) = c.feed_forward()?;
        let inner = c.num_heads * c.d_kv;
        let embed = if vb.contains_tensor("shared.weight") {
            vb.get((c.vocab_size, c.d_model), "shared.weight")?
        } else {
            vb.get((c.vocab_size, c.d_model), "encoder.embed_tokens.weight")?
        };
        let enc = vb.pp("encoder");
        let relative_bias = enc
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get((c.relative_attention_num_buckets, c.num_heads), "weight")?;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let b = enc.pp("block").pp(i.to_string()).pp("layer");
                let sa = b.pp("0.SelfAttention");
                let ff = b.pp("1.DenseReluDense");
                Ok(Block {
                    norm_attn: RmsNorm::load(b.pp("0.layer_norm"), c.d_model, c.layer_norm_epsilon)?,
                    q: Linear::load(sa.pp("q"), c.d_model, inner, false)?,
                    k: Linear::load(sa.pp("k"), c.d_model, inner, false)?,
                    v: Linear::load(sa.pp("v"), c.d_model, inner, false)?,
                    o: Linear::load(sa.pp("o"), inner, c.d_model, false)?,
                    norm_ff: RmsNorm::load(b.pp("1.layer_norm"), c.d_model, c.layer_norm_epsilon)?,
                    wi_0: Linear::load(ff.pp(if gated { "wi_0" } else { "wi" }), c.d_model, c.d_ff, false)?,
                    wi_1: if gated { Some(Linear::load(ff.pp("wi_1"), c.d_model, c.d_ff, false)?) } else { None },
                    wo: Linear::load(ff.pp("wo"), c.d_ff, c.d_model, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            relative_bias,
            blocks,
            final_norm: RmsNorm::load(enc.pp("final_layer_norm"), c.d_model, c.layer_norm_epsilon)?,
            act,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The position bias (heads, L, L): each head's learned value for the bucket of key − query.
    fn position_bias(&self, l: usize, device: &Device) -> Result<Tensor> {
        let c = &self.config;
        let ids: Vec<u32> = (0..l)
            .flat_map(|q| {
                (0..l).map(move |k| {
                    bucket(k as i64 - q as i64, c.relative_attention_num_buckets, c.relative_attention_max_distance)
                        as u32
                })
            })
            .collect();
        let ids = Tensor::from_vec(ids, l * l, device)?;
        // (L·L, heads) → (heads, L, L)
        self.relative_bias.index_select(&ids, 0)?.reshape((l, l, c.num_heads))?.permute((2, 0, 1))?.contiguous()
    }

    /// The last hidden states (B, L, d_model) of token ids (B, L), without an attention mask (as
    /// the SD3 and FLUX pipelines call it).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let c = &self.config;
        let dtype = self.embed.dtype();
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, c.d_model))?;
        let bias = self.position_bias(l, ids.device())?.to_dtype(DType::F32)?;
        let mask = bias.unsqueeze(0)?.repeat((b, 1, 1, 1))?.reshape((b * c.num_heads, l, l))?.to_dtype(dtype)?;
        // T5 does not scale the logits: pre-scaling q by √d cancels the kernel's 1/√d.
        let unscale = (c.d_kv as f64).sqrt();
        for block in &self.blocks {
            let h = block.norm_attn.forward(&x)?;
            let q = (block.q.forward(&h)? * unscale)?;
            let a = attention(&q, &block.k.forward(&h)?, &block.v.forward(&h)?, c.num_heads, Some(&mask))?;
            x = (x + block.o.forward(&a)?)?;
            let h = block.norm_ff.forward(&x)?;
            let mut f = self.act.apply(&block.wi_0.forward(&h)?)?;
            if let Some(wi_1) = &block.wi_1 {
                f = (f * wi_1.forward(&h)?)?;
            }
            x = (x + block.wo.forward(&f)?)?;
        }
        self.final_norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    /// transformers' buckets for 32 buckets, max distance 128 (bidirectional): exact up to ±7,
    /// then logarithmic; keys after the query use the upper half.
    #[test]
    fn relative_position_buckets() {
        let b = |r| bucket(r, 32, 128);
        assert_eq!([b(0), b(-1), b(-7), b(1), b(7)], [0, 1, 7, 17, 23]);
        assert_eq!([b(-8), b(-12), b(-16), b(-32), b(-64), b(-127), b(-1000)], [8, 9, 10, 12, 14, 15, 15]);
        assert_eq!([b(8), b(16), b(1000)], [24, 26, 31]);
    }
}
