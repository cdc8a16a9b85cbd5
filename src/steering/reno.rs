//! ReNO, reward-based noise optimisation (Eyring et al. 2024; docs/steering.md): gradient ascent
//! on the initial noise of a one-/few-step sampler through a differentiable reward.
//!
//! Objective per image: −r(G(ε)) + λ·(½‖ε‖² − (d − 1)·log‖ε‖), where the regulariser is the
//! negative log-density of the norm of a d-dimensional standard normal, keeping ε on its typical
//! shell. The sampler's own step noise is drawn once and replayed every iteration, so the
//! objective is deterministic. Every iterate is scored and the best one (lowest reward loss,
//! iteration 0 included) is returned with its noise, which replays the image as `init_latents`.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ms, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
use crate::pipeline::{GenerationError, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// SGD with (Nesterov) momentum, PyTorch's update rule.
    #[default]
    Sgd,
    /// Adam (β1 0.9, β2 0.999, ε `adam_eps`), PyTorch's update rule.
    Adam,
}

fn d_iterations() -> usize {
    50
}
/// The reference code's learning rate for SGD on clipped gradients.
pub const SGD_LR: f64 = 5.0;
/// Adam normalises the step, so its rate is a step size per element: 0.05 moves each noise
/// element by about 0.05 · m̂ / (√v̂ + ε).
pub const ADAM_LR: f64 = 0.05;
/// ReNO's Adam ε. With gradients clipped to norm 0.1 (~1e-3 per element), PyTorch's 1e-8
/// makes the first step ±lr on every element, which destroys the noise.
fn d_adam_eps() -> f64 {
    1e-2
}
fn d_momentum() -> f64 {
    0.9
}
fn d_true() -> bool {
    true
}
fn d_clip() -> Option<f64> {
    Some(0.1)
}
fn d_reg() -> f64 {
    0.01
}

/// `{"method": "reno", ...}`; defaults are the reference code's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenoSpec {
    /// Evaluations (iterations − 1 updates); default 50.
    #[serde(default = "d_iterations")]
    #[schema(minimum = 1, example = 50)]
    pub iterations: usize,
    #[serde(default)]
    pub optimizer: Optimizer,
    /// Learning rate; default 5.0 for SGD (the reference's), 0.05 for Adam.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Adam's ε; default 0.01 (ReNO's).
    #[serde(default = "d_adam_eps")]
    pub adam_eps: f64,
    /// SGD momentum; default 0.9.
    #[serde(default = "d_momentum")]
    pub momentum: f64,
    /// Nesterov momentum for SGD; default true.
    #[serde(default = "d_true")]
    pub nesterov: bool,
    /// Clip each image's gradient to this L2 norm; default 0.1, null = no clipping.
    #[serde(default = "d_clip")]
    pub grad_clip: Option<f64>,
    /// Weight of the noise-norm regulariser; default 0.01.
    #[serde(default = "d_reg")]
    pub reg_weight: f64,
    /// Return the optimised initial noise (base64 safetensors, like `init_latents`).
    #[serde(default)]
    pub return_noise: bool,
}

impl Default for RenoSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl RenoSpec {
    /// The learning rate in effect.
    pub fn learning_rate(&self) -> f64 {
        self.lr.unwrap_or(match self.optimizer {
            Optimizer::Sgd => SGD_LR,
            Optimizer::Adam => ADAM_LR,
        })
    }

    pub fn validate(&self) -> Result<(), crate::error::FieldError> {
        let err = |f: &str, m: String| Err(crate::error::FieldError::invalid(f, m));
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return err("lr", format!("must be positive, got {lr}"));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return err("adam_eps", format!("must be positive, got {}", self.adam_eps));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return err("momentum", format!("must be in [0, 1), got {}", self.momentum));
        }
        if let Some(c) = self.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return err("grad_clip", format!("must be positive or null, got {c}"));
            }
        }
        if !(self.reg_weight.is_finite() && self.reg_weight >= 0.0) {
            return err("reg_weight", format!("must be ≥ 0, got {}", self.reg_weight));
        }
        Ok(())
    }
}

/// ½‖ε‖² − (d − 1)·log‖ε‖ per row of ε (G, ...), as a (G,) tensor in the graph of ε.
pub fn norm_regularizer(eps: &Tensor) -> candle_core::Result<Tensor> {
    let g = eps.dim(0)?;
    let flat = eps.reshape((g, ()))?;
    let d = flat.dim(1)? as f64;
    let sq = flat.sqr()?.sum(1)?;
    (sq.clone() * 0.5)? - (sq.log()? * (0.5 * (d - 1.0)))?
}

/// The deterministic generator G(ε): the sampling loop from unit noise `eps` with fixed step
/// noise, decoded to images. Stays in the autograd graph of `eps`.
struct Generator<'r, 'a, 'c> {
    runner: &'r mut Runner<'a, 'c>,
    cond: crate::pipeline::Conditioning,
    step_noise: Vec<Option<Tensor>>,
}

