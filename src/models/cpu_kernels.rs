//! Fast CPU forward kernels for ops whose candle CPU versions are slow (GroupNorm is several
//! strided broadcast passes; softmax spends its time in scalar `exp`). They have no backward:
//! `nn` uses them only when no gradient is being recorded, and falls back to composed ops
//! otherwise (and on other devices or dtypes).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Process-wide settings that make the CPU path faster, applied by `tiller`'s `main` (and the
/// benchmarks) before any other thread exists, because they are read once at start-up:
///
/// * candle's element-wise thread pool spins 25,000 times after each operation before it
///   parks, while rayon's workers (the matrix products, these kernels) want the same cores:
///   on 2 cores the spinning took a core from the next product. A short spin
///   (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless the environment sets it) measured 10–15 % less
///   time per UNet step.
/// * glibc maps blocks above 128 KiB afresh and returns them on free, so every activation
///   tensor of a forward pass paid page faults and zeroing; blocks up to 64 MiB now come from
///   the heap, which keeps up to 512 MiB of freed memory for the next step.
pub fn tune_process() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Runs `f` on a worker thread of rayon's global pool (directly when already on one). A forward
/// pass issues hundreds of parallel products and kernels; called from a thread outside the pool,
/// each one hands its work over and puts the caller to sleep until it is done, and the
/// wake-ups cost more than the small products themselves. From a worker, the caller takes part
/// in the work and nested calls stay on the pool.
///
/// While `f` runs, the pool's other workers stay awake looking for work ([`keep_awake`]), as
/// OpenMP's workers spin between parallel regions, instead of going to sleep after each product
/// and being woken by a system call for the next one. Results are unchanged: only which thread
/// runs what differs. Other devices run `f` where it is.
pub fn on_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        return f();
    }
    let done = &AtomicBool::new(false);
    rayon::scope(|scope| {
        // Set when `f` returns or unwinds: the scope waits for the keep-awake tasks before it
        // returns (or passes a panic on), and they run until `done`.
        let _finish = SetOnDrop(done);
        let owner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            keep_awake(scope, done, owner);
        }
        f()
    })
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A task that keeps a worker busy looking for work (running what it finds, yielding its core
/// to other threads when there is none) until `done`. It gives up its thread after at most
/// `KEEP_AWAKE_SLICE` and queues a fresh copy of itself, so it never blocks: a worker waiting
/// inside another job may pick it up, and a task that only returned at `done` could then wait
/// on the very work it sits on. On the thread running the forward pass (`owner`) it only
/// re-queues itself, for another worker to take.
fn keep_awake<'s>(scope: &rayon::Scope<'s>, done: &'s AtomicBool, owner: Option<usize>) {
    scope.spawn(move |scope| {
        if rayon::current_thread_index() != owner {
            let until = std::time::Instant::now() + KEEP_AWAKE_SLICE;
            while !done.load(Ordering::Acquire) && std::time::Instant::now() < until {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        }
        if !done.load(Ordering::Acquire) {
            keep_awake(scope, done, owner);
        }
    });
}

/// How long one [`keep_awake`] task runs before it re-queues itself.
const KEEP_AWAKE_SLICE: std::time::Duration = std::time::Duration::from_micros(200);

/// 0: baseline x86-64 (SSE2) or another architecture, 1: AVX2 with FMA, 2: AVX-512.
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::arch::is_x86_feature_detected!("avx512f") {
            2
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            1
        } else {
            0
        }
    })
}

/// Defines a function whose body is compiled three times, for AVX-512, for AVX2 with FMA and
/// for the x86-64 baseline, and runs the widest the CPU has: the element loops then vectorise
/// to full width in a binary built for the baseline. The body is an `#[inline(always)]` inner
/// function, so it is compiled inside each target-feature wrapper. Call these inside parallel
/// tasks, around plain loops (rayon's machinery would not be inlined). The variants differ
/// only in vector width, which no loop here lets change a result: reductions keep a fixed
/// number of lanes, and no `*` and `+` are fused.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                // SAFETY: each variant runs only where its features were detected.
                match simd_level() {
                    2 => return unsafe { avx512($($arg),*) },
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}

fn cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// GroupNorm on (N, C, ...) f32 CPU tensors, followed by SiLU when `silu` (the pair every
/// ResNet block runs, in one pass over the data). Statistics are accumulated in f64. `None`
/// when the fast path does not apply.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !cpu_f32(weight) || !cpu_f32(bias) {
        return None;
    }
    Some((|| {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let cpg = c / groups;
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        let w = weight.to_vec1::<f32>()?;
        let b = bias.to_vec1::<f32>()?;
        let span = cpg * spatial;
        data.par_chunks_mut(span).enumerate().for_each(|(i, chunk)| {
            let c0 = (i % groups) * cpg;
            group_norm_group(chunk, spatial, &w[c0..c0 + cpg], &b[c0..c0 + cpg], eps, silu)
        });
        debug_assert_eq!(data.len(), n * c * spatial);
        Tensor::from_vec(data, dims, x.device())
    })())
}

multiversion! {
    /// Normalises one group (`w.len()` channels of `spatial` values) in place, then SiLU.
    fn group_norm_group(chunk: &mut [f32], spatial: usize, w: &[f32], b: &[f32], eps: f64, silu: bool) {
        let len = chunk.len() as f64;
        let mean = lanes_sum_f64(chunk, |v| v as f64) / len;
        let var = lanes_sum_f64(chunk, |v| (v as f64 - mean) * (v as f64 - mean)) / len;
        let inv = 1.0 / (var + eps).sqrt();
        for ((ch, &wc), &bc) in chunk.chunks_mut(spatial).zip(w).zip(b) {
            let scale = (inv * wc as f64) as f32;
            let shift = (bc as f64 - mean * inv * wc as f64) as f32;
            if silu {
                ch.iter_mut().for_each(|v| {
                    let y = *v * scale + shift;
                    *v = y / (1.0 + fast_exp(-y));
                });
            } else {
                ch.iter_mut().for_each(|v| *v = *v * scale + shift);
            }
        }
    }
}

