//! Building blocks shared by our networks, written so gradients always flow.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward pass: they cut
//! the graph silently. Every op here checks whether its input is part of a recorded graph
//! (`Tensor::track_op`) and then uses a composed, differentiable form; plain inference keeps the
//! fast fused kernels. [`set_fused_ops`] is the one switch that turns fused kernels off
//! everywhere (used by tests that compare both paths).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

static FUSED_OPS: AtomicBool = AtomicBool::new(true);

/// Allow (default) or forbid fused kernels without a backward pass.
pub fn set_fused_ops(enabled: bool) {
    FUSED_OPS.store(enabled, Ordering::SeqCst);
}

fn use_fused(x: &Tensor) -> bool {
    FUSED_OPS.load(Ordering::Relaxed) && !x.track_op()
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if use_fused(x) {
        match super::cpu_kernels::softmax_last_dim(x) {
            Some(r) => r,
            None => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        }
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// Exact (erf) GELU; the fast CPU kernel when no gradient is recorded.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if use_fused(x) {
        if let Some(r) = super::cpu_kernels::gelu_erf(x) {
            return r;
        }
    }
    x.gelu_erf()
}

/// GEGLU (`hidden · gelu(gate)` over the two halves of the last dimension, exact GELU): one
/// fused pass on the CPU when no gradient is recorded.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if use_fused(x) {
        if let Some(r) = super::cpu_kernels::geglu(x) {
            return r;
        }
    }
    let half = x.dim(D::Minus1)? / 2;
    let hidden = x.narrow(D::Minus1, 0, half)?;
    let gate = x.narrow(D::Minus1, half, half)?;
    hidden * gelu_erf(&gate)?
}

/// Unmerged LoRA factors of one layer: the layer adds `scale · up(down(x))`.
#[derive(Debug, Clone)]
struct LoraFactors {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

/// Factors stored beside a weight as `lora.<j>.{down,up,scale}` (see `adapters::apply::unmerged`).
fn load_lora(vb: &VarBuilder) -> Result<Vec<LoraFactors>> {
    let mut out = Vec::new();
    for j in 0.. {
        let p = format!("lora.{j}");
        if !vb.contains_tensor(&format!("{p}.down")) {
            break;
        }
        let scale = vb.get_unchecked(&format!("{p}.scale"))?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
        out.push(LoraFactors {
            down: vb.get_unchecked(&format!("{p}.down"))?,
            up: vb.get_unchecked(&format!("{p}.up"))?,
            scale,
        });
    }
    Ok(out)
}

/// Fully connected layer `y = x Wᵀ + b` on inputs of any rank, plus unmerged LoRA terms
/// `s·(x Aᵀ) Bᵀ` when an adapter was applied without merging.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Vec<LoraFactors>,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        let lora = load_lora(&vb)?;
        Ok(Self { weight, bias, lora })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Whether gemm may compute a sample's `rows × k` by `k × n` product differently alone than
/// stacked with other samples (more rows), following `gemm-common`'s dispatch: products of at
/// most 256 outputs take a horizontal kernel; a single row takes a matrix-vector kernel; and
/// matrices of at most 64 × 64 block the reduction by 512 where larger ones block it evenly, which
/// matters once k exceeds 512. Otherwise the main kernel's reduction order depends on k alone.
fn batch_changes_rounding(rows: usize, k: usize, n: usize) -> bool {
    rows * n <= 256 || rows == 1 || (rows <= 64 && n <= 64 && k > 512)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let x2 = x.reshape((rows, in_dim))?;
        // A sample's output must not depend on what else is in the batch (the engine stacks
        // rows of different requests). Where gemm would pick another kernel or blocking for the
        // stacked product than for one sample's (`batch_changes_rounding`), each sample is
        // multiplied on its own; otherwise they share one product.
        let samples = if dims.len() >= 2 { dims[0].max(1) } else { 1 };
        let per = rows / samples;
        let own = batch_changes_rounding(per, in_dim, self.weight.dim(0)?)
            || self.lora.iter().try_fold(false, |any, l| -> Result<bool> {
                let rank = l.down.dim(0)?;
                Ok(any || batch_changes_rounding(per, in_dim, rank) || batch_changes_rounding(per, rank, l.up.dim(0)?))
            })?;
        if self.lora.is_empty() && use_fused(x) {
            if let Some(y) = super::cpu_kernels::linear(&x2, &self.weight, self.bias.as_ref(), samples, own) {
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
                return y?.reshape(out_dims);
            }
        }
        let (samples, per) = if own { (samples, per) } else { (1, rows) };
        let product = |a: &Tensor| -> Result<Tensor> {
            let mut y = a.matmul(&self.weight.t()?)?;
            for l in &self.lora {
                y = (y + (a.matmul(&l.down.t()?)?.matmul(&l.up.t()?)? * l.scale)?)?;
            }
            Ok(y)
        };
        let y = if samples == 1 {
            product(&x2)?
        } else {
            let parts = (0..samples).map(|i| product(&x2.narrow(0, i * per, per)?)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// 2-D convolution with square kernel (NCHW).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
    lora: Vec<LoraFactors>,
}

impl Conv2d {
    pub fn load(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_c, "bias")?);
        let lora = load_lora(&vb)?;
        Ok(Self { weight, bias, padding, stride, lora })
    }

    fn conv(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        if use_fused(x) {
            if let Some(r) = super::cpu_kernels::conv2d(x, w, b, stride, padding) {
                return r;
            }
        }
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.conv(x, &self.weight, self.bias.as_ref(), self.stride, self.padding)?;
        // LoCon: a k×k conv to r channels with the base stride and padding, then a 1×1 conv.
        for l in &self.lora {
            let h = self.conv(x, &l.down, None, self.stride, self.padding)?;
            y = (y + (self.conv(&h, &l.up, None, 1, 0)? * l.scale)?)?;
        }
        Ok(y)
    }
}

impl Conv2d {
    /// Whether the CPU kernels' 1×1 layout-changing products apply (no LoRA, nothing recorded).
    fn pointwise_fast_path(&self, x: &Tensor) -> Result<bool> {
        Ok(self.lora.is_empty() && self.weight.dims4()?.2 == 1 && use_fused(x))
    }

