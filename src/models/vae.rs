//! diffusers' `AutoencoderKL` (encoder and decoder), built from `vae/config.json`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{attention, Activation, Conv2d, GroupNorm, Linear};
use super::unet_2d::ResnetBlock;

#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

fn d3() -> usize {
    3
}
fn d1() -> usize {
    1
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_scale() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl AutoencoderKLConfig {
    /// Upper estimate of the memory decoding one latent of `h`×`w` needs, in bytes (f32): a
    /// working set of the largest feature map (full resolution, widest decoder channels there),
    /// the mid block's single-head attention over the h·w latent pixels, and the image itself.
    pub fn decode_bytes_per_image(&self, h: usize, w: usize) -> u64 {
        // In f64, like the UNet's estimate: an upper bound that cannot overflow.
        let levels = self.block_out_channels.len();
        let (mut widest, mut lh, mut lw) = (0f64, h as f64, w as f64);
        for l in (0..levels).rev() {
            widest = widest.max(self.block_out_channels[l] as f64 * lh * lw);
            if l > 0 {
                lh *= 2.0;
                lw *= 2.0;
            }
        }
        let tokens = h as f64 * w as f64;
        (4.0 * (48.0 * widest + 3.0 * tokens * tokens + 3.0 * lh * lw)) as u64
    }

    /// Pixels per latent pixel: 2^(number of blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

/// Single-head self-attention over pixels with a GroupNorm in front (VAE mid block). Accepts
/// the current (`to_q`...) and the legacy (`query`/`key`/`value`/`proj_attn`) tensor names.
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(vb: VarBuilder, ch: usize, groups: usize) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, o) =
            if legacy { ("query", "key", "value", "proj_attn") } else { ("to_q", "to_k", "to_v", "to_out.0") };
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, ch, 1e-6)?,
            to_q: Linear::load(vb.pp(q), ch, ch, true)?,
            to_k: Linear::load(vb.pp(k), ch, ch, true)?,
            to_v: Linear::load(vb.pp(v), ch, ch, true)?,
            to_out: Linear::load(vb.pp(o), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let seq = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let out = attention(&self.to_q.forward(&seq)?, &self.to_k.forward(&seq)?, &self.to_v.forward(&seq)?, 1, None)?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

struct Mid {
    resnet0: ResnetBlock,
    attn: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl Mid {
    fn load(vb: VarBuilder, ch: usize, groups: usize, act: Activation, add_attention: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::load(vb.pp("resnets.0"), ch, ch, None, groups, 1e-6, act, 1.0)?,
            attn: if add_attention { Some(SpatialAttention::load(vb.pp("attentions.0"), ch, groups)?) } else { None },
            resnet1: ResnetBlock::load(vb.pp("resnets.1"), ch, ch, None, groups, 1e-6, act, 1.0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.resnet1.forward(&x, None)
    }
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

pub struct AutoencoderKL {
    encoder: Option<Encoder>,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn load(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let c = config;
        let n = c.block_out_channels.len();
        for t in &c.down_block_types {
            if t != "DownEncoderBlock2D" {
                candle_core::bail!("unsupported VAE down block `{t}`");
            }
        }
        for t in &c.up_block_types {
            if t != "UpDecoderBlock2D" {
                candle_core::bail!("unsupported VAE up block `{t}`");
            }
        }
        let act = Activation::parse(&c.act_fn)?;
        let g = c.norm_num_groups;
        let boc = &c.block_out_channels;
        let lat = c.latent_channels;

        // The encoder is optional: decode-only checkpoints exist and generation never needs it.
        let encoder = if vb.contains_tensor("encoder.conv_in.weight") {
            let evb = vb.pp("encoder");
            let mut blocks = Vec::new();
            let mut out_c = boc[0];
            for (i, &ch) in boc.iter().enumerate() {
                let in_c = out_c;
                out_c = ch;
                let bvb = evb.pp("down_blocks").pp(i.to_string());
                let resnets = (0..c.layers_per_block)
                    .map(|j| {
                        ResnetBlock::load(
                            bvb.pp("resnets").pp(j.to_string()),
                            if j == 0 { in_c } else { out_c },
                            out_c,
                            None,
                            g,
                            1e-6,
                            act,
                            1.0,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                let down = if i + 1 < n {
                    Some(Conv2d::load(bvb.pp("downsamplers.0.conv"), out_c, out_c, 3, 2, 0)?)
                } else {
                    None
                };
                blocks.push((resnets, down));
            }
            Some(Encoder {
                conv_in: Conv2d::load(evb.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
                blocks,
                mid: Mid::load(evb.pp("mid_block"), boc[n - 1], g, act, c.mid_block_add_attention)?,
                norm_out: GroupNorm::load(evb.pp("conv_norm_out"), g, boc[n - 1], 1e-6)?,
                conv_out: Conv2d::load(evb.pp("conv_out"), boc[n - 1], 2 * lat, 3, 1, 1)?,
                act,
            })
        } else {
            None
        };

        let dvb = vb.pp("decoder");
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut out_c = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = ch;
            let bvb = dvb.pp("up_blocks").pp(i.to_string());
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock::load(
                        bvb.pp("resnets").pp(j.to_string()),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        None,
                        g,
                        1e-6,
                        act,
                        1.0,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up =
                if i + 1 < n { Some(Conv2d::load(bvb.pp("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?) } else { None };
            blocks.push((resnets, up));
        }
        let decoder = Decoder {
            conv_in: Conv2d::load(dvb.pp("conv_in"), lat, boc[n - 1], 3, 1, 1)?,
            mid: Mid::load(dvb.pp("mid_block"), boc[n - 1], g, act, c.mid_block_add_attention)?,
            blocks,
            norm_out: GroupNorm::load(dvb.pp("conv_norm_out"), g, boc[0], 1e-6)?,
            conv_out: Conv2d::load(dvb.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            act,
        };
        let quant_conv = if c.use_quant_conv && encoder.is_some() {
            Some(Conv2d::load(vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv =
            if c.use_post_quant_conv { Some(Conv2d::load(vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?) } else { None };
        Ok(Self { encoder, decoder, quant_conv, post_quant_conv, config: config.clone() })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Raw decoder output (≈[-1, 1]) for latents already divided by `scaling_factor`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        super::cpu_kernels::on_pool(z.device(), || self.decode_layers(z))
    }

    fn decode_layers(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = d.conv_in.forward(&z)?;
        x = d.mid.forward(&x)?;
        for (resnets, up) in &d.blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(up) = up {
                let (h, w) = (x.dim(2)?, x.dim(3)?);
                x = up.forward(&x.upsample_nearest2d(h * 2, w * 2)?)?;
            }
        }
        d.conv_out.forward(&d.norm_out.forward_act(&x, d.act)?)
    }

    /// Images in [0, 1] from a pipeline's latents: undo `scaling_factor` and `shift_factor`,
    /// decode in the weights' `dtype`, map [-1, 1] to [0, 1] and clamp (in the latents' dtype).
    pub fn decode_latents(&self, latents: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        let c = &self.config;
        let mut z = (latents / c.scaling_factor)?;
        if let Some(shift) = c.shift_factor {
            z = (z + shift)?;
        }
        let img = self.decode(&z.to_dtype(dtype)?)?.to_dtype(latents.dtype())?;
        ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)
    }

    /// A pipeline's latents (posterior mean, shifted and scaled) for images in [0, 1].
    pub fn encode_latents(&self, images: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        let mean = self.encode_mean(&((images * 2.0)? - 1.0)?.to_dtype(dtype)?)?;
        self.to_latent_space(&mean.to_dtype(images.dtype())?)
    }

    /// The latent posterior `(mean, std)` of images in [0, 1], shifted and scaled like latents.
    pub fn encode_latent_posterior(&self, images: &Tensor, dtype: candle_core::DType) -> Result<(Tensor, Tensor)> {
        let (mean, std) = self.encode_mean_std(&((images * 2.0)? - 1.0)?.to_dtype(dtype)?)?;
        let std = (std.to_dtype(images.dtype())? * self.config.scaling_factor)?;
        Ok((self.to_latent_space(&mean.to_dtype(images.dtype())?)?, std))
    }

    /// `(z − shift_factor)·scaling_factor`.
    fn to_latent_space(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(shift) => (z - shift)?,
            None => z.clone(),
        };
        z * self.config.scaling_factor
    }

    /// Posterior mean of the latent distribution (unscaled) for images in [-1, 1].
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        self.encode_moments(x)?.narrow(1, 0, self.config.latent_channels)
    }

    /// Posterior mean and standard deviation (unscaled) for images in [-1, 1]; the log-variance
    /// is clamped to [−30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    pub fn encode_mean_std(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = self.encode_moments(x)?;
        let c = self.config.latent_channels;
        let logvar = m.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok((m.narrow(1, 0, c)?, (logvar * 0.5)?.exp()?))
    }

    /// The encoder's output: mean and log-variance stacked on the channel axis.
    fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let e =
            self.encoder.as_ref().ok_or_else(|| candle_core::Error::Msg("this VAE has no encoder weights".into()))?;
        let mut h = e.conv_in.forward(x)?;
        for (resnets, down) in &e.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(down) = down {
                // diffusers pads right/bottom by one before the stride-2 convolution.
                h = down.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = e.mid.forward(&h)?;
        h = e.conv_out.forward(&e.norm_out.forward_act(&h, e.act)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        Ok(h)
    }
}
