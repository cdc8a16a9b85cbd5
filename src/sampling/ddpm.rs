//! DDPM ancestral sampling (diffusers `DDPMScheduler`, fixed variances).

use candle_core::{Result, Tensor};

use super::schedule::NoiseSchedule;
use super::vp::{lincomb, x0_from_output, X0Processing};
use super::PredictionType;
use super::Sampler;

/// diffusers' fixed variance types (the learned ones need a network with 2× output channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdpmVariance {
    /// β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev) (also `fixed_small_log`, same value).
    FixedSmall,
    /// β_t = 1 − ᾱ_t/ᾱ_prev.
    FixedLarge,
}

/// DDPM for a fixed step count: the posterior q(x_prev | x_t, x̂0) between consecutive scheduled
/// timesteps (ᾱ_prev = 1 after the last one). diffusers draws noise at every step whose
/// *timestep* is > 0, so with `steps_offset = 1` (SD) also at the last step (where it is scaled
/// by ~1e-10).
///
/// `predict_x0` returns x̂0 before `clip_sample`/thresholding; the transition applies it.
#[derive(Debug, Clone)]
pub struct Ddpm {
    pub(crate) timesteps: Vec<usize>,
    abar: Vec<f64>,
    abar_prev: Vec<f64>,
    variance: DdpmVariance,
    prediction: PredictionType,
    x0_processing: X0Processing,
}

impl Ddpm {
    pub fn new(
        schedule: &NoiseSchedule,
        timesteps: Vec<usize>,
        variance: DdpmVariance,
        prediction: PredictionType,
        x0_processing: X0Processing,
    ) -> Self {
        let abar = timesteps.iter().map(|&t| schedule.abar(t)).collect();
        let abar_prev = (0..timesteps.len()).map(|i| timesteps.get(i + 1).map_or(1.0, |&p| schedule.abar(p))).collect();
        Self { timesteps, abar, abar_prev, variance, prediction, x0_processing }
    }

    /// Posterior mean coefficients (on x̂0, on x_t) and standard deviation at step `i`.
    pub fn coefficients(&self, i: usize) -> (f64, f64, f64) {
        let (a, ap) = (self.abar[i], self.abar_prev[i]);
        let alpha_t = a / ap;
        let beta_t = 1.0 - alpha_t;
        let c_x0 = ap.sqrt() * beta_t / (1.0 - a);
        let c_x = alpha_t.sqrt() * (1.0 - ap) / (1.0 - a);
        let std = match self.variance {
            DdpmVariance::FixedSmall => ((1.0 - ap) / (1.0 - a) * beta_t).max(1e-20).sqrt(),
            DdpmVariance::FixedLarge => beta_t.sqrt(),
        };
        (c_x0, c_x, std)
    }
}

impl Sampler for Ddpm {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn timestep(&self, i: usize) -> f64 {
        self.timesteps[i] as f64
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::vp::add_noise(x0, noise, self.abar[i])
    }

    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        x0_from_output(self.prediction, x, model_output, self.abar[i])
    }

    fn step_needs_noise(&self, i: usize) -> bool {
        self.timesteps[i] > 0
    }

    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        _prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (c_x0, c_x, std) = self.coefficients(i);
        let x0c = self.x0_processing.apply(x0)?;
        let mean = lincomb(&[(&x0c, c_x0), (x, c_x)])?;
        match (self.step_needs_noise(i), noise) {
            (true, Some(z)) => &mean + z.to_dtype(mean.dtype())?.affine(std, 0.0)?,
            (true, None) => candle_core::bail!("DDPM needs noise at step {i}"),
            (false, _) => Ok(mean),
        }
    }
}
