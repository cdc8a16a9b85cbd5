//! DDIM (diffusers `DDIMScheduler`), deterministic for η = 0.

use candle_core::{Result, Tensor};

use super::schedule::NoiseSchedule;
use super::vp::{eps_from_x0, lincomb, x0_from_output, X0Processing};
use super::PredictionType;
use super::Sampler;

/// DDIM for a fixed step count.
///
/// `predict_x0` returns x̂0 *before* `clip_sample`/thresholding; the transition clips it for the
/// x0 term but, like diffusers (`use_clipped_model_output = False`), takes ε̂ from the unclipped
/// prediction. Without clipping (every SD config) x̂0 is the prediction diffusers reports.
#[derive(Debug, Clone)]
pub struct Ddim {
    pub(crate) timesteps: Vec<usize>,
    /// ᾱ at each step's timestep.
    abar: Vec<f64>,
    /// ᾱ at the previous timestep `t − num_train/steps`, or `final_alpha_cumprod` below 0.
    abar_prev: Vec<f64>,
    eta: f64,
    prediction: PredictionType,
    x0_processing: X0Processing,
}

impl Ddim {
    pub fn new(
        schedule: &NoiseSchedule,
        timesteps: Vec<usize>,
        set_alpha_to_one: bool,
        eta: f64,
        prediction: PredictionType,
        x0_processing: X0Processing,
    ) -> Self {
        let n = timesteps.len();
        let ratio = (schedule.len() / n) as i64;
        let final_abar = if set_alpha_to_one { 1.0 } else { schedule.abar(0) };
        let abar = timesteps.iter().map(|&t| schedule.abar(t)).collect();
        let abar_prev = timesteps
            .iter()
            .map(|&t| {
                let p = t as i64 - ratio;
                if p >= 0 {
                    schedule.abar(p as usize)
                } else {
                    final_abar
                }
            })
            .collect();
        Self { timesteps, abar, abar_prev, eta, prediction, x0_processing }
    }

    /// DDIM σ_t(η) at step `i`: `η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))`.
    pub fn std_dev(&self, i: usize) -> f64 {
        let (a, ap) = (self.abar[i], self.abar_prev[i]);
        let var = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
        self.eta * var.max(0.0).sqrt()
    }

    /// ᾱ at step `i` and at its previous timestep.
    pub fn alphas(&self, i: usize) -> (f64, f64) {
        (self.abar[i], self.abar_prev[i])
    }
}

impl Sampler for Ddim {
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

    fn step_needs_noise(&self, _i: usize) -> bool {
        self.eta > 0.0
    }

    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        _prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (a, ap) = (self.abar[i], self.abar_prev[i]);
        let std = self.std_dev(i);
        let dir = (1.0 - ap - std * std).max(0.0).sqrt();
        let mean = if self.x0_processing.is_none() {
            // √ᾱp·x0 + dir·(x − √ᾱ·x0)/√(1−ᾱ)
            let sb = (1.0 - a).sqrt();
            lincomb(&[(x0, ap.sqrt() - dir * a.sqrt() / sb), (x, dir / sb)])?
        } else {
            let eps = eps_from_x0(x, x0, a)?;
            let x0c = self.x0_processing.apply(x0)?;
            lincomb(&[(&x0c, ap.sqrt()), (&eps, dir)])?
        };
        match (self.step_needs_noise(i), noise) {
            (true, Some(z)) => &mean + z.to_dtype(mean.dtype())?.affine(std, 0.0)?,
            (true, None) => candle_core::bail!("DDIM with eta > 0 needs noise at step {i}"),
            (false, _) => Ok(mean),
        }
    }
}
