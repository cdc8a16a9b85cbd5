//! FLUX.1's transformer (diffusers `FluxTransformer2DModel`), built from the component's
//! `config.json` and loaded by the published tensor names.
//!
//! Double-stream blocks (separate weights for text and image tokens, joint attention, text
//! first) are followed by single-stream blocks over the joined sequence (attention and MLP in
//! parallel). Positions enter as rotary embeddings over three id axes (text tokens all zero,
//! image tokens (0, row, column) of the packed 2×2 patches). FLUX-dev adds a guidance
//! embedding; schnell has none. Built from ops with a backward (ReNO, FlowChef).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::mmdit::{modulate, plain_norm, AdaNorm, FeedForward, HeadRmsNorm, Mlp2};
use super::nn::{attention, Linear};
use super::unet_2d::timestep_embedding;

#[derive(Debug, Clone, Deserialize)]
pub struct FluxTransformerConfig {
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn d_patch() -> usize {
    1
}
fn d_in() -> usize {
    64
}
fn d_layers() -> usize {
    19
}
fn d_single() -> usize {
    38
}
fn d_head_dim() -> usize {
    128
}
fn d_heads() -> usize {
    24
}
fn d_joint() -> usize {
    4096
}
fn d_pooled() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxTransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// Rotary embedding tables (cos, sin), each (N, head_dim), of position `ids` (N, axes):
/// per axis `repeat_interleave(2)` of cos/sin(pos · θ^(−2j/dim)), frequencies in f64.
pub fn rope_tables(ids: &[[f32; 3]], axes: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let width: usize = axes.iter().sum();
    let mut cos = Vec::with_capacity(ids.len() * width);
    let mut sin = Vec::with_capacity(ids.len() * width);
    for id in ids {
        for (a, &dim) in axes.iter().enumerate() {
            for j in 0..dim / 2 {
                let freq = 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64);
                let angle = id[a] as f64 * freq;
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    Ok((Tensor::from_vec(cos, (ids.len(), width), device)?, Tensor::from_vec(sin, (ids.len(), width), device)?))
}

/// `x·cos + rotate(x)·sin` on (B, N, H·d), pairs (x₂ᵢ, x₂ᵢ₊₁) ↦ (−x₂ᵢ₊₁, x₂ᵢ).
fn apply_rope(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, n, inner) = x.dims3()?;
    let d = inner / heads;
    let h = x.reshape((b, n, heads, d / 2, 2))?;
    let (re, im) = (h.narrow(4, 0, 1)?, h.narrow(4, 1, 1)?);
    let rotated = Tensor::cat(&[&im.neg()?, &re], 4)?.reshape((b, n, heads, d))?;
    let x4 = x.reshape((b, n, heads, d))?;
    let (c, s) = (cos.reshape((1, n, 1, d))?.to_dtype(x.dtype())?, sin.reshape((1, n, 1, d))?.to_dtype(x.dtype())?);
    (x4.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?)?.reshape((b, n, inner))
}

#[derive(Clone)]
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: HeadRmsNorm,
    norm_k: HeadRmsNorm,
}

impl Qkv {
    fn load(vb: &VarBuilder, names: [&str; 5], dim: usize, head_dim: usize) -> Result<Self> {
        let norm = |n: &str| -> Result<HeadRmsNorm> { Ok(HeadRmsNorm { weight: vb.pp(n).get(head_dim, "weight")? }) };
        Ok(Self {
            q: Linear::load(vb.pp(names[0]), dim, dim, true)?,
            k: Linear::load(vb.pp(names[1]), dim, dim, true)?,
            v: Linear::load(vb.pp(names[2]), dim, dim, true)?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
        })
    }
    fn project(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            self.norm_q.forward(&self.q.forward(x)?, heads)?,
            self.norm_k.forward(&self.k.forward(x)?, heads)?,
            self.v.forward(x)?,
        ))
    }
}

/// Attention over `q, k, v` (B, N, H·d) with rotary positions.
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, rope: &(Tensor, Tensor)) -> Result<Tensor> {
    let q = apply_rope(q, heads, &rope.0, &rope.1)?;
    let k = apply_rope(k, heads, &rope.0, &rope.1)?;
    attention(&q, &k, v, heads, None)
}