impl Generator<'_, '_, '_> {
    fn latents(&mut self, eps: &Tensor) -> candle_core::Result<Tensor> {
        let sampler = self.runner.ctx.sampler;
        let mut x = self.runner.start_state(eps)?;
        let mut prev: Option<Tensor> = None;
        for i in 0..sampler.num_steps() {
            let out = self.runner.predict(&self.cond, &x, i)?;
            let x0 = sampler.predict_x0(&x, &out, i)?;
            x = sampler.transition(&x, &x0, prev.as_ref(), i, self.step_noise[i].as_ref())?;
            x = self.runner.blend_noise(&x, i, eps)?;
            prev = Some(x0);
        }
        Ok(x)
    }
}

/// Conditioning, the starting noise and the fixed step noise, drawn in the same order as plain
/// sampling so that the best noise replays with `method: none`.
fn prepare(r: &mut Runner) -> Result<(crate::pipeline::Conditioning, Tensor, Vec<Option<Tensor>>), GenerationError> {
    let cond = r.conditioning(1)?;
    let (unit, _) = r.initial(1)?;
    let sampler = r.ctx.sampler;
    let step_noise = (0..sampler.num_steps())
        .map(|i| if sampler.step_needs_noise(i) { r.noise(1).map(Some) } else { Ok(None) })
        .collect::<candle_core::Result<_>>()?;
    Ok((cond, unit, step_noise))
}

/// r(G(ε)) per image for the request `ctx`, in the autograd graph of `eps` (unit-variance
/// noise, (n, C, h, w)); the same function ReNO ascends. Tests compare its gradient with finite
/// differences.
pub fn reward_of_noise(ctx: &SteerContext, eps: &Tensor) -> Result<Tensor, GenerationError> {
    let reward =
        ctx.reward.ok_or(GenerationError::InvalidInput(crate::error::FieldError::invalid("reward", "missing")))?;
    let mut r = Runner::new(ctx);
    let (cond, _, step_noise) = prepare(&mut r)?;
    let mut gen = Generator { runner: &mut r, cond, step_noise };
    let latents = gen.latents(eps)?;
    let images = ctx.model.decode(&latents)?;
    Ok(reward.score_tensor(&images, ctx.prompt)?)
}

/// Moments of the optimiser between iterations.
#[derive(Default)]
struct OptimizerState {
    momentum: Option<Tensor>,
    second: Option<Tensor>,
}

impl OptimizerState {
    /// The update direction for iteration `it` (0-based), before the learning rate: PyTorch's
    /// SGD (with momentum, optionally Nesterov) or Adam.
    fn step(&mut self, spec: &RenoSpec, grad: &Tensor, it: usize) -> candle_core::Result<Tensor> {
        match spec.optimizer {
            Optimizer::Sgd => {
                let buf = match self.momentum.take() {
                    Some(b) => ((b * spec.momentum)? + grad)?,
                    None => grad.clone(),
                };
                let d = if spec.nesterov { (grad + (&buf * spec.momentum)?)? } else { buf.clone() };
                self.momentum = Some(buf);
                Ok(d)
            }
            Optimizer::Adam => {
                let (b1, b2, e) = (0.9f64, 0.999f64, spec.adam_eps);
                let m = match self.momentum.take() {
                    Some(m) => ((m * b1)? + (grad * (1.0 - b1))?)?,
                    None => (grad * (1.0 - b1))?,
                };
                let v = match self.second.take() {
                    Some(v) => ((v * b2)? + (grad.sqr()? * (1.0 - b2))?)?,
                    None => (grad.sqr()? * (1.0 - b2))?,
                };
                let n = (it + 1) as i32;
                let mhat = (&m / (1.0 - b1.powi(n)))?;
                let vhat = (&v / (1.0 - b2.powi(n)))?;
                self.momentum = Some(m);
                self.second = Some(v);
                mhat / (vhat.sqrt()? + e)?
            }
        }
    }
}

struct Best {
    loss: f64,
    reward: f32,
    eps: Tensor,
    latents: Tensor,
    image: Tensor,
}

