//! diffusers' `UNet2DConditionModel`, built from `unet/config.json` and loaded by the published
//! tensor names (SD 1.x, SD 2.x, SD-Turbo, LCM-distilled UNets with `time_cond_proj_dim`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{attention, Activation, ChannelProj, Conv2d, GroupNorm, LayerNorm, Linear};

/// A config value given either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    pub(crate) fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => candle_core::bail!("`{field}` has {} entries, expected {n}", v.len()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConfig {
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_in")]
    pub out_channels: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one_f")]
    pub downsample_padding: usize,
    #[serde(default = "d_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_tl")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub only_cross_attention: Option<PerBlock<bool>>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default = "d_k")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_k")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// SDXL's `text_time` conditioning: sinusoid width per size/crop id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: input width of `add_embedding` (pooled text width + 6 × addition_time_embed_dim).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
}

/// SDXL's added conditioning (`added_cond_kwargs`): the pooled, projected text embedding of
/// the second text encoder and the six size/crop ids (original h, w, crop top, left, target h, w).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// (B, P)
    pub text_embeds: Tensor,
    /// (B, 6)
    pub time_ids: Tensor,
}

fn d_in() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one_f() -> usize {
    1
}
fn d_scale() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_tl() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_shift() -> String {
    "default".into()
}
fn d_k() -> usize {
    3
}

/// Sinusoidal embedding of (B,) float timesteps, diffusers' `get_timestep_embedding`.
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(10000f64.ln()) * i as f64 / (half as f64 - shift);
            exponent.exp() as f32
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

#[derive(Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale: f64,
}

impl ResnetBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        act: Activation,
        output_scale: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), groups, in_c, eps)?,
            conv1: Conv2d::load(vb.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            time_emb_proj: temb.map(|t| Linear::load(vb.pp("time_emb_proj"), t, out_c, true)).transpose()?,
            norm2: GroupNorm::load(vb.pp("norm2"), groups, out_c, eps)?,
            conv2: Conv2d::load(vb.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::load(vb.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
            } else {
                None
            },
            act,
            output_scale,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_act(x, self.act)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&self.act.apply(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_act(&h, self.act)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

#[derive(Clone)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn load(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads, None)?)
    }
}

#[derive(Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
    only_cross: bool,
}

impl TransformerBlock {
    fn load(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        only_cross: bool,
    ) -> Result<Self> {
        let inner_ff = dim * 4;
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::load(
                vb.pp("attn1"),
                dim,
                if only_cross { context_dim } else { dim },
                heads,
                head_dim,
            )?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::load(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::load(vb.pp("ff.net.0.proj"), dim, inner_ff * 2, true)?,
            ff_out: Linear::load(vb.pp("ff.net.2"), inner_ff, dim, true)?,
            only_cross,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let a1 = if self.only_cross { self.attn1.forward(&h, Some(context))? } else { self.attn1.forward(&h, None)? };
        let x = (x + a1)?;
        let x = (&x + self.attn2.forward(&self.norm2.forward(&x)?, Some(context))?)?;
        // GEGLU: hidden * gelu(gate) with the exact (erf) GELU.
        let proj = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let ff = self.ff_out.forward(&super::nn::geglu(&proj)?)?;
        x + ff
    }
}

#[derive(Clone)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: ChannelProj,
    blocks: Vec<TransformerBlock>,
    proj_out: ChannelProj,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn load(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        linear: bool,
        only_cross: bool,
    ) -> Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            candle_core::bail!("{heads} attention heads do not divide {channels} channels");
        }
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let proj = |vb: VarBuilder, i: usize, o: usize| -> Result<ChannelProj> {
            Ok(if linear {
                ChannelProj::Linear(Linear::load(vb, i, o, true)?)
            } else {
                ChannelProj::Conv(Conv2d::load(vb, i, o, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj(vb.pp("proj_in"), channels, inner)?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::load(
                        vb.pp("transformer_blocks").pp(i.to_string()),
                        inner,
                        heads,
                        head_dim,
                        context_dim,
                        only_cross,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj(vb.pp("proj_out"), inner, channels)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = x.dims4()?;
        let h = self.norm.forward(x)?;
        let to_seq = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, hh * ww, ch))
        };
        let mut h = match &self.proj_in {
            ChannelProj::Conv(conv) => conv.forward_to_seq(&h)?,
            ChannelProj::Linear(lin) => lin.forward(&to_seq(&h)?)?,
        };
        for block in &self.blocks {
            h = block.forward(&h, context)?;
        }
        let from_seq = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, hh, ww, ch))?.permute((0, 3, 1, 2))
        };
        let h = match &self.proj_out {
            ChannelProj::Conv(conv) => conv.forward_from_seq(&h, hh, ww)?,
            ChannelProj::Linear(lin) => from_seq(&lin.forward(&h)?)?,
        };
        debug_assert_eq!(h.dim(1)?, c);
        h + x
    }
}

