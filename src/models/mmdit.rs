//! Stable Diffusion 3's MMDiT (diffusers `SD3Transformer2DModel`), built from the component's
//! `config.json` and loaded by the published tensor names (Esser et al., "Scaling Rectified
//! Flow Transformers for High-Resolution Image Synthesis", 2024).
//!
//! Image patches and text tokens keep separate weights but attend jointly: each block
//! modulates both streams by the timestep + pooled-text embedding (adaLN-Zero), concatenates
//! their queries, keys and values along the sequence, and splits the result back. The last
//! block updates the image stream only (`context_pre_only`). Differentiable by construction:
//! every op has a backward (the fused attention and layer norm step aside under autograd).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{attention, Conv2d, LayerNorm, Linear};
use super::unet_2d::timestep_embedding;

#[derive(Debug, Clone, Deserialize)]
pub struct SD3TransformerConfig {
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_caption")]
    pub caption_projection_dim: usize,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_pos")]
    pub pos_embed_max_size: Option<usize>,
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn d_sample() -> usize {
    128
}
fn d_patch() -> usize {
    2
}
fn d_channels() -> usize {
    16
}
fn d_layers() -> usize {
    18
}
fn d_head_dim() -> usize {
    64
}
fn d_heads() -> usize {
    18
}
fn d_joint() -> usize {
    4096
}
fn d_caption() -> usize {
    1152
}
fn d_pooled() -> usize {
    2048
}
fn d_pos() -> Option<usize> {
    Some(96)
}

impl SD3TransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// LayerNorm without learned parameters (`elementwise_affine=False`).
pub(crate) fn plain_norm(dim: usize, eps: f64, vb: &VarBuilder) -> Result<LayerNorm> {
    let dev = vb.device();
    LayerNorm::new(Tensor::ones(dim, vb.dtype(), dev)?, Tensor::zeros(dim, vb.dtype(), dev)?, eps)
}

/// `x·(1 + scale) + shift` with per-row (B, D) modulation over (B, N, D).
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// The rows of a (B, k·D) modulation, in order.
fn chunks(emb: &Tensor, k: usize) -> Result<Vec<Tensor>> {
    emb.chunk(k, D::Minus1)
}

/// `linear_2(silu(linear_1(x)))`: diffusers' TimestepEmbedding and PixArt text projection.
#[derive(Clone)]
pub(crate) struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    pub(crate) fn load(vb: VarBuilder, input: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(vb.pp("linear_1"), input, dim, true)?,
            linear_2: Linear::load(vb.pp("linear_2"), dim, dim, true)?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// adaLN modulation: `linear(silu(temb))` split into `k` vectors after a parameter-free norm.
#[derive(Clone)]
pub(crate) struct AdaNorm {
    linear: Linear,
    pub(crate) norm: LayerNorm,
    k: usize,
}

impl AdaNorm {
    pub(crate) fn load(vb: VarBuilder, dim: usize, k: usize) -> Result<Self> {
        Ok(Self { linear: Linear::load(vb.pp("linear"), dim, k * dim, true)?, norm: plain_norm(dim, 1e-6, &vb)?, k })
    }
    pub(crate) fn params(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        chunks(&self.linear.forward(&temb.silu()?)?, self.k)
    }
}

#[derive(Clone)]
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub(crate) fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::load(vb.pp("net.0.proj"), dim, 4 * dim, true)?,
            out: Linear::load(vb.pp("net.2"), 4 * dim, dim, true)?,
        })
    }
    /// GELU (tanh approximation), as `activation_fn="gelu-approximate"`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward(x)?.gelu()?)
    }
}

/// RMS norm over the head dimension for SD3.5's `qk_norm: "rms_norm"`.
#[derive(Clone)]
pub(crate) struct HeadRmsNorm {
    pub(crate) weight: Tensor,
}

impl HeadRmsNorm {
    pub(crate) fn forward(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, inner) = x.dims3()?;
        let d = inner / heads;
        let h = x.reshape((b, n, heads, d))?;
        let x32 = h.to_dtype(super::nn::reduction_dtype(x.dtype()))?;
        let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
        let normed = x32.broadcast_div(&rms)?.to_dtype(x.dtype())?.broadcast_mul(&self.weight)?;
        normed.reshape((b, n, inner))
    }
}

#[derive(Clone)]
struct JointAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    add_q: Linear,
    add_k: Linear,
    add_v: Linear,
    to_out: Linear,
    to_add_out: Option<Linear>,
    /// (q, k, added q, added k) RMS norms.
    qk_norm: Option<[HeadRmsNorm; 4]>,
    heads: usize,
}

