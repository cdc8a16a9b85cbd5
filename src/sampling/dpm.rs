//! DPM-Solver++ 2M (diffusers `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`): Lu et al., "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models" (2022). A multistep sampler: from the second step
//! on, the transition extrapolates the data prediction linearly in λ = log(α/σ) from this step's
//! x̂0 and the previous one's.

use candle_core::{Result, Tensor};

use super::vp::{lincomb, x0_from_output, X0Processing};
use super::PredictionType;
use super::Sampler;

/// DPM-Solver++ 2M for a fixed step count, on σ (the Karras/Euler σ = √((1 − ᾱ)/ᾱ)).
#[derive(Debug, Clone)]
pub struct DpmSolverPP2M {
    timesteps: Vec<f64>,
    /// σ per step plus the final one (0 for `final_sigmas_type: zero`), float32 values.
    sigmas: Vec<f64>,
    /// Whether the last step is taken at first order (always with a zero final σ).
    lower_order_final: bool,
    prediction: PredictionType,
    x0_processing: X0Processing,
}

/// (α, σ_t, λ) of the VP path at Euler σ: α = 1/√(σ² + 1), σ_t = σ·α, λ = log α − log σ_t, in
/// float32 as diffusers computes them on its sigma tensor.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let s = sigma as f32;
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    let sigma_t = s * alpha;
    (alpha as f64, sigma_t as f64, (alpha.ln() - sigma_t.ln()) as f64)
}

impl DpmSolverPP2M {
    /// `sigmas` has one more entry than `timesteps`. `lower_order_final`: diffusers' rule for the
    /// last step (final σ zero, or `lower_order_final` with fewer than 15 steps, or
    /// `euler_at_final`).
    pub fn new(
        timesteps: Vec<f64>,
        sigmas: Vec<f64>,
        lower_order_final: bool,
        prediction: PredictionType,
        x0_processing: X0Processing,
    ) -> Self {
        assert_eq!(sigmas.len(), timesteps.len() + 1);
        Self { timesteps, sigmas, lower_order_final, prediction, x0_processing }
    }

    /// Whether step `i` is a second-order (multistep) update given history.
    pub fn is_second_order(&self, i: usize) -> bool {
        i >= 1 && !(self.lower_order_final && i + 1 == self.timesteps.len())
    }
}

impl Sampler for DpmSolverPP2M {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }
    fn timestep(&self, i: usize) -> f64 {
        self.timesteps[i]
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha, sigma_t, _) = alpha_sigma_lambda(self.sigmas[i]);
        lincomb(&[(x0, alpha), (&noise.to_dtype(x0.dtype())?, sigma_t)])
    }
    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha, _, _) = alpha_sigma_lambda(self.sigmas[i]);
        let x0 = x0_from_output(self.prediction, x, model_output, alpha * alpha)?;
        self.x0_processing.apply(&x0)
    }
    fn step_needs_noise(&self, _i: usize) -> bool {
        false
    }
    fn is_multistep(&self) -> bool {
        true
    }
    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        prev_x0: Option<&Tensor>,
        i: usize,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let next = self.sigmas[i + 1];
        if next == 0.0 {
            // λ_t = ∞: the update is x̂0 itself (first and second order alike).
            return Ok(x0.clone());
        }
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(next);
        let h = lambda_t - lambda_s0;
        let c = alpha_t * ((-h).exp() - 1.0);
        match prev_x0.filter(|_| self.is_second_order(i)) {
            // x_t = (σ_t/σ_s)·x − α_t(e^−h − 1)·x̂0 (the DDIM step)
            None => lincomb(&[(x, sigma_t / sigma_s0), (x0, -c)]),
            Some(m1) => {
                // D0 = m0, D1 = (m0 − m1)/r0 with r0 = h0/h; x_t = (σ_t/σ_s)·x − c·D0 − ½c·D1.
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = 0.5 * c / r0;
                lincomb(&[(x, sigma_t / sigma_s0), (x0, -c - d1), (&m1.to_dtype(x0.dtype())?, d1)])
            }
        }
    }
    /// Only the first-order steps: the others need the previous x̂0 (see [`Sampler::transition`]).
    fn step(&self, x: &Tensor, model_output: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        if self.is_second_order(i) {
            candle_core::bail!("dpmpp-2m step {i} needs the previous step's x̂0: use predict_x0 and transition");
        }
        let x0 = self.predict_x0(x, model_output, i)?;
        self.transition(x, &x0, None, i, noise)
    }
    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.clone())
    }
}