#[derive(Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
}

#[derive(Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

#[derive(Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

/// SDXL's `add_embedding` (a TimestepEmbedding with SiLU) over [pooled text, id sinusoids].
#[derive(Clone)]
struct AddEmbedding {
    time_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

#[derive(Clone)]
pub struct UNet2DConditionModel {
    time_linear_1: Linear,
    time_linear_2: Linear,
    cond_proj: Option<Linear>,
    add_embedding: Option<AddEmbedding>,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    config: UNet2DConfig,
}

impl UNet2DConditionModel {
    pub fn load(vb: VarBuilder, config: &UNet2DConfig) -> Result<Self> {
        let c = config;
        let n = c.block_out_channels.len();
        if c.down_block_types.len() != n || c.up_block_types.len() != n {
            candle_core::bail!("down_block_types/up_block_types must have one entry per block_out_channels");
        }
        if let Some(v) = c.addition_embed_type.as_deref().filter(|v| *v != "text_time") {
            candle_core::bail!("unsupported UNet config: addition_embed_type = {v:?} (only SDXL's \"text_time\")");
        }
        for (field, v) in [("class_embed_type", &c.class_embed_type), ("time_embedding_type", &c.time_embedding_type)] {
            if let Some(v) = v {
                if !(field == "time_embedding_type" && v == "positional") {
                    candle_core::bail!("unsupported UNet config: {field} = {v:?}");
                }
            }
        }
        if c.resnet_time_scale_shift != "default"
            || c.conv_in_kernel != 3
            || c.conv_out_kernel != 3
            || c.encoder_hid_dim.is_some()
        {
            candle_core::bail!("unsupported UNet config (resnet_time_scale_shift, conv kernels or encoder_hid_dim differ from Stable Diffusion)");
        }
        let act = Activation::parse(&c.act_fn)?;
        let boc = &c.block_out_channels;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let cross = c.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let tlayers = c.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        // diffusers' legacy naming: `attention_head_dim` holds the number of heads unless
        // `num_attention_heads` is given.
        let heads = c.num_attention_heads.as_ref().unwrap_or(&c.attention_head_dim).expand(n, "attention_head_dim")?;
        let only_cross = match &c.only_cross_attention {
            Some(v) => v.expand(n, "only_cross_attention")?,
            None => vec![false; n],
        };
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let temb_dim = boc[0] * 4;

        let te = vb.pp("time_embedding");
        let time_linear_1 = Linear::load(te.pp("linear_1"), boc[0], temb_dim, true)?;
        let time_linear_2 = Linear::load(te.pp("linear_2"), temb_dim, temb_dim, true)?;
        let cond_proj = c.time_cond_proj_dim.map(|d| Linear::load(te.pp("cond_proj"), d, boc[0], false)).transpose()?;
        let add_embedding = if c.addition_embed_type.as_deref() == Some("text_time") {
            let (Some(dim), Some(input)) = (c.addition_time_embed_dim, c.projection_class_embeddings_input_dim) else {
                candle_core::bail!(
                    "addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim"
                );
            };
            let ae = vb.pp("add_embedding");
            Some(AddEmbedding {
                time_dim: dim,
                linear_1: Linear::load(ae.pp("linear_1"), input, temb_dim, true)?,
                linear_2: Linear::load(ae.pp("linear_2"), temb_dim, temb_dim, true)?,
            })
        } else {
            None
        };
        let conv_in = Conv2d::load(vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?;

        let mut down = Vec::new();
        let mut out_c = boc[0];
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let has_attn = match ty.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => candle_core::bail!("unsupported down block type `{other}`"),
            };
            let bvb = vb.pp("down_blocks").pp(i.to_string());
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock::load(
                    bvb.pp("resnets").pp(j.to_string()),
                    rin,
                    out_c,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    1.0,
                )?);
                if has_attn {
                    attentions.push(Transformer2D::load(
                        bvb.pp("attentions").pp(j.to_string()),
                        out_c,
                        heads[i],
                        tlayers[i],
                        cross[i],
                        groups,
                        c.use_linear_projection,
                        only_cross[i],
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Conv2d::load(bvb.pp("downsamplers.0.conv"), out_c, out_c, 3, 2, c.downsample_padding)?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsample });
        }