pub fn run(
    ctx: &SteerContext,
    spec: &RenoSpec,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Steered, GenerationError> {
    let reward = super::differentiable_reward(ctx, "ReNO")?;
    let mut r = Runner::new(ctx);
    let groups = r.groups();
    let (cond, unit, step_noise) = prepare(&mut r)?;
    let truncated = cond.truncated;
    let mut gen = Generator { runner: &mut r, cond, step_noise };

    let eps = Var::from_tensor(&unit)?;
    let lr = spec.learning_rate();
    // Denoiser calls in one pass of G (each CFG branch counted), all differentiated by a backward.
    let calls_per_pass = ctx.sampler.num_steps() * groups * gen.cond.evals_per_latent();
    let mut state = OptimizerState::default();
    let mut best: Vec<Option<Best>> = (0..groups).map(|_| None).collect();
    let mut traces: Vec<Vec<TraceEvent>> = vec![Vec::new(); groups];

    for it in 0..spec.iterations {
        let latents = gen.latents(eps.as_tensor())?;
        let t = std::time::Instant::now();
        let images = ctx.model.decode(&latents)?;
        let scores = reward.score_tensor(&images, ctx.prompt)?;
        let rewards: Vec<f32> = scores.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        gen.runner.reward_evals += groups;
        gen.runner.timings.reward_ms += ms(t);

        for (g, slot) in best.iter_mut().enumerate() {
            let loss = -(rewards[g] as f64);
            if slot.as_ref().is_none_or(|b| loss < b.loss) && loss.is_finite() {
                *slot = Some(Best {
                    loss,
                    reward: rewards[g],
                    eps: eps.as_tensor().narrow(0, g, 1)?.detach().copy()?,
                    latents: latents.narrow(0, g, 1)?.detach(),
                    image: images.narrow(0, g, 1)?.detach(),
                });
            }
        }
        let last = it + 1 == spec.iterations;
        let mut grad_norms = vec![None; groups];
        let mut objective = vec![None; groups];
        if !last {
            let t = std::time::Instant::now();
            let reg = norm_regularizer(eps.as_tensor())?;
            let per_image = ((reg * spec.reg_weight)? - scores)?;
            objective = per_image.to_vec1::<f32>()?.into_iter().map(|v| Some(v as f64)).collect();
            let grads = per_image.sum_all()?.backward()?;
            let grad = grads
                .get(eps.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient reached the initial noise".into()))?
                .clone();
            gen.runner.timings.backward_ms += ms(t);
            gen.runner.backward_evals += calls_per_pass;
            // Per-image gradient norms, clipped image by image (images are independent problems).
            let norms: Vec<f32> = grad.reshape((groups, ()))?.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
            grad_norms = norms.iter().map(|&n| Some(n as f64)).collect();
            let grad = match spec.grad_clip {
                Some(c) => {
                    let f: Vec<f32> =
                        norms.iter().map(|&n| if n as f64 > c { (c / n as f64) as f32 } else { 1.0 }).collect();
                    let f = Tensor::from_vec(f, (groups, 1, 1, 1), grad.device())?;
                    grad.broadcast_mul(&f)?
                }
                None => grad,
            };
            let step = state.step(spec, &grad, it)?;
            eps.set(&(eps.as_tensor().detach() - (step * lr)?)?)?;
        }
        if ctx.trace {
            for (g, trace) in traces.iter_mut().enumerate() {
                let mut ev = TraceEvent::new(it, "iteration", vec![rewards[g]]);
                ev.loss = objective[g];
                ev.grad_norm = grad_norms[g];
                trace.push(ev);
            }
        }
        gen.runner.tick(progress, it + 1, spec.iterations, None)?;
    }

    let mut images = Vec::with_capacity(groups);
    let mut decoded = Vec::with_capacity(groups);
    for (g, (b, trace)) in best.into_iter().zip(traces).enumerate() {
        let b =
            b.ok_or_else(|| candle_core::Error::Msg(format!("image {g}: every ReNO iterate had a non-finite reward")))?;
        decoded.push(b.image);
        images.push(SteeredImage {
            latents: b.latents,
            reward: Some(b.reward),
            trace,
            optimized_noise: spec.return_noise.then_some(b.eps),
        });
    }
    let decoded = Tensor::cat(&decoded, 0)?;
    Ok(r.finish(images, decoded, Some(unit), truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adams_first_step_follows_the_gradient_not_its_sign() {
        // Clipped ReNO gradients are ~1e-3 per element. With ε = 1e-8 Adam's first step is
        // ±1 on every element (sign descent); with ReNO's 1e-2 it stays proportional.
        let grad = Tensor::new(&[1e-3f32, 1e-4, -1e-3], &candle_core::Device::Cpu).unwrap();
        let spec = RenoSpec { optimizer: Optimizer::Adam, ..RenoSpec::default() };
        let step: Vec<f32> = OptimizerState::default().step(&spec, &grad, 0).unwrap().to_vec1().unwrap();
        assert!(step[0] > 0.05 && step[0] < 0.15, "{step:?}");
        assert!((step[0] / step[1]) > 5.0, "small gradients must move less: {step:?}");
        assert!((step[0] + step[2]).abs() < 1e-6);
        assert!(spec.learning_rate() * (step[0] as f64) < 0.01, "first move per element stays small");
        assert_eq!(RenoSpec::default().learning_rate(), SGD_LR);
    }
}