/// `Σ f(v)` in f64 over 8 independent lanes (vectorisable), then the lanes combined.
#[inline(always)]
fn lanes_sum_f64(v: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            acc[j] += f(c[j]);
        }
    }
    rest.iter().map(|&x| f(x)).sum::<f64>() + acc.iter().sum::<f64>()
}

/// exp(x) for f32 (arguments clamped to [−87, 88], where f32 results stay normal) via 2^i · e^y with i = round(x·log2 e) and |y| ≤ ln2/2, e^y by its degree-7
/// Taylor polynomial (truncation error < 1e-8): accurate to a few ulp, and it vectorises.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2^23 trick: `f32::round` is a libm call without SSE4.1 and
    // would stop the loop from vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let i = t - MAGIC;
    // Cody–Waite: ln 2 split in a part exact in f32 and a correction, so y keeps its bits.
    let y = (x - i * 0.693_145_75) - i * 1.428_606_8e-6;
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0 + y * (1.0 / 5040.0)))))));
    // 2^i from t's own bits: t's low mantissa bits hold i (offset by MAGIC's), so integer
    // arithmetic gives the exponent field. `i as i32` would be a saturating conversion, which
    // costs several instructions per lane in the vectorised loop.
    let bits = (t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(bits)
}

/// 2^x for f32 and x ≤ 0 (the scores of an online softmax less their running maximum;
/// arguments below −126 are raised to it, where results stay normal; NaN stays NaN): 2^i · 2^f
/// with i = round(x) and |f| ≤ ½, 2^f by a degree-5 polynomial fitted for least maximum
/// relative error on [−½, ½] and evaluated with fused multiply-adds (below 2.5e-7 relative in
/// f32). `mul_add` rounds once on every target, so the SIMD variants still agree bit for bit.
/// The fused attention scores in log2 units so that it can use this.
#[inline(always)]
fn fast_exp2(x: f32) -> f32 {
    let x = if x < -126.0 { -126.0 } else { x };
    const MAGIC: f32 = 12_582_912.0;
    let t = x + MAGIC;
    let f = x - (t - MAGIC);
    let p = 1.327_644_7e-3f32.mul_add(f, 9.675_533_5e-3);
    let p = p.mul_add(f, 5.550_713e-2);
    let p = p.mul_add(f, 2.402_212e-1);
    let p = p.mul_add(f, 6.931_469_4e-1);
    let p = p.mul_add(f, 1.000_000_1);
    let bits = (t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(bits)
}

/// `max` as one instruction per lane: `f32::max`'s NaN rule costs a compare and blend more, and
/// a NaN score reaches the output either way (through the exponentials).
#[inline(always)]
fn fast_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Reduce with 16 independent lanes (one AVX-512 register, two AVX2 ones), then combine the
/// lanes.
#[inline(always)]
fn lanes_reduce(v: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = f(acc[j], c[j]);
        }
    }
    let mut r = rest.iter().fold(init, |a, &b| f(a, b));
    for a in acc {
        r = f(r, a);
    }
    r
}

/// `row[i] = exp(row[i] − max)` in place; returns the sum of the new values (vectorisable).
#[inline(always)]
fn exp_shifted_sum(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut().for_each(|v| *v = fast_exp(*v - max));
    lanes_reduce(row, 0.0, |a, b| a + b)
}

/// Softmax over the last dimension of an f32 CPU tensor. `None` when the fast path does not
/// apply.
pub fn softmax_last_dim(x: &Tensor) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
        let dims = x.dims().to_vec();
        let len = *dims.last().unwrap_or(&1);
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        data.par_chunks_mut(len.max(1) * 64).for_each(|rows| softmax_rows(rows, len.max(1)));
        Tensor::from_vec(data, dims, x.device())
    })())
}