impl JointAttention {
    fn load(vb: VarBuilder, dim: usize, heads: usize, context_pre_only: bool, qk_norm: bool) -> Result<Self> {
        let l = |name: &str| Linear::load(vb.pp(name), dim, dim, true);
        let head_dim = dim / heads;
        let norm =
            |name: &str| -> Result<HeadRmsNorm> { Ok(HeadRmsNorm { weight: vb.pp(name).get(head_dim, "weight")? }) };
        Ok(Self {
            to_q: l("to_q")?,
            to_k: l("to_k")?,
            to_v: l("to_v")?,
            add_q: l("add_q_proj")?,
            add_k: l("add_k_proj")?,
            add_v: l("add_v_proj")?,
            to_out: l("to_out.0")?,
            to_add_out: if context_pre_only { None } else { Some(l("to_add_out")?) },
            qk_norm: if qk_norm {
                Some([norm("norm_q")?, norm("norm_k")?, norm("norm_added_q")?, norm("norm_added_k")?])
            } else {
                None
            },
            heads,
        })
    }

    /// Joint attention over [image tokens, text tokens]; returns both streams' outputs.
    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let n = x.dim(1)?;
        let (mut q, mut k, v) = (self.to_q.forward(x)?, self.to_k.forward(x)?, self.to_v.forward(x)?);
        let (mut cq, mut ck, cv) = (self.add_q.forward(ctx)?, self.add_k.forward(ctx)?, self.add_v.forward(ctx)?);
        if let Some([nq, nk, naq, nak]) = &self.qk_norm {
            q = nq.forward(&q, self.heads)?;
            k = nk.forward(&k, self.heads)?;
            cq = naq.forward(&cq, self.heads)?;
            ck = nak.forward(&ck, self.heads)?;
        }
        let q = Tensor::cat(&[&q, &cq], 1)?;
        let k = Tensor::cat(&[&k, &ck], 1)?;
        let v = Tensor::cat(&[&v, &cv], 1)?;
        let out = attention(&q, &k, &v, self.heads, None)?;
        let m = out.dim(1)?;
        let img = self.to_out.forward(&out.narrow(1, 0, n)?)?;
        let txt = match &self.to_add_out {
            Some(o) => Some(o.forward(&out.narrow(1, n, m - n)?)?),
            None => None,
        };
        Ok((img, txt))
    }
}

#[derive(Clone)]
struct JointBlock {
    norm1: AdaNorm,
    /// adaLN-Zero (6 vectors) for the text stream, or the continuous 2-vector norm of the last
    /// block, whose text stream is not updated.
    norm1_context: AdaNorm,
    attn: JointAttention,
    norm2: LayerNorm,
    ff: FeedForward,
    norm2_context: Option<LayerNorm>,
    ff_context: Option<FeedForward>,
}

