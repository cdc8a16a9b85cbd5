//! Samplers for flow-matching (rectified-flow) models: the state is x_σ = (1 − σ)·x0 + σ·ε and
//! the network predicts the velocity v = ε − x0, so x̂0 = x − σ·v.
//!
//! - [`FlowEuler`]: diffusers' `FlowMatchEulerDiscreteScheduler` (shift, dynamic shifting,
//!   `shift_terminal`, `stochastic_sampling`), step for step.
//! - [`FlowSde`]: a stochastic sampler with a noise level η ∈ [0, 1] that keeps the marginals
//!   of the flow path: the DDIM-η family written for the path a = 1 − σ, s = σ
//!   (docs/flows.md). η = 0 is the Euler step; FK and SVDD use it with η > 0 so that
//!   particles diverge.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::vp::{lincomb, match_dtype};
use super::Sampler;

/// `scheduler/scheduler_config.json` of a flow-matching model, as diffusers'
/// `FlowMatchEulerDiscreteScheduler` reads it (missing keys take the class defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowSchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_base_shift", deserialize_with = "null_as")]
    pub base_shift: f64,
    #[serde(default = "default_max_shift", deserialize_with = "null_as")]
    pub max_shift: f64,
    #[serde(default = "default_base_seq")]
    pub base_image_seq_len: usize,
    #[serde(default = "default_max_seq")]
    pub max_image_seq_len: usize,
    #[serde(default, deserialize_with = "null_as_default")]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_karras_sigmas: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_exponential_sigmas: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_beta_sigmas: bool,
    /// "exponential" (FLUX) or "linear".
    #[serde(default)]
    pub time_shift_type: Option<String>,
    /// diffusers' re-noising step: x' = (1 − σ')·x̂0 + σ'·z.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stochastic_sampling: bool,
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `base_shift`/`max_shift` may be written as `null` (the class default applies).
fn null_as<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn default_train_steps() -> usize {
    1000
}
fn one() -> f64 {
    1.0
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_base_seq() -> usize {
    256
}
fn default_max_seq() -> usize {
    4096
}

/// How a pipeline picks the σ it passes to `set_timesteps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowSigmas {
    /// The scheduler's own: timesteps evenly spaced between its (shifted) σ_max·N and σ_min·N,
    /// then shifted (Stable Diffusion 3 pipelines).
    Scheduler,
    /// `linspace(1, 1/steps, steps)`, then shifted (FLUX pipelines).
    Linspace,
}