multiversion! {
    /// Softmax of each `len`-long row of `rows`, in place.
    fn softmax_rows(rows: &mut [f32], len: usize) {
        for row in rows.chunks_mut(len) {
            // Separate passes with 16 independent accumulators, so each one vectorises
            // (a single running max/sum is a serial float reduction LLVM will not reorder).
            let m = lanes_reduce(row, f32::NEG_INFINITY, fast_max);
            if m == f32::NEG_INFINITY {
                row.iter_mut().for_each(|v| *v = f32::NAN);
                continue;
            }
            let inv = 1.0 / exp_shifted_sum(row, m);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// The one product shape these kernels issue: `dst ← [dst +] beta · lhs · rhs` (`m × n`, `k`
/// deep) with `dst` row-major (unit column stride, row stride `dst_rs`) and `lhs` (row, column
/// strides) and `rhs` (column, row strides) at any strides; `read_dst` adds to what `dst` holds
/// (a bias, an accumulator).
///
/// # Safety
/// The pointers must address the whole of each operand at the given strides, and nothing else
/// may access `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, read_dst): (*mut f32, usize, bool),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        read_dst,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        par,
    )
}

/// Rayon over candle's thread count for products big enough to split.
fn parallelism() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// 2-D convolution (NCHW, square kernel, no dilation/groups) as im2col + one GEMM per image,
/// for f32 CPU tensors. candle's CPU conv2d is several times slower than this at the small
/// spatial sizes latent models use. Each image's GEMM writes straight into the output, on top
/// of the bias it was filled with, and reads the input in place (a 1×1 convolution needs no
/// im2col at all): no per-image copies, no concatenation, no separate bias pass. Every image
/// gets the same GEMM whatever the batch, so a row's result does not depend on its batch.
/// `None` when the fast path does not apply.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !cpu_f32(w) || bias.is_some_and(|b| !cpu_f32(b)) {
        return None;
    }
    Some((|| {
        let (b, c_in, h, wd) = x.dims4()?;
        let (c_out, c_in_w, k, k2) = w.dims4()?;
        if c_in != c_in_w || k != k2 || h + 2 * padding < k || wd + 2 * padding < k {
            candle_core::bail!("conv2d: input {:?} does not match kernel {:?}", x.dims(), w.dims());
        }
        let oh = (h + 2 * padding - k) / stride + 1;
        let ow = (wd + 2 * padding - k) / stride + 1;
        let n = oh * ow;
        let kk = c_in * k * k;
        let pointwise = k == 1 && stride == 1 && padding == 0;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        // Patches laid out one patch element per row (K, N), each row a shifted copy of input
        // rows (cheap to build, and the layout gemm's AVX-512 kernels pack fastest). Large
        // images go in bands of output rows (at most IM2COL_BAND floats of patches each), so
        // the buffer stays small and warm instead of hundreds of MB of fresh pages per call;
        // the bands depend only on the image's shape, never on the batch.
        let band_rows = (IM2COL_BAND / (ow * kk).max(1)).clamp(1, oh);
        let band_len = if pointwise { 0 } else { band_rows * ow * kk };
        let (band_rows, bands) = if pointwise { (oh, 1) } else { (band_rows, oh.div_ceil(band_rows)) };
        // SAFETY: the GEMMs cover every image and band, adding to the bias or writing.
        let out = unsafe {
            layer_output(b * c_out * n, bias, c_out, BiasLayout::Planes(n), |out_ptr| {
                with_f32_slice(&w, |wm| {
                    with_f32_slice(&x, |xd| {
                        // One image: its bands of patches, each multiplied straight into the
                        // image's output planes; `gemm_par` splits its work between the threads.
                        per_image(b, |bi, gemm_par| {
                            let par = !matches!(gemm_par, gemm::Parallelism::None);
                            IM2COL_BUFFER.with(|buffer| {
                                // Reused between calls on this thread: `im2col` writes every
                                // element it hands to gemm. A rayon worker waiting inside one
                                // convolution's GEMM may run another convolution (of another
                                // forward pass) on the same thread: that one gets its own buffer.
                                let mut own = Vec::new();
                                let mut shared = buffer.try_borrow_mut();
                                let cols = match shared.as_deref_mut() {
                                    Ok(cols) => cols,
                                    Err(_) => &mut own,
                                };
                                if cols.len() < band_len {
                                    cols.resize(band_len, 0.0);
                                }
                                let src = &xd[bi * c_in * h * wd..(bi + 1) * c_in * h * wd];
                                let dst = out_ptr.at(bi * c_out * n);
                                // rhs (K × N): the input itself for a 1×1 conv, else the
                                // patches of one band of output rows, written to the band's
                                // columns of `dst`.
                                for band in 0..bands {
                                    let oy0 = band * band_rows;
                                    let cols_n = band_rows.min(oh - oy0) * ow;
                                    let (rhs, rhs_cs, rhs_rs) = if pointwise {
                                        (src.as_ptr(), 1, n)
                                    } else {
                                        im2col(
                                            src,
                                            &mut cols[..cols_n * kk],
                                            c_in,
                                            h,
                                            wd,
                                            k,
                                            stride,
                                            padding,
                                            ow,
                                            oy0,
                                            par,
                                        );
                                        (cols.as_ptr(), 1, cols_n)
                                    };
                                    // The band's columns lie inside this image's planes, which no
                                    // other task writes. Without a bias gemm only writes.
                                    gemm_rows(
                                        (c_out, cols_n, kk),
                                        (dst.add(oy0 * ow), n, bias.is_some()),
                                        (wm.as_ptr(), kk, 1),
                                        (rhs, rhs_cs, rhs_rs),
                                        1.0,
                                        gemm_par,
                                    );
                                }
                            })
                        })
                    })
                })
            })?
        };
        Tensor::from_vec(out, (b, c_out, oh, ow), x.device())
    })())
}

/// `y = x Wᵀ + b` for an f32 CPU input of `samples` blocks of `per` rows each (`x` is
/// `samples·per × in`, `W` is `out × in`), one GEMM writing straight into the output on top of
/// the bias. With `separate`, each block gets its own GEMM (same shapes whatever the batch, for
/// products where gemm's kernel choice depends on the row count). `None` when the fast path
/// does not apply.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, samples: usize, separate: bool) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !cpu_f32(w) || bias.is_some_and(|b| !cpu_f32(b)) {
        return None;
    }
    Some((|| {
        let (rows, in_dim) = x.dims2()?;
        let (out_dim, in_w) = w.dims2()?;
        if in_w != in_dim || samples == 0 || !rows.is_multiple_of(samples) {
            candle_core::bail!("linear: input {:?} does not match weight {:?}", x.dims(), w.dims());
        }
        let (blocks, per) = if separate { (samples, rows / samples) } else { (1, rows) };
        let par = parallelism();
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        // SAFETY: the blocks' GEMMs cover every row, adding to the bias or writing.
        let out = unsafe {
            layer_output(rows * out_dim, bias, out_dim, BiasLayout::Rows, |dst| {
                with_f32_slice(&w, |wm| {
                    with_f32_slice(&x, |xd| {
                        for i in 0..blocks {
                            // dst (per × out) = x_i (per × in) · Wᵀ, Wᵀ read in place (column j
                            // = row j of W).
                            gemm_rows(
                                (per, out_dim, in_dim),
                                (dst.at(i * per * out_dim), out_dim, bias.is_some()),
                                (xd[i * per * in_dim..].as_ptr(), in_dim, 1),
                                (wm.as_ptr(), in_dim, 1),
                                1.0,
                                par,
                            );
                        }
                    })
                })
            })?
        };
        Tensor::from_vec(out, (rows, out_dim), x.device())
    })())
}

/// A 1×1 convolution (`w` is `c_out × c_in × 1 × 1`) from channels-first `(b, c_in, h, w)` to
/// a channels-last sequence `(b, h·w, c_out)`: per image, `y = xᵀ Wᵀ + bias` with `xᵀ` read in
/// place. `None` when the fast path does not apply.
pub fn pointwise_conv_to_seq(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !cpu_f32(w) || bias.is_some_and(|b| !cpu_f32(b)) {
        return None;
    }
    Some((|| {
        let (b, c_in, h, wd) = x.dims4()?;
        let (c_out, c_in_w, _, _) = w.dims4()?;
        if c_in_w != c_in {
            candle_core::bail!("pointwise conv: input {:?} does not match kernel {:?}", x.dims(), w.dims());
        }
        let p = h * wd;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        // SAFETY: one GEMM per image covers it, adding to the bias or writing.
        let out = unsafe {
            layer_output(b * p * c_out, bias, c_out, BiasLayout::Rows, |out| {
                with_f32_slice(&w, |wm| {
                    with_f32_slice(&x, |xd| {
                        per_image(b, |bi, par| {
                            // dst (p × c_out) = xᵀ (p × c_in: rows 1 apart, columns p apart) · Wᵀ.
                            gemm_rows(
                                (p, c_out, c_in),
                                (out.at(bi * p * c_out), c_out, bias.is_some()),
                                (xd[bi * c_in * p..].as_ptr(), 1, p),
                                (wm.as_ptr(), c_in, 1),
                                1.0,
                                par,
                            )
                        })
                    })
                })
            })?
        };
        Tensor::from_vec(out, (b, p, c_out), x.device())
    })())
}

