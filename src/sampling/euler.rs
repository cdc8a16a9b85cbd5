//! Euler discrete and Euler-ancestral (diffusers `EulerDiscreteScheduler` /
//! `EulerAncestralDiscreteScheduler`) in σ-space: x = x0 + σ·ε, network input x/√(σ²+1).

use candle_core::{Result, Tensor};

use super::vp::{lincomb, match_dtype};
use super::PredictionType;
use super::Sampler;

/// Euler (deterministic: diffusers' `s_churn` defaults to 0) or Euler-ancestral.
#[derive(Debug, Clone)]
pub struct Euler {
    pub(crate) timesteps: Vec<f64>,
    /// σ per step (float32 values, linearly interpolated at the float timesteps) plus a final 0.
    sigmas: Vec<f64>,
    init_sigma: f64,
    ancestral: bool,
    prediction: PredictionType,
}

impl Euler {
    /// `sigmas` has one more entry than `timesteps` (the final σ = 0). `leading` selects the
    /// init-noise rule √(σmax²+1) (diffusers uses σmax for linspace/trailing spacing).
    pub fn new(
        timesteps: Vec<f64>,
        sigmas: Vec<f64>,
        leading: bool,
        ancestral: bool,
        prediction: PredictionType,
    ) -> Self {
        assert_eq!(sigmas.len(), timesteps.len() + 1);
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_sigma = if leading { (max * max + 1.0).sqrt() } else { max };
        Self { timesteps, sigmas, init_sigma, ancestral, prediction }
    }

    /// σ at step `i` (`i = num_steps` gives the final 0).
    pub fn sigma(&self, i: usize) -> f64 {
        self.sigmas[i]
    }

    /// (σ_up, σ_down) of the ancestral step from σ_i to σ_{i+1}.
    pub fn ancestral_sigmas(&self, i: usize) -> (f64, f64) {
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).max(0.0).sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        (up, down)
    }
}

impl Sampler for Euler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn timestep(&self, i: usize) -> f64 {
        self.timesteps[i]
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        x0 + noise.affine(self.sigmas[i], 0.0)?
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.clone())
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        x.affine(1.0 / (s * s + 1.0).sqrt(), 0.0)
    }

    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        let out = match_dtype(model_output, x)?;
        let s = self.sigmas[i];
        match self.prediction {
            PredictionType::Epsilon => lincomb(&[(x, 1.0), (&out, -s)]),
            PredictionType::VPrediction => lincomb(&[(&out, -s / (s * s + 1.0).sqrt()), (x, 1.0 / (s * s + 1.0))]),
            PredictionType::Sample => Ok(out),
        }
    }

    /// Euler-ancestral draws noise at every step, the last included (where σ_up = 0).
    fn step_needs_noise(&self, _i: usize) -> bool {
        self.ancestral
    }

    fn injects_noise(&self, i: usize) -> bool {
        self.ancestral && self.ancestral_sigmas(i).0 > 0.0
    }

    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        _prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s = self.sigmas[i];
        if !self.ancestral {
            // x + (x − x0)/σ·(σ' − σ) = x0 + (x − x0)·σ'/σ
            let r = self.sigmas[i + 1] / s;
            return lincomb(&[(x0, 1.0 - r), (x, r)]);
        }
        let (up, down) = self.ancestral_sigmas(i);
        let r = down / s;
        let det = lincomb(&[(x0, 1.0 - r), (x, r)])?;
        match noise {
            Some(z) if up > 0.0 => &det + z.to_dtype(det.dtype())?.affine(up, 0.0)?,
            Some(_) => Ok(det),
            None => candle_core::bail!("Euler-ancestral needs noise at step {i}"),
        }
    }
}