impl FlowSchedulerConfig {
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        let mut cfg: Self = serde_json::from_str(&crate::util::json::from_python_json(text))?;
        if cfg.base_shift.is_nan() {
            cfg.base_shift = default_base_shift();
        }
        if cfg.max_shift.is_nan() {
            cfg.max_shift = default_max_shift();
        }
        Ok(cfg)
    }

    /// The options tiller does not sample, as an error naming them.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.num_train_timesteps < 2 {
            return Err(format!("num_train_timesteps must be at least 2, got {}", self.num_train_timesteps));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(format!("shift must be positive, got {}", self.shift));
        }
        if self.invert_sigmas {
            return Err("invert_sigmas (Mochi's inverted schedule) is not supported".into());
        }
        if self.use_karras_sigmas || self.use_exponential_sigmas || self.use_beta_sigmas {
            return Err("Karras/exponential/beta sigmas on a flow schedule are not supported".into());
        }
        if let Some(t) = self.shift_terminal {
            if !(0.0..1.0).contains(&t) {
                return Err(format!("shift_terminal must be in [0, 1), got {t}"));
            }
        }
        match self.time_shift_type.as_deref() {
            None | Some("exponential") | Some("linear") => {}
            Some(other) => return Err(format!("time_shift_type `{other}` is not supported")),
        }
        if self.use_dynamic_shifting && self.max_image_seq_len == self.base_image_seq_len {
            return Err("max_image_seq_len must differ from base_image_seq_len for dynamic shifting".into());
        }
        Ok(())
    }

    /// μ of resolution-dependent shifting for an image of `image_seq_len` tokens: linear
    /// between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the FLUX
    /// and SD3 pipelines compute it.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let (x0, x1) = (self.base_image_seq_len as f64, self.max_image_seq_len as f64);
        let m = (self.max_shift - self.base_shift) / (x1 - x0);
        let b = self.base_shift - m * x0;
        image_seq_len as f64 * m + b
    }

    /// The shift applied to unshifted σ (f64 numpy arithmetic, as in `set_timesteps`).
    fn shift_sigma(&self, s: f64, mu: f64) -> f64 {
        if self.use_dynamic_shifting {
            let e = match self.time_shift_type.as_deref() {
                Some("linear") => mu,
                _ => mu.exp(),
            };
            e / (e + (1.0 / s - 1.0))
        } else {
            self.shift * s / (1.0 + (self.shift - 1.0) * s)
        }
    }

    /// σ per step (float32 values) for `steps` steps, noisiest first, without the final 0.
    pub fn sigmas(&self, steps: usize, source: FlowSigmas, image_seq_len: usize) -> Vec<f64> {
        let n = self.num_train_timesteps as f64;
        // __init__: the training sigmas in float32, shifted unless shifting is dynamic.
        let train = |k: f64| -> f64 {
            let s = (k as f32 / n as f32) as f64;
            if self.use_dynamic_shifting {
                s
            } else {
                let sh = self.shift as f32;
                let s = s as f32;
                (sh * s / (1.0 + (sh - 1.0) * s)) as f64
            }
        };
        let (sigma_max, sigma_min) = (train(n), train(1.0));
        let base: Vec<f64> = match source {
            FlowSigmas::Scheduler => {
                super::schedule::np_linspace(sigma_max * n, sigma_min * n, steps).into_iter().map(|t| t / n).collect()
            }
            FlowSigmas::Linspace => super::schedule::np_linspace(1.0, 1.0 / steps as f64, steps),
        };
        let mu = self.mu(image_seq_len);
        let mut sigmas: Vec<f64> = base.iter().map(|&s| self.shift_sigma(s, mu)).collect();
        if let Some(terminal) = self.shift_terminal.filter(|t| *t > 0.0) {
            let last = 1.0 - sigmas[sigmas.len() - 1];
            let scale = last / (1.0 - terminal);
            for s in sigmas.iter_mut() {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        sigmas.into_iter().map(|s| s as f32 as f64).collect()
    }
}

/// σ schedule shared by the flow samplers: one σ per step plus the final 0, and the timesteps
/// σ·N fed to the network.
#[derive(Debug, Clone)]
struct FlowSchedule {
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

impl FlowSchedule {
    fn new(mut sigmas: Vec<f64>, num_train: usize) -> Self {
        let timesteps = sigmas.iter().map(|&s| (s as f32 * num_train as f32) as f64).collect();
        sigmas.push(0.0);
        Self { sigmas, timesteps }
    }

    fn x0(&self, x: &Tensor, velocity: &Tensor, i: usize) -> Result<Tensor> {
        let v = match_dtype(velocity, x)?;
        lincomb(&[(x, 1.0), (&v, -self.sigmas[i])])
    }

    /// `scale_noise`: the flow path at σ_i from a clean x0.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        lincomb(&[(x0, 1.0 - s), (&noise.to_dtype(x0.dtype())?, s)])
    }

    /// The deterministic (Euler, η = 0) move from σ_i to σ_{i+1} given x̂0:
    /// x + (σ' − σ)·v = x̂0 + (x − x̂0)·σ'/σ.
    fn euler(&self, x: &Tensor, x0: &Tensor, i: usize) -> Result<Tensor> {
        let r = self.sigmas[i + 1] / self.sigmas[i];
        lincomb(&[(x0, 1.0 - r), (x, r)])
    }
}

/// diffusers' `FlowMatchEulerDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct FlowEuler {
    schedule: FlowSchedule,
    /// `stochastic_sampling`: re-noise x̂0 to σ' with fresh noise instead of the Euler move.
    renoise: bool,
}