/// A 1×1 convolution from a channels-last sequence `(b, h·w, c_in)` to channels-first
/// `(b, c_out, h, w)`: per image, `y = W xᵀ + bias` with `xᵀ` read in place. `None` when the
/// fast path does not apply.
pub fn pointwise_conv_from_seq(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    h: usize,
    wd: usize,
) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !cpu_f32(w) || bias.is_some_and(|b| !cpu_f32(b)) {
        return None;
    }
    Some((|| {
        let (b, p, c_in) = x.dims3()?;
        let (c_out, c_in_w, _, _) = w.dims4()?;
        if c_in_w != c_in || p != h * wd {
            candle_core::bail!("pointwise conv: input {:?} does not match kernel {:?} at {h}×{wd}", x.dims(), w.dims());
        }
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        // SAFETY: one GEMM per image covers it, adding to the bias or writing.
        let out = unsafe {
            layer_output(b * c_out * p, bias, c_out, BiasLayout::Planes(p), |out| {
                with_f32_slice(&w, |wm| {
                    with_f32_slice(&x, |xd| {
                        per_image(b, |bi, par| {
                            // dst (c_out × p) = W (c_out × c_in) · xᵀ (c_in × p: columns c_in apart).
                            gemm_rows(
                                (c_out, p, c_in),
                                (out.at(bi * c_out * p), p, bias.is_some()),
                                (wm.as_ptr(), c_in, 1),
                                (xd[bi * p * c_in..].as_ptr(), c_in, 1),
                                1.0,
                                par,
                            )
                        })
                    })
                })
            })?
        };
        Tensor::from_vec(out, (b, c_out, h, wd), x.device())
    })())
}

/// Runs `image(i, parallelism)` for each image of a batch of `b`: one single-threaded task per
/// image when the batch divides among the threads, else one image after another with each
/// product split between the threads. An image's arithmetic is the same either way (gemm gives
/// each output element to one thread with the same reduction order).
fn per_image(b: usize, image: impl Fn(usize, gemm::Parallelism) + Sync) {
    let threads = candle_core::utils::get_num_threads();
    if b > 1 && b.is_multiple_of(threads) {
        (0..b).into_par_iter().for_each(|bi| image(bi, gemm::Parallelism::None));
    } else {
        (0..b).for_each(|bi| image(bi, parallelism()));
    }
}

/// Where a layer's bias lies in its output.
#[derive(Clone, Copy)]
enum BiasLayout {
    /// Channels last: the whole bias vector on every row.
    Rows,
    /// Channels first: `bias[c]` over every plane of channel `c`, planes of this many floats.
    Planes(usize),
}

/// A layer's output of `len` floats: it starts as the bias (which must have `channels`
/// elements), written by all threads so that a large output is not left to one, or unwritten;
/// `write` then completes it through the pointer (its products adding to the bias, if any).
///
/// # Safety
/// `write` must write every element that has no bias under it, and only within `len`.
unsafe fn layer_output(
    len: usize,
    bias: Option<&Tensor>,
    channels: usize,
    layout: BiasLayout,
    write: impl FnOnce(SharedMut) -> Result<Result<()>>,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(len);
    if let Some(bias) = bias {
        if bias.dims1()? != channels {
            candle_core::bail!("bias {:?} for a layer of {channels} channels", bias.dims());
        }
        let bv = bias.to_vec1::<f32>()?;
        let row = match layout {
            BiasLayout::Rows => channels,
            BiasLayout::Planes(plane) => plane,
        };
        let spare = &mut out.spare_capacity_mut()[..len];
        spare.par_chunks_mut(row.max(1)).with_min_len((1 << 14) / row.max(1)).enumerate().for_each(|(i, dst)| {
            match layout {
                BiasLayout::Rows => dst.iter_mut().zip(&bv).for_each(|(o, &v)| {
                    o.write(v);
                }),
                BiasLayout::Planes(_) => dst.fill(std::mem::MaybeUninit::new(bv[i % channels])),
            }
        });
    }
    // (Two layers of results: `with_f32_slice` around a fallible body.)
    write(SharedMut(out.as_mut_ptr()))??;
    // SAFETY: the bias fill or `write` wrote every element (the caller's promise).
    unsafe { out.set_len(len) };
    Ok(out)
}

/// Floats of im2col patches per band (16 MiB).
const IM2COL_BAND: usize = 4 << 20;