        let mid = match c.mid_block_type.as_deref() {
            None => None,
            Some(kind @ ("UNetMidBlock2DCrossAttn" | "UNetMidBlock2D")) => {
                let mvb = vb.pp("mid_block");
                let ch = boc[n - 1];
                let mut resnets = vec![ResnetBlock::load(
                    mvb.pp("resnets.0"),
                    ch,
                    ch,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    c.mid_block_scale_factor,
                )?];
                let mut attentions = Vec::new();
                if kind == "UNetMidBlock2DCrossAttn" {
                    attentions.push(Transformer2D::load(
                        mvb.pp("attentions.0"),
                        ch,
                        heads[n - 1],
                        tlayers[n - 1],
                        cross[n - 1],
                        groups,
                        c.use_linear_projection,
                        false,
                    )?);
                }
                resnets.push(ResnetBlock::load(
                    mvb.pp("resnets.1"),
                    ch,
                    ch,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    c.mid_block_scale_factor,
                )?);
                Some(MidBlock { resnets, attentions })
            }
            Some(other) => candle_core::bail!("unsupported mid block type `{other}`"),
        };

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let rheads: Vec<usize> = heads.iter().rev().copied().collect();
        let rlayers: Vec<usize> = layers.iter().rev().copied().collect();
        let rcross: Vec<usize> = cross.iter().rev().copied().collect();
        let rtl: Vec<usize> = tlayers.iter().rev().copied().collect();
        let ronly: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let has_attn = match ty.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => candle_core::bail!("unsupported up block type `{other}`"),
            };
            let bvb = vb.pp("up_blocks").pp(i.to_string());
            let num = rlayers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j == num - 1 { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock::load(
                    bvb.pp("resnets").pp(j.to_string()),
                    rin + skip,
                    out_c,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    1.0,
                )?);
                if has_attn {
                    attentions.push(Transformer2D::load(
                        bvb.pp("attentions").pp(j.to_string()),
                        out_c,
                        rheads[i],
                        rtl[i],
                        rcross[i],
                        groups,
                        c.use_linear_projection,
                        ronly[i],
                    )?);
                }
            }
            let upsample =
                if i + 1 < n { Some(Conv2d::load(bvb.pp("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?) } else { None };
            up.push(UpBlock { resnets, attentions, upsample });
        }

        Ok(Self {
            time_linear_1,
            time_linear_2,
            cond_proj,
            add_embedding,
            conv_in,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::load(vb.pp("conv_norm_out"), groups, boc[0], eps)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            act,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConfig {
        &self.config
    }

    /// Upper estimate of the memory one row of a forward pass needs at latent size `h`×`w`, in
    /// bytes (f32 activations): the skip connections kept for the up path, a working set of the
    /// largest feature map (GroupNorm, SiLU, the im2col buffer of a 3×3 convolution over the
    /// concatenated up-path input), and the attention scores, which this implementation
    /// materialises per head (N² per head, with the scaled copy and the softmax beside them).
    pub fn forward_bytes_per_row(&self, h: usize, w: usize) -> u64 {
        let c = &self.config;
        let n = c.block_out_channels.len();
        let lpb = c.layers_per_block.expand(n, "layers_per_block").unwrap_or_else(|_| vec![2; n]);
        let heads = c
            .num_attention_heads
            .as_ref()
            .unwrap_or(&c.attention_head_dim)
            .expand(n, "attention_head_dim")
            .unwrap_or_else(|_| vec![8; n]);
        // In f64: sizes the limits allow can overflow u64 here, and the estimate only has to be
        // an upper bound (`as` saturates at u64::MAX).
        let (mut widest, mut skips, mut scores) = (0f64, 0f64, 0f64);
        let (mut lh, mut lw) = (h as f64, w as f64);
        for l in 0..n {
            let tokens = lh * lw;
            let ch = c.block_out_channels[l] as f64;
            widest = widest.max(ch * tokens);
            skips += (lpb[l] as f64 + 1.0) * ch * tokens;
            let attends = c.down_block_types.get(l).is_some_and(|t| t.contains("CrossAttn"))
                || (l + 1 == n && c.mid_block_type.as_deref().is_none_or(|t| t.contains("CrossAttn")));
            if attends {
                scores = scores.max(heads[l] as f64 * tokens * tokens);
            }
            lh = (lh / 2.0).ceil();
            lw = (lw / 2.0).ceil();
        }
        (4.0 * (48.0 * widest + skips + 3.0 * scores)) as u64
    }

    /// Predict the network output for `sample` (B, C, H, W) at `timesteps` (B,), one per row,
    /// with cross-attention `context` (B, L, D) and, for LCM-distilled UNets, `timestep_cond`
    /// (B, P).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, timestep_cond, None)
    }

    /// [`UNet2DConditionModel::forward`] with SDXL's added conditioning (required by UNets with
    /// `addition_embed_type: "text_time"`).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        timestep_cond: Option<&Tensor>,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        super::cpu_kernels::on_pool(sample.device(), || {
            self.forward_layers(sample, timesteps, context, timestep_cond, added)
        })
    }

    /// Whether the UNet needs [`AddedCond`] (SDXL).
    pub fn takes_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    fn forward_layers(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        timestep_cond: Option<&Tensor>,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let dtype = sample.dtype();
        if timesteps.dims() != [b] {
            candle_core::bail!("timesteps {:?} must be one per row of the {b}-row sample", timesteps.dims());
        }
        let t = timesteps.to_dtype(candle_core::DType::F32)?;
        let t_emb = timestep_embedding(
            &t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(dtype)?;
        let t_emb = match (&self.cond_proj, timestep_cond) {
            (Some(p), Some(c)) => (t_emb + p.forward(&c.to_dtype(dtype)?)?)?,
            (Some(_), None) => candle_core::bail!("this UNet needs a guidance embedding (time_cond_proj_dim)"),
            (None, _) => t_emb,
        };
        let mut emb = self.time_linear_2.forward(&self.act.apply(&self.time_linear_1.forward(&t_emb)?)?)?;
        match (&self.add_embedding, added) {
            (Some(ae), Some(a)) => {
                // sinusoids of the six ids, flattened per row, after the pooled text embedding
                let ids = a.time_ids.to_dtype(candle_core::DType::F32)?.flatten_all()?;
                let time = timestep_embedding(&ids, ae.time_dim, self.config.flip_sin_to_cos, self.config.freq_shift)?
                    .reshape((b, ()))?
                    .to_dtype(dtype)?;
                let input = Tensor::cat(&[&a.text_embeds.to_dtype(dtype)?, &time], 1)?;
                let aug = ae.linear_2.forward(&candle_nn::ops::silu(&ae.linear_1.forward(&input)?)?)?;
                emb = (emb + aug)?;
            }
            (Some(_), None) => candle_core::bail!("this UNet (text_time) needs the pooled text embedding and size ids"),
            (None, _) => {}
        }

        let sample = if self.config.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &block.downsample {
                x = ds.forward(&x)?;
                skips.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid {
            x = mid.resnets[0].forward(&x, Some(&emb))?;
            for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                x = attn.forward(&x, context)?;
                x = resnet.forward(&x, Some(&emb))?;
            }
            if mid.attentions.is_empty() {
                x = mid.resnets[1].forward(&x, Some(&emb))?;
            }
        }
        // Sizes of the skip tensors tell each upsampler its target size (odd latent sizes).
        let n_up = self.up.len();
        for (i, block) in self.up.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip =
                    skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip connections exhausted".into()))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
            }
            if let Some(us) = &block.upsample {
                let (th, tw) = match skips.last() {
                    Some(s) if i + 1 < n_up => (s.dim(2)?, s.dim(3)?),
                    _ => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = us.forward(&x.upsample_nearest2d(th, tw)?)?;
            }
        }
        let x = self.conv_out.forward(&self.conv_norm_out.forward_act(&x, self.act)?)?;
        debug_assert_eq!((x.dim(2)?, x.dim(3)?), (h, w));
        Ok(x)
    }
}