impl FlowEuler {
    pub fn new(sigmas: Vec<f64>, num_train: usize, renoise: bool) -> Self {
        Self { schedule: FlowSchedule::new(sigmas, num_train), renoise }
    }
}

impl Sampler for FlowEuler {
    fn num_steps(&self) -> usize {
        self.schedule.timesteps.len()
    }
    fn timestep(&self, i: usize) -> f64 {
        self.schedule.timesteps[i]
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        self.schedule.add_noise(x0, noise, i)
    }
    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        self.schedule.x0(x, model_output, i)
    }
    /// diffusers draws at every step when re-noising, the last included (where σ' = 0).
    fn step_needs_noise(&self, _i: usize) -> bool {
        self.renoise
    }
    fn injects_noise(&self, i: usize) -> bool {
        self.renoise && self.schedule.sigmas[i + 1] > 0.0
    }
    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        _prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !self.renoise {
            return self.schedule.euler(x, x0, i);
        }
        let Some(z) = noise else { candle_core::bail!("flow-euler with stochastic_sampling needs noise at step {i}") };
        let s = self.schedule.sigmas[i + 1];
        lincomb(&[(x0, 1.0 - s), (&z.to_dtype(x0.dtype())?, s)])
    }
    /// diffusers' own update `x + (σ' − σ)·v`, which rounds like it does.
    fn step(&self, x: &Tensor, model_output: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        if self.renoise {
            let x0 = self.predict_x0(x, model_output, i)?;
            return self.transition(x, &x0, None, i, noise);
        }
        let v = match_dtype(model_output, x)?;
        let dt = self.schedule.sigmas[i + 1] as f32 - self.schedule.sigmas[i] as f32;
        x + v.affine(dt as f64, 0.0)?
    }
    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.schedule.sigmas.clone())
    }
}

/// The stochastic flow sampler: from σ to σ' < σ with a = 1 − σ, s = σ,
///
/// ε̂ = (x − a·x̂0)/s,  x' = a'·x̂0 + √(s'² − c²)·ε̂ + c·z,  c = η·s'·√(1 − (a·s' / (a'·s))²),
///
/// the DDIM-η step of Song et al. (2021) on the flow path: c² is η² times the variance of the
/// exact posterior q(x' | x, x0), so η = 1 is ancestral sampling and η = 0 the Euler step.
#[derive(Debug, Clone)]
pub struct FlowSde {
    schedule: FlowSchedule,
    /// c per step.
    noise_scale: Vec<f64>,
}

impl FlowSde {
    pub fn new(sigmas: Vec<f64>, num_train: usize, eta: f64) -> Self {
        let schedule = FlowSchedule::new(sigmas, num_train);
        let noise_scale = (0..schedule.timesteps.len())
            .map(|i| {
                let (s, s1) = (schedule.sigmas[i], schedule.sigmas[i + 1]);
                let (a, a1) = (1.0 - s, 1.0 - s1);
                if s1 <= 0.0 || eta == 0.0 {
                    return 0.0;
                }
                let ratio = if a1 > 0.0 { (a * s1 / (a1 * s)).min(1.0) } else { 0.0 };
                eta * s1 * (1.0 - ratio * ratio).max(0.0).sqrt()
            })
            .collect();
        Self { schedule, noise_scale }
    }

    /// c at step `i`: the standard deviation of the noise the step adds.
    pub fn noise_scale(&self, i: usize) -> f64 {
        self.noise_scale[i]
    }
}