thread_local! {
    /// The im2col band buffer of this thread, kept between convolutions (at most 16 MiB).
    static IM2COL_BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Patches of output rows `oy0..` of one image (as many as `cols` holds), one patch element
/// per row: `cols[((ci·k + ky)·k + kx)·cols_n + (oy − oy0)·ow + ox]`, `cols_n` output pixels
/// per row. Every element is written, padding positions as zeros, so the buffer can be reused.
/// `par` splits the rows between rayon's threads.
#[allow(clippy::too_many_arguments)]
fn im2col(
    src: &[f32],
    cols: &mut [f32],
    c_in: usize,
    h: usize,
    wd: usize,
    k: usize,
    stride: usize,
    padding: usize,
    ow: usize,
    oy0: usize,
    par: bool,
) {
    let kk = c_in * k * k;
    let cols_n = cols.len() / kk;
    let rows = cols_n / ow;
    let row = |(r, dst): (usize, &mut [f32])| {
        let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        let plane = &src[ci * h * wd..(ci + 1) * h * wd];
        // Output columns whose input column `ox·stride + kx − padding` lies inside the image.
        let ox_lo = padding.saturating_sub(kx).div_ceil(stride).min(ow);
        let ox_hi = ((wd + padding).saturating_sub(kx)).div_ceil(stride).clamp(ox_lo, ow);
        for (oy_rel, out) in dst.chunks_exact_mut(ow).take(rows).enumerate() {
            let iy = ((oy0 + oy_rel) * stride + ky) as isize - padding as isize;
            if iy < 0 || iy >= h as isize {
                out.fill(0.0);
                continue;
            }
            let line = &plane[iy as usize * wd..(iy as usize + 1) * wd];
            out[..ox_lo].fill(0.0);
            out[ox_hi..].fill(0.0);
            let x0 = ox_lo * stride + kx - padding;
            if stride == 1 {
                out[ox_lo..ox_hi].copy_from_slice(&line[x0..x0 + (ox_hi - ox_lo)]);
            } else {
                for (o, ix) in out[ox_lo..ox_hi].iter_mut().zip((x0..).step_by(stride)) {
                    *o = line[ix];
                }
            }
        }
    };
    if par {
        cols.par_chunks_mut(cols_n).enumerate().for_each(row);
    } else {
        cols.chunks_mut(cols_n).enumerate().for_each(row);
    }
}

/// Query rows per task and key columns per tile of [`attention`]. Fixed sizes: a row's
/// arithmetic (which keys share a tile, the order tiles are folded in) never depends on how
/// many other rows, heads or batch entries are computed with it.
const ATTN_Q_TILE: usize = 256;
const ATTN_K_TILE: usize = 256;

/// A pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the wrapper (which is `Sync`), not the raw field.
    fn at(&self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// The f32 elements of a contiguous CPU tensor, without copying.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("CPU kernel: input is not contiguous".into()))?;
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => candle_core::bail!("CPU kernel called on a tensor that is not on the CPU"),
    }
}

/// Multi-head scaled dot-product attention on (B, N, H·d) queries and (B, M, H·d) keys and
/// values, f32 on the CPU, without materialising the (N, M) score matrix: for each batch entry,
/// head and tile of 256 queries, key tiles of 256 are scored with one GEMM, folded into a
/// running row maximum and sum (the online softmax of FlashAttention, Dao et al. 2022), and
/// their values accumulated with a second GEMM. Memory is O(threads · 256 · 256) beyond the
/// output, and tasks run in parallel over batch × heads × query tiles. `None` when the fast
/// path does not apply.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Option<Result<Tensor>> {
    if !cpu_f32(q) || !cpu_f32(k) || !cpu_f32(v) {
        return None;
    }
    Some((|| {
        let (b, n, inner) = q.dims3()?;
        let (bk, m, inner_k) = k.dims3()?;
        if bk != b || inner_k != inner || v.dims3()? != (b, m, inner) || heads == 0 || !inner.is_multiple_of(heads) {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let d = inner / heads;
        // Scores in log2 units (softmax(s) = 2^(s·log2 e − max) / Σ), so the softmax can use the
        // cheaper `fast_exp2`.
        let scale = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        // Every element is written by exactly one task (its rows of its head).
        let mut out = Vec::with_capacity(b * n * inner);
        let dst = SharedMut(out.as_mut_ptr());
        let q_tiles = n.div_ceil(ATTN_Q_TILE);
        with_f32_slice(&q, |qd| {
            with_f32_slice(&k, |kd| {
                with_f32_slice(&v, |vd| {
                    (0..b * heads * q_tiles).into_par_iter().for_each_init(
                        || (vec![0f32; ATTN_K_TILE * ATTN_Q_TILE], vec![0f32; d * ATTN_Q_TILE]),
                        |(scores, acc_t), task| {
                            let (bi, h, tile) = (task / (heads * q_tiles), (task / q_tiles) % heads, task % q_tiles);
                            let r0 = tile * ATTN_Q_TILE;
                            let rows = ATTN_Q_TILE.min(n - r0);
                            let q0 = (bi * n + r0) * inner + h * d;
                            // Everything is kept transposed, one column per query: the scores
                            // (keys × queries) and the output accumulator (d × queries). The
                            // softmax statistics then run down the columns, 16 queries to a
                            // vector, with no reductions across lanes.
                            let acc_t = &mut acc_t[..d * rows];
                            acc_t.fill(0.0);
                            let mut row_max = [f32::NEG_INFINITY; ATTN_Q_TILE];
                            let mut row_sum = [0f32; ATTN_Q_TILE];
                            for c0 in (0..m).step_by(ATTN_K_TILE) {
                                let cols = ATTN_K_TILE.min(m - c0);
                                let kv0 = (bi * m + c0) * inner + h * d;
                                let s_t = &mut scores[..cols * rows];
                                // Sᵀ = scale · K Qᵀ: rows of K and of Q are `inner` apart.
                                unsafe {
                                    gemm_rows(
                                        (cols, rows, d),
                                        (s_t.as_mut_ptr(), rows, false),
                                        (kd[kv0..].as_ptr(), inner, 1),
                                        (qd[q0..].as_ptr(), inner, 1),
                                        scale,
                                        gemm::Parallelism::None,
                                    );
                                }
                                online_softmax_columns(s_t, rows, &mut row_max[..rows], &mut row_sum[..rows], acc_t);
                                // accᵀ += Vᵀ Pᵀ.
                                unsafe {
                                    gemm_rows(
                                        (d, rows, cols),
                                        (acc_t.as_mut_ptr(), rows, true),
                                        (vd[kv0..].as_ptr(), 1, inner),
                                        (s_t.as_ptr(), 1, rows),
                                        1.0,
                                        gemm::Parallelism::None,
                                    );
                                }
                            }
                            for (i, sum) in row_sum[..rows].iter().enumerate() {
                                let inv = 1.0 / sum;
                                // Tasks write disjoint (rows × d) blocks of `out`, not yet
                                // initialised: through the pointer, never a reference.
                                let o = dst.at(q0 + i * inner);
                                for j in 0..d {
                                    unsafe { o.add(j).write(acc_t[j * rows + i] * inv) };
                                }
                            }
                        },
                    )
                })
            })
        })???;
        // SAFETY: the tasks wrote every (batch, query, head) block.
        unsafe { out.set_len(b * n * inner) };
        Tensor::from_vec(out, (b, n, inner), q.device())
    })())
}

