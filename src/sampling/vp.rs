//! Shared helpers for variance-preserving (ᾱ-parameterised) samplers: prediction-type
//! conversions, x0 clipping / dynamic thresholding and linear combinations of tensors.

use candle_core::{DType, Result, Tensor};

use super::PredictionType;

/// `Σ cᵢ·tᵢ` with f64 coefficients (terms with a zero coefficient are skipped unless all are).
pub fn lincomb(terms: &[(&Tensor, f64)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(t, c) in terms {
        if c == 0.0 {
            continue;
        }
        let term = if c == 1.0 { t.clone() } else { t.affine(c, 0.0)? };
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => terms[0].0.zeros_like(),
    }
}

/// The forward process at ᾱ: `√ᾱ·x0 + √(1−ᾱ)·ε` (diffusers' `add_noise` of ᾱ-space schedulers).
pub fn add_noise(x0: &Tensor, noise: &Tensor, abar: f64) -> Result<Tensor> {
    lincomb(&[(x0, abar.sqrt()), (noise, (1.0 - abar).sqrt())])
}

/// Cast the model output to the latent's dtype (a f16 network may drive f32 latents).
pub fn match_dtype(out: &Tensor, x: &Tensor) -> Result<Tensor> {
    if out.dtype() == x.dtype() {
        Ok(out.clone())
    } else {
        out.to_dtype(x.dtype())
    }
}

/// x̂0 from the raw model output at ᾱ, per prediction type (ε, v or the sample itself).
pub fn x0_from_output(pred: PredictionType, x: &Tensor, out: &Tensor, abar: f64) -> Result<Tensor> {
    let out = match_dtype(out, x)?;
    let (sa, sb) = (abar.sqrt(), (1.0 - abar).sqrt());
    match pred {
        PredictionType::Epsilon => lincomb(&[(x, 1.0 / sa), (&out, -sb / sa)]),
        PredictionType::VPrediction => lincomb(&[(x, sa), (&out, -sb)]),
        PredictionType::Sample => Ok(out),
    }
}

/// ε̂ implied by x and x̂0 at ᾱ: `(x − √ᾱ·x̂0)/√(1−ᾱ)`.
pub fn eps_from_x0(x: &Tensor, x0: &Tensor, abar: f64) -> Result<Tensor> {
    let (sa, sb) = (abar.sqrt(), (1.0 - abar).sqrt());
    lincomb(&[(x, 1.0 / sb), (x0, -sa / sb)])
}

/// diffusers' `clip_sample` / `thresholding` applied to x̂0 inside DDIM/DDPM/LCM steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum X0Processing {
    None,
    Clip(f64),
    /// Dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1, max).
    Threshold {
        ratio: f64,
        max: f64,
    },
}

impl X0Processing {
    pub fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        match *self {
            X0Processing::None => Ok(x0.clone()),
            X0Processing::Clip(r) => x0.clamp(-r, r),
            X0Processing::Threshold { ratio, max } => dynamic_threshold(x0, ratio, max),
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, X0Processing::None)
    }
}

/// `torch.quantile` (linear interpolation) of a slice.
fn quantile(mut v: Vec<f32>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let (a, b) = (v[lo] as f64, v[hi] as f64);
    a + (b - a) * (pos - lo as f64)
}

fn dynamic_threshold(x0: &Tensor, ratio: f64, max: f64) -> Result<Tensor> {
    let dtype = x0.dtype();
    let dims = x0.dims().to_vec();
    let b = dims.first().copied().unwrap_or(1).max(1);
    let flat = x0.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let per = flat.len() / b;
    let mut out = Vec::with_capacity(flat.len());
    for row in flat.chunks(per.max(1)) {
        let s = quantile(row.iter().map(|v| v.abs()).collect(), ratio).clamp(1.0, max.max(1.0)) as f32;
        out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
    }
    Tensor::from_vec(out, dims, x0.device())?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn v_prediction_round_trip() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.3f32, -1.2, 0.7, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[1.1f32, 0.4, -0.9, -0.2], &dev).unwrap();
        for abar in [0.00466, 0.27767, 0.99915] {
            let (sa, sb) = (f64::sqrt(abar), f64::sqrt(1.0 - abar));
            let x = lincomb(&[(&x0, sa), (&eps, sb)]).unwrap();
            // v = √ᾱ·ε − √(1−ᾱ)·x0
            let v = lincomb(&[(&eps, sa), (&x0, -sb)]).unwrap();
            let x0v = x0_from_output(PredictionType::VPrediction, &x, &v, abar).unwrap();
            let x0e = x0_from_output(PredictionType::Epsilon, &x, &eps, abar).unwrap();
            let e2 = eps_from_x0(&x, &x0v, abar).unwrap();
            let d = |a: &Tensor, b: &Tensor| -> f32 {
                (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(d(&x0v, &x0) < 1e-5, "abar {abar}");
            assert!(d(&x0e, &x0) < 1e-4, "abar {abar}");
            assert!(d(&e2, &eps) < 1e-4, "abar {abar}");
        }
    }

    #[test]
    fn thresholding_clamps_to_quantile() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..100).map(|i| i as f32 / 20.0 - 2.5).collect();
        let x = Tensor::from_vec(v.clone(), (1, 1, 10, 10), &dev).unwrap();
        let y = X0Processing::Threshold { ratio: 0.9, max: 2.0 }.apply(&x).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // |x| has 90 % quantile ≈ 2.25 → clamped to max 2.0; values / 2
        assert!((y[99] - 1.0).abs() < 1e-6);
        assert!((y[50] - v[50] / 2.0).abs() < 1e-6);
    }
}
