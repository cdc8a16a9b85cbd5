//! Samplers (diffusers "schedulers"). They know nothing about networks: given the model output
//! at step `i` they predict x0 and take the transition x_t -> x_{t-1} with explicitly supplied
//! noise, so steering strategies can branch particles from any step.
//!
//! NOTE for implementers: this file fixes the interface; see the submodules for each sampler.

pub mod config;
pub mod noise;

pub use config::{SamplerKind, SchedulerConfig, TimestepSpacing};
pub use noise::{NoiseSource, ReplayNoise, SeededNoise};

use candle_core::{Result, Tensor};

/// One configured sampler for a fixed number of inference steps.
///
/// Step indices run `0..num_steps()`, 0 being the noisiest. All methods are pure (no internal
/// state), so one sampler can be shared by every particle of a request.
pub trait Sampler: Send + Sync {
    /// Number of denoising steps.
    fn num_steps(&self) -> usize;

    /// The (float) timestep fed to the network at step `i` (diffusers `scheduler.timesteps[i]`).
    fn timestep(&self, i: usize) -> f64;

    /// diffusers' `init_noise_sigma`: unit-variance initial noise is multiplied by this.
    fn init_noise_sigma(&self) -> f64;

    /// diffusers' `scale_model_input` for step `i`.
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor>;

    /// The denoised prediction x0 at step `i` from the raw model output (per prediction type).
    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor>;

    /// Whether step `i` consumes fresh noise (false for deterministic steps, e.g. DDIM eta=0,
    /// Euler, or the last step of LCM/DDPM).
    fn step_needs_noise(&self, i: usize) -> bool;

    /// The transition x_t -> x_{t-1} given the predicted x0 and an explicit standard-normal
    /// `noise` tensor shaped like `x` (ignored when `step_needs_noise(i)` is false).
    fn transition(&self, x: &Tensor, x0: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor>;

    /// Full step from the raw model output: `transition(x, predict_x0(x, out, i), i, noise)`.
    fn step(&self, x: &Tensor, model_output: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let x0 = self.predict_x0(x, model_output, i)?;
        self.transition(x, &x0, i, noise)
    }

    /// True if any step consumes noise (particles can diverge).
    fn is_stochastic(&self) -> bool {
        (0..self.num_steps()).any(|i| self.step_needs_noise(i))
    }
}

/// Build the sampler `kind` for `steps` inference steps on the betas of `cfg`.
pub fn build_sampler(kind: SamplerKind, cfg: &SchedulerConfig, steps: usize, eta: f64) -> Result<Box<dyn Sampler>> {
    let _ = (kind, cfg, steps, eta);
    candle_core::bail!("samplers not implemented yet")
}