multiversion! {
    /// One key tile of the online softmax, on transposed scores `s_t` (keys × `rows` queries,
    /// log2 units): turns them into `2^(score − running max)` in place, and rescales each
    /// query's running sum and its column of the accumulator `acc_t` (d × `rows`) when its
    /// maximum grows. Queries go 64, then 16, then 1 at a time, with the same arithmetic for
    /// each: a query's result does not depend on which others share its tile.
    fn online_softmax_columns(s_t: &mut [f32], rows: usize, row_max: &mut [f32], row_sum: &mut [f32], acc_t: &mut [f32]) {
        let mut r = 0;
        while r + 64 <= rows {
            softmax_column_block::<64>(s_t, rows, r, row_max, row_sum, acc_t);
            r += 64;
        }
        while r + 16 <= rows {
            softmax_column_block::<16>(s_t, rows, r, row_max, row_sum, acc_t);
            r += 16;
        }
        while r < rows {
            softmax_column_block::<1>(s_t, rows, r, row_max, row_sum, acc_t);
            r += 1;
        }
    }
}

/// [`online_softmax_columns`] for queries `r0..r0 + W`: their maxima and sums stay in
/// registers while the key rows stream past.
#[inline(always)]
fn softmax_column_block<const W: usize>(
    s_t: &mut [f32],
    rows: usize,
    r0: usize,
    row_max: &mut [f32],
    row_sum: &mut [f32],
    acc_t: &mut [f32],
) {
    let old: [f32; W] = row_max[r0..r0 + W].try_into().unwrap();
    let mut max = old;
    for key in s_t.chunks_exact(rows) {
        let key = &key[r0..r0 + W];
        for j in 0..W {
            max[j] = fast_max(max[j], key[j]);
        }
    }
    // The factor that rescales what was summed under the old maximum (exactly 1 where the
    // maximum stayed; 0 in effect on the first tile, whose sums are still zero).
    let mut scale = [1f32; W];
    for j in 0..W {
        if max[j] != old[j] {
            scale[j] = fast_exp2(old[j] - max[j]);
        }
    }
    for acc in acc_t.chunks_exact_mut(rows) {
        let acc = &mut acc[r0..r0 + W];
        for j in 0..W {
            acc[j] *= scale[j];
        }
    }
    let mut sum = [0f32; W];
    for key in s_t.chunks_exact_mut(rows) {
        let key = &mut key[r0..r0 + W];
        for j in 0..W {
            key[j] = fast_exp2(key[j] - max[j]);
            sum[j] += key[j];
        }
    }
    for j in 0..W {
        row_sum[r0 + j] = row_sum[r0 + j] * scale[j] + sum[j];
    }
    row_max[r0..r0 + W].copy_from_slice(&max);
}

/// Exact-form GELU, `x·Φ(x)` = `½x·(1 + erf(x/√2))`, in f32 with Abramowitz & Stegun 7.1.26
/// for erfc(|u|) (absolute error below 1.5e-7). For negative u, `1 + erf(u)` is taken as
/// `erfc(|u|)` directly rather than as `1 − erf(|u|)`, which would cancel in f32; no branches,
/// so the loops vectorise.
#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    let a = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erfc = poly * fast_exp(-a * a);
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

multiversion! {
    fn gelu_erf_in_place(c: &mut [f32]) {
        for v in c.iter_mut() {
            *v = gelu_f32(*v);
        }
    }
}

multiversion! {
    /// `out[i] = hidden[i] · gelu(gate[i])` for one row `[hidden | gate]` of a GEGLU projection.
    fn geglu_row(row: &[f32], out: &mut [f32]) {
        let (hidden, gate) = row.split_at(out.len());
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * gelu_f32(g);
        }
    }
}

/// GEGLU on an f32 CPU tensor (…, 2h): the first half times the exact GELU of the second, in
/// one pass (no copies of the two halves). `None` when the fast path does not apply.
pub fn geglu(x: &Tensor) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
        let mut dims = x.dims().to_vec();
        let two_h = *dims.last().unwrap_or(&0);
        if two_h == 0 || !two_h.is_multiple_of(2) {
            candle_core::bail!("geglu: last dimension {two_h} is not even");
        }
        let h = two_h / 2;
        let rows = x.elem_count() / two_h;
        let x = x.contiguous()?;
        let mut out = vec![0f32; rows * h];
        with_f32_slice(&x, |xd| {
            out.par_chunks_mut(h * 16).zip(xd.par_chunks(two_h * 16)).for_each(|(o, i)| {
                for (orow, irow) in o.chunks_exact_mut(h).zip(i.chunks_exact(two_h)) {
                    geglu_row(irow, orow);
                }
            })
        })?;
        *dims.last_mut().unwrap() = h;
        Tensor::from_vec(out, dims, x.device())
    })())
}