    /// A 1×1 convolution's output as a channels-last sequence, `(b, h·w, c_out)`: what
    /// `forward` gives, permuted and made contiguous. On the CPU fast path one GEMM per image
    /// reads the channels-first input in place and writes the sequence, with no transposing copy.
    pub fn forward_to_seq(&self, x: &Tensor) -> Result<Tensor> {
        if self.pointwise_fast_path(x)? {
            if let Some(y) = super::cpu_kernels::pointwise_conv_to_seq(x, &self.weight, self.bias.as_ref()) {
                return y;
            }
        }
        let y = self.forward(x)?;
        let (b, c, h, w) = y.dims4()?;
        y.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
    }

    /// A 1×1 convolution of a channels-last sequence `(b, h·w, c_in)` into channels-first
    /// planes `(b, c_out, h, w)`; on the CPU fast path without transposing the input first.
    pub fn forward_from_seq(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        if self.pointwise_fast_path(x)? {
            if let Some(y) = super::cpu_kernels::pointwise_conv_from_seq(x, &self.weight, self.bias.as_ref(), h, w) {
                return y;
            }
        }
        let (b, _, c) = x.dims3()?;
        self.forward(&x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// A 1×1 convolution or a linear layer acting on channels, as Transformer2DModel's
/// `proj_in`/`proj_out` are in SD-1 (conv) and SD-2 (linear).
#[derive(Debug, Clone)]
pub enum ChannelProj {
    Conv(Conv2d),
    Linear(Linear),
}

/// GroupNorm over (N, C, ...) computed from primitives (differentiable, any float dtype).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("norm_num_groups {groups} does not divide {channels} channels");
        }
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, groups, eps })
    }

    /// `act(GroupNorm(x))`, in one pass on the CPU for SiLU.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu && use_fused(x) {
            if let Some(r) = super::cpu_kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true) {
                return r;
            }
        }
        act.apply(&self.forward(x)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if use_fused(x) {
            if let Some(r) = super::cpu_kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false) {
                return r;
            }
        }
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x32 = x.to_dtype(match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        })?;
        let g = x32.reshape((b, self.groups, ()))?;
        let n = g.dim(2)? as f64;
        let mean = (g.sum_keepdim(2)? / n)?;
        let centered = g.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / n)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        normed
            .reshape(dims.as_slice())?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)
    }
}

/// LayerNorm over the last dimension; fused kernel only when no gradient is recorded.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    /// From given parameters (ones and zeros for a norm without learned ones).
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if use_fused(x) && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Multi-head scaled dot-product attention on (B, N, H·d) inputs. Without a gradient or a mask,
/// f32 on the CPU, the fused kernel runs instead (no materialised score matrix).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    if mask.is_none() && use_fused(q) && !k.track_op() && !v.track_op() {
        if let Some(r) = super::cpu_kernels::attention(q, k, v, heads) {
            return r;
        }
    }
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((b * heads, len, d))
    };
    let (qh, kh, vh) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let dtype = q.dtype();
    // Scores in f32 for half-precision weights, like diffusers' upcast.
    let (qh, kh) = match dtype {
        DType::F16 | DType::BF16 => (qh.to_dtype(DType::F32)?, kh.to_dtype(DType::F32)?),
        _ => (qh, kh),
    };
    let scores = (qh.matmul(&kh.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores.contiguous()?)?.to_dtype(dtype)?;
    let out = probs.matmul(&vh)?;
    out.reshape((b, heads, n, d))?.transpose(1, 2)?.contiguous()?.reshape((b, n, inner))
}