impl Sampler for FlowSde {
    fn num_steps(&self) -> usize {
        self.schedule.timesteps.len()
    }
    fn timestep(&self, i: usize) -> f64 {
        self.schedule.timesteps[i]
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        self.schedule.add_noise(x0, noise, i)
    }
    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        self.schedule.x0(x, model_output, i)
    }
    fn step_needs_noise(&self, i: usize) -> bool {
        self.noise_scale[i] > 0.0
    }
    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        _prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = self.noise_scale[i];
        if c == 0.0 {
            return self.schedule.euler(x, x0, i);
        }
        let Some(z) = noise else { candle_core::bail!("flow-sde needs noise at step {i}") };
        let (s, s1) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let (a, a1) = (1.0 - s, 1.0 - s1);
        let k = (s1 * s1 - c * c).max(0.0).sqrt() / s;
        // a'·x̂0 + k·(x − a·x̂0) + c·z
        lincomb(&[(x0, a1 - k * a), (x, k), (&z.to_dtype(x0.dtype())?, c)])
    }
    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.schedule.sigmas.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(json: &str) -> FlowSchedulerConfig {
        let c = FlowSchedulerConfig::from_json(json).unwrap();
        c.check().unwrap();
        c
    }

    #[test]
    fn eta_zero_is_the_euler_step() {
        let c = cfg(r#"{"shift": 3.0}"#);
        let sig = c.sigmas(5, FlowSigmas::Scheduler, 0);
        let euler = FlowEuler::new(sig.clone(), 1000, false);
        let sde = FlowSde::new(sig, 1000, 0.0);
        assert!(!sde.is_stochastic());
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.3f32, -1.2, 0.7], &dev).unwrap();
        let v = Tensor::new(&[1.0f32, 0.5, -0.25], &dev).unwrap();
        for i in 0..5 {
            let a = euler.step(&x, &v, i, None).unwrap().to_vec1::<f32>().unwrap();
            let b = sde.step(&x, &v, i, None).unwrap().to_vec1::<f32>().unwrap();
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-5, "step {i}: {a:?} vs {b:?}");
            }
        }
    }

    /// With x̂0 fixed, a flow-sde step from x = a·x0 + s·ε must land on the marginal at σ':
    /// mean a'·x0 and variance s'² (for every η). Checked in closed form on the coefficients.
    #[test]
    fn sde_step_keeps_the_path_marginal() {
        let c = cfg("{}");
        for eta in [0.0, 0.3, 1.0] {
            let sig = c.sigmas(6, FlowSigmas::Linspace, 0);
            let sde = FlowSde::new(sig.clone(), 1000, eta);
            for i in 0..5 {
                let (s, s1) = (sig[i], sig[i + 1]);
                let (a, a1) = (1.0 - s, 1.0 - s1);
                let cc = sde.noise_scale(i);
                let k = (s1 * s1 - cc * cc).sqrt() / s;
                // x' = (a' − k·a)·x0 + k·x + c·z, with x = a·x0 + s·ε
                let mean = a1 - k * a + k * a;
                let var = (k * s).powi(2) + cc * cc;
                assert!((mean - a1).abs() < 1e-12 && (var - s1 * s1).abs() < 1e-12, "eta {eta} step {i}");
                assert!(cc <= s1 + 1e-15);
            }
            // η = 1 from σ = 1 (a = 0) forgets the state: all fresh noise.
            if eta == 1.0 {
                assert!((sde.noise_scale(0) - sig[1]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn dynamic_shift_mu_is_linear_in_the_sequence_length() {
        let c = cfg(r#"{"use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15}"#);
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
        assert!((c.mu(1024) - (0.5 + 0.65 * 768.0 / 3840.0)).abs() < 1e-12);
    }

    #[test]
    fn unsupported_options_are_named() {
        for (json, word) in [
            (r#"{"invert_sigmas": true}"#, "invert_sigmas"),
            (r#"{"use_karras_sigmas": true}"#, "Karras"),
            (r#"{"time_shift_type": "cubic"}"#, "cubic"),
            (r#"{"shift": 0}"#, "shift"),
        ] {
            let e = FlowSchedulerConfig::from_json(json).unwrap().check().unwrap_err();
            assert!(e.contains(word), "{json}: {e}");
        }
    }
}