/// GELU with the exact erf form (PyTorch's default `F.gelu`) on an f32 CPU tensor.
pub fn gelu_erf(x: &Tensor) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
        let dims = x.dims().to_vec();
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        data.par_chunks_mut(4096).for_each(gelu_erf_in_place);
        Tensor::from_vec(data, dims, x.device())
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp2_is_accurate() {
        let mut worst = 0f64;
        let mut x = -120.0f32;
        while x <= 0.0 {
            let exact = (x as f64).exp2();
            worst = worst.max(((fast_exp2(x) as f64 - exact) / exact).abs());
            x += 0.0007;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x <= 0.0 {
            let rel = ((fast_exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn conv2d_matches_candle() {
        let dev = Device::Cpu;
        for (k, stride, pad, hw) in [(3, 1, 1, 9), (3, 2, 1, 8), (3, 2, 0, 9), (1, 1, 0, 5)] {
            let x = Tensor::randn(0f32, 1.0, (2, 6, hw, hw), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.3, (5, 6, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, 5, &dev).unwrap();
            let fast = conv2d(&x, &w, Some(&b), stride, pad).unwrap().unwrap();
            let slow =
                x.conv2d(&w, pad, stride, 1, 1).unwrap().broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap()).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let d: f32 = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "conv k{k} s{stride} p{pad} differs by {d}");
            // Without a bias (LoRA's convolutions), and with the images one at a time.
            let fast = conv2d(&x, &w, None, stride, pad).unwrap().unwrap();
            let slow = x.conv2d(&w, pad, stride, 1, 1).unwrap();
            let d: f32 = (&fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "conv k{k} s{stride} p{pad} without bias differs by {d}");
            let second = conv2d(&x.narrow(0, 1, 1).unwrap(), &w, None, stride, pad).unwrap().unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                second.flatten_all().unwrap().to_vec1().unwrap(),
                fast.narrow(0, 1, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "conv depends on the batch");
        }
    }

    /// Attention with the score matrix materialised, in f64: the reference for the fused kernel.
    fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, n, inner) = q.dims3().unwrap();
        let m = k.dim(1).unwrap();
        let d = inner / heads;
        let split = |t: &Tensor, len: usize| {
            t.to_dtype(DType::F64)
                .unwrap()
                .reshape((b, len, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (qh, kh, vh) = (split(q, n), split(k, m), split(v, m));
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
        let o = p.matmul(&vh).unwrap();
        o.transpose(1, 2).unwrap().reshape((b, n, inner)).unwrap().to_dtype(DType::F32).unwrap()
    }

    #[test]
    fn fused_attention_matches_materialised_softmax() {
        let dev = Device::Cpu;
        // Query and key counts below, at and across the tile sizes (256 queries, 256 keys), not
        // multiples of them; cross-attention (77 keys) and a large-magnitude case, where the
        // running maximum changes between key tiles.
        const _: () = assert!(ATTN_Q_TILE == 256 && ATTN_K_TILE == 256, "the cases below no longer straddle the tiles");
        for (b, n, m, heads, d, sd) in [
            (2, 150, 600, 3, 8, 1.0),
            (1, 256, 256, 1, 16, 1.0),
            (3, 70, 77, 2, 40, 1.0),
            (1, 600, 520, 2, 4, 6.0),
            (1, 300, 77, 2, 16, 1.0),
        ] {
            let q = Tensor::randn(0f32, sd, (b, n, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, sd, (b, m, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let fused = attention(&q, &k, &v, heads).unwrap().unwrap();
            let reference = attention_reference(&q, &k, &v, heads);
            let diff: f32 = (fused - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            // Scores of the large-magnitude case reach ~150 (log2 units), where one f32 ulp is
            // 1.5e-5: the probabilities, and so the outputs, carry that much rounding (measured
            // up to 3e-5 against the f64 reference). A wrong rescale would be off by O(1).
            let tolerance = if sd > 1.0 { 1e-4 } else { 2e-5 };
            assert!(diff < tolerance, "b{b} n{n} m{m} h{heads} d{d}: fused attention differs by {diff}");
        }
    }

    #[test]
    fn fused_attention_rows_do_not_depend_on_the_batch_or_the_tile() {
        let dev = Device::Cpu;
        // More queries than one tile holds, so rows of several query tiles are compared.
        let (n, m, heads, d) = (300, 300, 2, 8);
        let q = Tensor::randn(0f32, 1.0, (5, n, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (5, m, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (5, m, heads * d), &dev).unwrap();
        let batched = attention(&q, &k, &v, heads).unwrap().unwrap();
        for i in 0..5 {
            let one = |t: &Tensor| t.narrow(0, i, 1).unwrap();
            let alone = attention(&one(&q), &one(&k), &one(&v), heads).unwrap().unwrap();
            let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let bt: Vec<f32> = one(&batched).flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().zip(&bt).all(|(x, y)| x.to_bits() == y.to_bits()), "row {i} changed with the batch");
        }
        // Nor on the other queries of its tile: the first 77 queries alone (a 64-query block
        // and 13 single ones) against the same queries among 300 (blocks of 64).
        let first = attention(&q.narrow(1, 0, 77).unwrap(), &k, &v, heads).unwrap().unwrap();
        let among: Vec<f32> = batched.narrow(1, 0, 77).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let alone: Vec<f32> = first.flatten_all().unwrap().to_vec1().unwrap();
        assert!(alone.iter().zip(&among).all(|(x, y)| x.to_bits() == y.to_bits()), "queries changed with their tile");
    }

    #[test]
    fn conv2d_in_bands_matches_candle() {
        // 64 channels at 128x128: 73,728 patch floats per output row, so the image is
        // convolved in three bands of output rows (56, 56, 16).
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 64, 128, 128), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (8, 64, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 8, &dev).unwrap();
        const _: () = assert!(IM2COL_BAND / (128 * 64 * 9) < 128, "the test no longer splits the image");
        let fast = conv2d(&x, &w, Some(&b), 1, 1).unwrap().unwrap();
        let slow = x.conv2d(&w, 1, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, 8, 1, 1)).unwrap()).unwrap();
        let d: f32 = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-4, "banded conv differs by {d}");
    }

    #[test]
    fn gelu_matches_candle_erf_gelu() {
        let x = Tensor::randn(0f32, 3.0, (7, 1000), &Device::Cpu).unwrap();
        let fast = gelu_erf(&x).unwrap().unwrap();
        let slow = x.gelu_erf().unwrap();
        let d: f32 = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 2e-6, "gelu differs by {d}");
    }

    #[test]
    fn conv2d_with_this_threads_buffer_busy_uses_its_own() {
        // What a rayon worker sees when, waiting inside one convolution, it runs another.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 9, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (5, 6, 3, 3), &dev).unwrap();
        let free = conv2d(&x, &w, None, 1, 1).unwrap().unwrap();
        let busy = IM2COL_BUFFER.with_borrow_mut(|_| conv2d(&x, &w, None, 1, 1).unwrap().unwrap());
        let d: f32 = (free - busy).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert_eq!(d, 0.0, "a convolution beside a busy im2col buffer differs by {d}");
    }

    #[test]
    fn conv2d_images_in_parallel_match_each_image_alone() {
        // A batch that divides among the threads runs one single-threaded GEMM per image; alone,
        // an image's GEMM is split between the threads. The rows must agree bit for bit.
        let dev = Device::Cpu;
        let b = 2 * candle_core::utils::get_num_threads();
        let x = Tensor::randn(0f32, 1.0, (b, 32, 20, 20), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (48, 32, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 48, &dev).unwrap();
        for (stride, padding) in [(1, 1), (2, 1)] {
            let batch = conv2d(&x, &w, Some(&bias), stride, padding).unwrap().unwrap();
            for i in 0..b {
                let alone = conv2d(&x.narrow(0, i, 1).unwrap(), &w, Some(&bias), stride, padding).unwrap().unwrap();
                let row = batch.narrow(0, i, 1).unwrap();
                let d: f32 = (row - alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert_eq!(d, 0.0, "image {i} of {b} (stride {stride}) differs from its own convolution by {d}");
            }
        }
    }

    #[test]
    fn concurrent_forward_passes_on_the_pool_finish() {
        // A worker waiting inside one pass's job can pick up another pass's keep-awake task,
        // which must not then wait on the work beneath it. That takes more workers than this
        // machine may have, so the passes run in a child process with a pool of 8.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "models::cpu_kernels::tests::concurrent_forward_passes", "--nocapture"])
            .env("RAYON_NUM_THREADS", "8")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(120) {
                child.kill().unwrap();
                panic!("concurrent forward passes on the pool did not finish in 120 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(status.success(), "concurrent forward passes failed: {status}");
    }

    #[test]
    fn a_panicking_forward_pass_on_the_pool_panics_instead_of_hanging() {
        // The keep-awake tasks run until the pass is done; a pass that unwinds must still end
        // them, or the scope would wait for them forever.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let caught = std::panic::catch_unwind(|| on_pool(&Device::Cpu, || panic!("a failing forward pass")));
            tx.send(caught.is_err()).unwrap();
        });
        let panicked = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("on_pool hung after a panic");
        assert!(panicked, "the panic was not passed on");
    }

    #[test]
    #[ignore = "run by concurrent_forward_passes_on_the_pool_finish with a pool of 8 workers"]
    fn concurrent_forward_passes() {
        let (tx, rx) = std::sync::mpsc::channel();
        for caller in 0..6u64 {
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Enough work per item that halves get stolen and waited on.
                let item = |i: u64, j: u64| (0..200u64).fold(i * j + caller, |a, t| std::hint::black_box(a ^ t) + t);
                for round in 0..30u64 {
                    let sum: u64 = on_pool(&Device::Cpu, || {
                        (0..64u64)
                            .into_par_iter()
                            .map(|i| (0..256u64).into_par_iter().map(|j| item(i, j)).sum::<u64>())
                            .sum()
                    });
                    let expected = (0..64u64).map(|i| (0..256u64).map(|j| item(i, j)).sum::<u64>()).sum::<u64>();
                    assert_eq!(sum, expected, "caller {caller}, round {round}");
                }
                tx.send(caller).unwrap();
            });
        }
        drop(tx);
        for _ in 0..6 {
            rx.recv_timeout(std::time::Duration::from_secs(100)).expect("a forward pass on the pool did not finish");
        }
    }

    #[test]
    fn pointwise_convs_to_and_from_sequences_match_conv_and_permute() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.2, (24, 40, 1, 1), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
        let w_back = Tensor::randn(0f32, 0.2, (40, 24, 1, 1), &dev).unwrap();
        // One image (products split between threads) and a batch that divides among them.
        for b in [1, 2 * candle_core::utils::get_num_threads()] {
            let x = Tensor::randn(0f32, 1.0, (b, 40, 6, 7), &dev).unwrap();
            let seq = pointwise_conv_to_seq(&x, &w, Some(&bias)).unwrap().unwrap();
            let reference = conv2d(&x, &w, Some(&bias), 1, 0)
                .unwrap()
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((b, 42, 24))
                .unwrap();
            let d: f32 = (&seq - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "to sequence, batch {b}: differs by {d}");
            let planes = pointwise_conv_from_seq(&seq, &w_back, None, 6, 7).unwrap().unwrap();
            let input = seq.reshape((b, 6, 7, 24)).unwrap().permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
            let reference = conv2d(&input, &w_back, None, 1, 0).unwrap().unwrap();
            let d: f32 = (planes - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "from sequence, batch {b}: differs by {d}");
        }
    }

    #[test]
    fn geglu_matches_composed_ops() {
        let x = Tensor::randn(0f32, 2.0, (2, 37, 2 * 24), &Device::Cpu).unwrap();
        let fast = geglu(&x).unwrap().unwrap();
        let slow = (x.narrow(2, 0, 24).unwrap() * x.narrow(2, 24, 24).unwrap().gelu_erf().unwrap()).unwrap();
        let d: f32 = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "geglu differs by {d}");
    }

    #[test]
    fn linear_matches_matmul() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3 * 50, 40), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (30, 40), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 30, &dev).unwrap();
        let slow = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        for separate in [false, true] {
            let fast = linear(&x, &w, Some(&b), 3, separate).unwrap().unwrap();
            let d: f32 = (fast - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "linear (separate {separate}) differs by {d}");
        }
        let fast = linear(&x, &w, None, 1, false).unwrap().unwrap();
        let d: f32 =
            (fast - x.matmul(&w.t().unwrap()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "linear without bias differs by {d}");
    }

    #[test]
    fn kernels_match_composed_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 8, 5, 7), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 8, &dev).unwrap();
        let fast = group_norm(&x, &w, &b, 4, 1e-5, false).unwrap().unwrap();
        let fused_silu = group_norm(&x, &w, &b, 4, 1e-5, true).unwrap().unwrap();
        let g = x.reshape((2, 4, 70)).unwrap();
        let mean = g.mean_keepdim(2).unwrap();
        let c = g.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(2).unwrap();
        let slow = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((2, 8, 5, 7))
            .unwrap()
            .broadcast_mul(&w.reshape((1, 8, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let d: f32 = (fast - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "group norm differs by {d}");
        let d: f32 =
            (fused_silu - slow.silu().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "group norm + SiLU differs by {d}");

        let s = Tensor::randn(0f32, 4.0, (3, 5, 33), &dev).unwrap();
        let fast = softmax_last_dim(&s).unwrap().unwrap();
        let slow = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
        let d: f32 = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-6, "softmax differs by {d}");
    }
}