#[derive(Clone)]
struct DoubleBlock {
    norm1: AdaNorm,
    norm1_context: AdaNorm,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    norm2: super::nn::LayerNorm,
    ff: FeedForward,
    ff_context: FeedForward,
}

#[derive(Clone)]
struct SingleBlock {
    norm: AdaNorm,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
}

#[derive(Clone)]
pub struct FluxTransformer2DModel {
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: AdaNorm,
    proj_out: Linear,
    config: FluxTransformerConfig,
}

impl FluxTransformer2DModel {
    pub fn load(vb: VarBuilder, config: &FluxTransformerConfig) -> Result<Self> {
        let c = config;
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        if c.axes_dims_rope.len() != 3 || c.axes_dims_rope.iter().sum::<usize>() != hd {
            candle_core::bail!(
                "axes_dims_rope {:?} must be three axes summing to attention_head_dim {hd}",
                c.axes_dims_rope
            );
        }
        if c.patch_size != 1 {
            candle_core::bail!(
                "patch_size {} is not supported (FLUX packs 2×2 patches outside the transformer)",
                c.patch_size
            );
        }
        let tte = vb.pp("time_text_embed");
        let ln = plain_norm(dim, 1e-6, &vb)?;
        let double = (0..c.num_layers)
            .map(|i| {
                let b = vb.pp("transformer_blocks").pp(i.to_string());
                let a = b.pp("attn");
                Ok(DoubleBlock {
                    norm1: AdaNorm::load(b.pp("norm1"), dim, 6)?,
                    norm1_context: AdaNorm::load(b.pp("norm1_context"), dim, 6)?,
                    img: Qkv::load(&a, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], dim, hd)?,
                    txt: Qkv::load(
                        &a,
                        ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                        dim,
                        hd,
                    )?,
                    to_out: Linear::load(a.pp("to_out.0"), dim, dim, true)?,
                    to_add_out: Linear::load(a.pp("to_add_out"), dim, dim, true)?,
                    norm2: ln.clone(),
                    ff: FeedForward::load(b.pp("ff"), dim)?,
                    ff_context: FeedForward::load(b.pp("ff_context"), dim)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..c.num_single_layers)
            .map(|i| {
                let b = vb.pp("single_transformer_blocks").pp(i.to_string());
                Ok(SingleBlock {
                    norm: AdaNorm::load(b.pp("norm"), dim, 3)?,
                    qkv: Qkv::load(&b.pp("attn"), ["to_q", "to_k", "to_v", "norm_q", "norm_k"], dim, hd)?,
                    proj_mlp: Linear::load(b.pp("proj_mlp"), dim, 4 * dim, true)?,
                    proj_out: Linear::load(b.pp("proj_out"), 5 * dim, dim, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out_c = c.out_channels.unwrap_or(c.in_channels);
        Ok(Self {
            x_embedder: Linear::load(vb.pp("x_embedder"), c.in_channels, dim, true)?,
            context_embedder: Linear::load(vb.pp("context_embedder"), c.joint_attention_dim, dim, true)?,
            timestep_embedder: Mlp2::load(tte.pp("timestep_embedder"), 256, dim)?,
            guidance_embedder: if c.guidance_embeds {
                Some(Mlp2::load(tte.pp("guidance_embedder"), 256, dim)?)
            } else {
                None
            },
            text_embedder: Mlp2::load(tte.pp("text_embedder"), c.pooled_projection_dim, dim)?,
            double,
            single,
            norm_out: AdaNorm::load(vb.pp("norm_out"), dim, 2)?,
            proj_out: Linear::load(vb.pp("proj_out"), dim, out_c, true)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &FluxTransformerConfig {
        &self.config
    }

    /// The velocity of packed latents `x` (B, N, in_channels) at `timesteps` (B,) in [0, 1000]
    /// (σ·1000), with text tokens `context` (B, L, joint_attention_dim), `pooled` (B, P), the
    /// guidance scale per row for FLUX-dev, and image position ids (N rows of (0, row, col)).
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &[[f32; 3]],
    ) -> Result<Tensor> {
        super::cpu_kernels::on_pool(x.device(), || {
            self.forward_layers(x, timesteps, context, pooled, guidance, img_ids)
        })
    }

    fn forward_layers(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &[[f32; 3]],
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let heads = self.config.num_attention_heads;
        let l = context.dim(1)?;
        let mut hs = self.x_embedder.forward(x)?;
        let embed = |t: &Tensor| timestep_embedding(&t.to_dtype(DType::F32)?, 256, true, 0.0)?.to_dtype(dtype);
        let mut temb = self.timestep_embedder.forward(&embed(timesteps)?)?;
        if let Some(g) = &self.guidance_embedder {
            let scale = guidance.ok_or_else(|| candle_core::Error::Msg("FLUX-dev needs a guidance scale".into()))?;
            temb = (temb + g.forward(&embed(scale)?)?)?;
        }
        let temb = (temb + self.text_embedder.forward(&pooled.to_dtype(dtype)?)?)?;
        let mut ctx = self.context_embedder.forward(&context.to_dtype(dtype)?)?;
        let mut ids = vec![[0f32; 3]; l];
        ids.extend_from_slice(img_ids);
        let rope = rope_tables(&ids, &self.config.axes_dims_rope, x.device())?;
        for b in &self.double {
            let p = b.norm1.params(&temb)?;
            let c = b.norm1_context.params(&temb)?;
            let nx = modulate(&b.norm1.norm.forward(&hs)?, &p[0], &p[1])?;
            let nc = modulate(&b.norm1_context.norm.forward(&ctx)?, &c[0], &c[1])?;
            let (q, k, v) = b.img.project(&nx, heads)?;
            let (cq, ck, cv) = b.txt.project(&nc, heads)?;
            let out = rope_attention(
                &Tensor::cat(&[&cq, &q], 1)?,
                &Tensor::cat(&[&ck, &k], 1)?,
                &Tensor::cat(&[&cv, &v], 1)?,
                heads,
                &rope,
            )?;
            let n = out.dim(1)?;
            let attn_txt = b.to_add_out.forward(&out.narrow(1, 0, l)?)?;
            let attn_img = b.to_out.forward(&out.narrow(1, l, n - l)?)?;
            hs = (hs + attn_img.broadcast_mul(&p[2].unsqueeze(1)?)?)?;
            let h = modulate(&b.norm2.forward(&hs)?, &p[3], &p[4])?;
            hs = (&hs + b.ff.forward(&h)?.broadcast_mul(&p[5].unsqueeze(1)?)?)?;
            ctx = (ctx + attn_txt.broadcast_mul(&c[2].unsqueeze(1)?)?)?;
            let h = modulate(&b.norm2.forward(&ctx)?, &c[3], &c[4])?;
            ctx = (&ctx + b.ff_context.forward(&h)?.broadcast_mul(&c[5].unsqueeze(1)?)?)?;
        }
        let mut joined = Tensor::cat(&[&ctx, &hs], 1)?;
        for b in &self.single {
            let p = b.norm.params(&temb)?; // shift, scale, gate
            let h = modulate(&b.norm.norm.forward(&joined)?, &p[0], &p[1])?;
            let mlp = b.proj_mlp.forward(&h)?.gelu()?;
            let (q, k, v) = b.qkv.project(&h, heads)?;
            let attn = rope_attention(&q, &k, &v, heads, &rope)?;
            let out = b.proj_out.forward(&Tensor::cat(&[&attn, &mlp], 2)?)?;
            joined = (joined + out.broadcast_mul(&p[2].unsqueeze(1)?)?)?;
        }
        let n = joined.dim(1)?;
        let hs = joined.narrow(1, l, n - l)?;
        let o = self.norm_out.params(&temb)?;
        let hs = modulate(&self.norm_out.norm.forward(&hs)?, &o[1], &o[0])?;
        self.proj_out.forward(&hs)
    }
}