/// The dtype reductions (norms, softmax statistics) run in: f32, or f64 for f64 inputs.
pub fn reduction_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Activation functions named in model configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, PyTorch's `F.gelu` default.
    Gelu,
    /// tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            other => candle_core::bail!("unsupported activation `{other}`"),
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::Gelu => gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Relu => x.relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Each sample's output of a batched `Linear` equals the sample alone, bit for bit, on the
    /// shapes where gemm picks another kernel or blocking for the batch than for one sample:
    /// one row per sample (alone a matrix-vector product), a small product (rows × outputs ≤
    /// 256), and narrow outputs over a long reduction (alone ≤ 64 × 64, blocked by 512).
    #[test]
    fn linear_rows_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        for (per, in_dim, out_dim) in [(1, 64, 300), (4, 32, 60), (10, 600, 32), (100, 96, 200)] {
            let weight = Tensor::randn(0f32, 0.1, (out_dim, in_dim), &dev).unwrap();
            let linear = Linear { weight, bias: None, lora: Vec::new() };
            let x = Tensor::randn(0f32, 1.0, (8, per, in_dim), &dev).unwrap();
            let batched = linear.forward(&x).unwrap();
            for i in 0..8 {
                let alone = linear.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = batched.narrow(0, i, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "per {per}, {in_dim} -> {out_dim}: sample {i} changed with the batch"
                );
            }
        }
    }

    fn fd_check(f: impl Fn(&Tensor) -> Result<Tensor>, x0: &Tensor) {
        let var = Var::from_tensor(x0).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let grads = y.backward().unwrap();
        let g =
            grads.get(var.as_tensor()).expect("gradient must flow").flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for idx in [0, base.len() / 2, base.len() - 1] {
            let mut p = base.clone();
            p[idx] += h;
            let mut m = base.clone();
            m[idx] -= h;
            let fp = f(&Tensor::from_vec(p, x0.shape(), x0.device()).unwrap()).unwrap().to_scalar::<f64>().unwrap();
            let fm = f(&Tensor::from_vec(m, x0.shape(), x0.device()).unwrap()).unwrap().to_scalar::<f64>().unwrap();
            let fd = (fp - fm) / (2.0 * h);
            assert!((fd - g[idx]).abs() <= 1e-6 * (1.0 + fd.abs()), "idx {idx}: fd {fd} autograd {}", g[idx]);
        }
    }

    fn input(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| ((i * 37 % 101) as f64 / 50.0 - 1.0) * 1.3).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_and_layer_norm_are_differentiable() {
        let x = input(&[2, 3, 5]);
        let w = input(&[5]);
        let b = input(&[5]);
        let ln = LayerNorm { weight: (w + 1.5).unwrap(), bias: b, eps: 1e-5 };
        let weights = input(&[2, 3, 5]).sin().unwrap();
        fd_check(|x| (softmax_last_dim(x)? * &weights)?.sum_all(), &x);
        fd_check(|x| (ln.forward(x)? * &weights)?.sum_all(), &x);
    }

    #[test]
    fn group_norm_and_attention_are_differentiable() {
        let x = input(&[1, 4, 3, 3]);
        let gn = GroupNorm { weight: input(&[4]), bias: input(&[4]), groups: 2, eps: 1e-6 };
        let weights = input(&[1, 4, 3, 3]).cos().unwrap();
        fd_check(|x| (gn.forward(x)? * &weights)?.sum_all(), &x);
        let q = input(&[1, 3, 4]);
        let wv = input(&[1, 3, 4]).sin().unwrap();
        fd_check(|q| (attention(q, &q.sin()?, &q.cos()?, 2, None)? * &wv)?.sum_all(), &q);
    }

    #[test]
    fn fused_and_composed_paths_agree() {
        let x = input(&[2, 3, 8]).to_dtype(DType::F32).unwrap();
        let ln = LayerNorm {
            weight: input(&[8]).to_dtype(DType::F32).unwrap(),
            bias: input(&[8]).to_dtype(DType::F32).unwrap(),
            eps: 1e-5,
        };
        let fused = (softmax_last_dim(&x).unwrap(), ln.forward(&x).unwrap());
        let composed = (
            candle_nn::ops::softmax(&x, D::Minus1).unwrap(),
            candle_nn::ops::layer_norm_slow(&x, &ln.weight, &ln.bias, 1e-5).unwrap(),
        );
        for (a, b) in [(fused.0, composed.0), (fused.1, composed.1)] {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "fused vs composed differ by {d}");
        }
    }
}
