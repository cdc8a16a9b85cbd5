//! LCM multistep sampling (diffusers `LCMScheduler`).

use candle_core::{Result, Tensor};

use super::schedule::NoiseSchedule;
use super::vp::{lincomb, x0_from_output, X0Processing};
use super::PredictionType;
use super::Sampler;

/// LCM for a fixed step count. `predict_x0` returns the consistency function's output
/// `denoised = c_out·x̂0 + c_skip·x` (x̂0 clipped/thresholded as configured); the transition
/// re-noises it to the next timestep with fresh noise, except at the last step where it returns
/// `denoised` itself.
#[derive(Debug, Clone)]
pub struct Lcm {
    pub(crate) timesteps: Vec<usize>,
    abar: Vec<f64>,
    /// ᾱ at the next scheduled timestep (unused at the last step).
    abar_next: Vec<f64>,
    c_skip: Vec<f64>,
    c_out: Vec<f64>,
    prediction: PredictionType,
    x0_processing: X0Processing,
}

impl Lcm {
    pub fn new(
        schedule: &NoiseSchedule,
        timesteps: Vec<usize>,
        timestep_scaling: f64,
        prediction: PredictionType,
        x0_processing: X0Processing,
    ) -> Self {
        let abar = timesteps.iter().map(|&t| schedule.abar(t)).collect();
        let abar_next =
            (0..timesteps.len()).map(|i| schedule.abar(*timesteps.get(i + 1).unwrap_or(&timesteps[i]))).collect();
        let sd2 = 0.25; // sigma_data = 0.5
        let scaled = |t: usize| t as f64 * timestep_scaling;
        let c_skip = timesteps.iter().map(|&t| sd2 / (scaled(t).powi(2) + sd2)).collect();
        let c_out = timesteps.iter().map(|&t| scaled(t) / (scaled(t).powi(2) + sd2).sqrt()).collect();
        Self { timesteps, abar, abar_next, c_skip, c_out, prediction, x0_processing }
    }

    /// (c_skip, c_out) at step `i`.
    pub fn scalings(&self, i: usize) -> (f64, f64) {
        (self.c_skip[i], self.c_out[i])
    }
}

impl Sampler for Lcm {
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
        let x0 = x0_from_output(self.prediction, x, model_output, self.abar[i])?;
        let x0 = self.x0_processing.apply(&x0)?;
        lincomb(&[(&x0, self.c_out[i]), (x, self.c_skip[i])])
    }

    fn step_needs_noise(&self, i: usize) -> bool {
        i + 1 < self.timesteps.len()
    }

    fn transition(
        &self,
        _x: &Tensor,
        x0: &Tensor,
        _prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !self.step_needs_noise(i) {
            return Ok(x0.clone());
        }
        let Some(z) = noise else { candle_core::bail!("LCM needs noise at step {i}") };
        let a = self.abar_next[i];
        let z = z.to_dtype(x0.dtype())?;
        lincomb(&[(x0, a.sqrt()), (&z, (1.0 - a).sqrt())])
    }
}