impl JointBlock {
    fn load(vb: VarBuilder, dim: usize, heads: usize, context_pre_only: bool, qk_norm: bool) -> Result<Self> {
        Ok(Self {
            norm1: AdaNorm::load(vb.pp("norm1"), dim, 6)?,
            norm1_context: AdaNorm::load(vb.pp("norm1_context"), dim, if context_pre_only { 2 } else { 6 })?,
            attn: JointAttention::load(vb.pp("attn"), dim, heads, context_pre_only, qk_norm)?,
            norm2: plain_norm(dim, 1e-6, &vb)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
            norm2_context: if context_pre_only { None } else { Some(plain_norm(dim, 1e-6, &vb)?) },
            ff_context: if context_pre_only { None } else { Some(FeedForward::load(vb.pp("ff_context"), dim)?) },
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        // shift, scale, gate (attention) and shift, scale, gate (MLP)
        let p = self.norm1.params(temb)?;
        let nx = modulate(&self.norm1.norm.forward(x)?, &p[0], &p[1])?;
        let c = self.norm1_context.params(temb)?;
        let nctx = if self.norm1_context.k == 2 {
            // AdaLayerNormContinuous: scale first, then shift
            modulate(&self.norm1_context.norm.forward(ctx)?, &c[1], &c[0])?
        } else {
            modulate(&self.norm1_context.norm.forward(ctx)?, &c[0], &c[1])?
        };
        let (attn, attn_ctx) = self.attn.forward(&nx, &nctx)?;
        let x = (x + attn.broadcast_mul(&p[2].unsqueeze(1)?)?)?;
        let h = modulate(&self.norm2.forward(&x)?, &p[3], &p[4])?;
        let x = (&x + self.ff.forward(&h)?.broadcast_mul(&p[5].unsqueeze(1)?)?)?;
        let ctx = match (attn_ctx, &self.norm2_context, &self.ff_context) {
            (Some(a), Some(norm2), Some(ff)) => {
                let ctx = (ctx + a.broadcast_mul(&c[2].unsqueeze(1)?)?)?;
                let h = modulate(&norm2.forward(&ctx)?, &c[3], &c[4])?;
                Some((&ctx + ff.forward(&h)?.broadcast_mul(&c[5].unsqueeze(1)?)?)?)
            }
            _ => None,
        };
        Ok((x, ctx))
    }
}

/// SD3's transformer.
#[derive(Clone)]
pub struct SD3Transformer2DModel {
    patch_embed: Conv2d,
    /// (1, max·max, D) sin-cos table, cropped around the centre for each latent size.
    pos_embed: Tensor,
    timestep_embedder: Mlp2,
    text_embedder: Mlp2,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: AdaNorm,
    proj_out: Linear,
    config: SD3TransformerConfig,
}

impl SD3Transformer2DModel {
    pub fn load(vb: VarBuilder, config: &SD3TransformerConfig) -> Result<Self> {
        let c = config;
        if !c.dual_attention_layers.is_empty() {
            candle_core::bail!("SD3.5's dual-attention layers (dual_attention_layers) are not supported yet");
        }
        let qk_norm = match c.qk_norm.as_deref() {
            None => false,
            Some("rms_norm") => true,
            Some(other) => candle_core::bail!("qk_norm `{other}` is not supported (only rms_norm)"),
        };
        let Some(max) = c.pos_embed_max_size else {
            candle_core::bail!("pos_embed_max_size is required (SD3's cropped position table)")
        };
        let dim = c.inner_dim();
        if c.caption_projection_dim != dim {
            candle_core::bail!(
                "caption_projection_dim {} must equal the inner dimension {dim}",
                c.caption_projection_dim
            );
        }
        let p = c.patch_size;
        let blocks = (0..c.num_layers)
            .map(|i| {
                JointBlock::load(
                    vb.pp("transformer_blocks").pp(i.to_string()),
                    dim,
                    c.num_attention_heads,
                    i + 1 == c.num_layers,
                    qk_norm,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let tte = vb.pp("time_text_embed");
        Ok(Self {
            patch_embed: Conv2d::load(vb.pp("pos_embed.proj"), c.in_channels, dim, p, p, 0)?,
            pos_embed: vb.pp("pos_embed").get((1, max * max, dim), "pos_embed")?,
            timestep_embedder: Mlp2::load(tte.pp("timestep_embedder"), 256, dim)?,
            text_embedder: Mlp2::load(tte.pp("text_embedder"), c.pooled_projection_dim, dim)?,
            context_embedder: Linear::load(vb.pp("context_embedder"), c.joint_attention_dim, dim, true)?,
            blocks,
            norm_out: AdaNorm::load(vb.pp("norm_out"), dim, 2)?,
            proj_out: Linear::load(vb.pp("proj_out"), dim, p * p * c.out_channels(), true)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &SD3TransformerConfig {
        &self.config
    }

    /// The velocity for latents `x` (B, C, H, W) at `timesteps` (B,) (σ·1000), with text
    /// tokens `context` (B, L, joint_attention_dim) and `pooled` (B, pooled_projection_dim).
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        super::cpu_kernels::on_pool(x.device(), || self.forward_layers(x, timesteps, context, pooled))
    }

    fn forward_layers(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let p = self.config.patch_size;
        let max = self.config.pos_embed_max_size.unwrap_or(0);
        let (gh, gw) = (h / p, w / p);
        if h % p != 0 || w % p != 0 {
            candle_core::bail!("latent size {h}×{w} is not a multiple of the patch size {p}");
        }
        if gh > max || gw > max {
            candle_core::bail!("latent size {h}×{w} exceeds the position table ({max} patches of {p} per side)");
        }
        let dtype = x.dtype();
        // patches → tokens, plus the centre crop of the position table
        let tokens = self.patch_embed.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let dim = tokens.dim(2)?;
        let (top, left) = ((max - gh) / 2, (max - gw) / 2);
        let pos = self.pos_embed.reshape((max, max, dim))?.narrow(0, top, gh)?.narrow(1, left, gw)?.reshape((
            1,
            gh * gw,
            dim,
        ))?;
        let mut hs = tokens.broadcast_add(&pos.to_dtype(dtype)?)?;
        let t = timestep_embedding(&timesteps.to_dtype(DType::F32)?, 256, true, 0.0)?.to_dtype(dtype)?;
        let temb = (self.timestep_embedder.forward(&t)? + self.text_embedder.forward(&pooled.to_dtype(dtype)?)?)?;
        let mut ctx = self.context_embedder.forward(&context.to_dtype(dtype)?)?;
        for block in &self.blocks {
            let (x2, c2) = block.forward(&hs, &ctx, &temb)?;
            hs = x2;
            if let Some(c2) = c2 {
                ctx = c2;
            }
        }
        let o = self.norm_out.params(&temb)?;
        let hs = modulate(&self.norm_out.norm.forward(&hs)?, &o[1], &o[0])?;
        let out = self.proj_out.forward(&hs)?; // (B, gh·gw, p·p·C)
        let c = self.config.out_channels();
        out.reshape((b, gh, gw, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, h, w))
    }
}
