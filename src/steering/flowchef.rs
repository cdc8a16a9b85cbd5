//! FlowChef: steering a flow model in its vector field (Patel, Wen, Metaxas and Yang, "Steering
//! Rectified Flow Models in the Vector Field for Controlled Image Generation", arXiv 2412.00100).
//!
//! At each steered step the velocity v is computed once. Then, `inner_steps` times, the state
//! moves up the reward's gradient at the clean estimate x̂0 = x − σ·v with v held fixed, so that
//! ∂x̂0/∂x = I and the gradient reaches x through the decoder and reward only, never through
//! the transformer ("gradient skipping"). The step then continues from the moved state with the
//! same velocity. It costs no extra network call and no network backward; only the decoder and
//! the reward are differentiated. docs/flows.md has the derivation.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ms, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
use crate::pipeline::{GenerationError, Progress};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowChefSpec {
    /// Step size of each gradient move of the state, x ← x + step_size·∇r(x̂0); default 1.0.
    /// Rewards that average over pixels have small per-pixel gradients: raise it for them.
    #[serde(default = "default_step_size")]
    #[schema(minimum = 0.0, example = 1.0)]
    pub step_size: f64,
    /// Gradient moves per steered step; default 5 (the reference implementation's).
    #[serde(default = "default_inner_steps")]
    #[schema(minimum = 1, example = 5)]
    pub inner_steps: usize,
    /// Steer the first `max_steps` steps only (the rest sample plainly); default every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_steps: Option<usize>,
}

fn default_step_size() -> f64 {
    1.0
}
fn default_inner_steps() -> usize {
    5
}

impl Default for FlowChefSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// Largest `inner_steps` a request may ask for (each is a decoder and reward backward per image
/// per step).
pub const MAX_INNER_STEPS: usize = 50;

impl FlowChefSpec {
    pub fn validate(&self) -> Result<(), crate::error::FieldError> {
        let err = |f: &str, m: String| Err(crate::error::FieldError::invalid(f, m));
        if !(self.step_size.is_finite() && self.step_size >= 0.0) {
            return err("step_size", format!("must be a finite number ≥ 0, got {}", self.step_size));
        }
        if self.inner_steps == 0 || self.inner_steps > MAX_INNER_STEPS {
            return err("inner_steps", format!("must be in [1, {MAX_INNER_STEPS}], got {}", self.inner_steps));
        }
        if self.max_steps == Some(0) {
            return err("max_steps", "must be at least 1 (leave it out to steer every step)".into());
        }
        Ok(())
    }
}

pub fn run(
    ctx: &SteerContext,
    spec: &FlowChefSpec,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Steered, GenerationError> {
    super::differentiable_reward(ctx, "FlowChef")?;
    let mut r = Runner::new(ctx);
    let groups = r.groups();
    let cond = r.conditioning(1)?;
    let (unit, mut x) = r.initial(1)?;
    let sampler = ctx.sampler;
    let total = sampler.num_steps();
    let steered = spec.max_steps.unwrap_or(total).min(total);
    let mut traces: Vec<Vec<TraceEvent>> = vec![Vec::new(); groups];
    let mut prev: Option<Tensor> = None;
    for i in 0..total {
        let out = r.predict(&cond, &x, i)?.detach();
        if i < steered && spec.step_size > 0.0 {
            let mut rewards = vec![Vec::with_capacity(spec.inner_steps); groups];
            let mut norms = vec![0f64; groups];
            for _ in 0..spec.inner_steps {
                let t = std::time::Instant::now();
                let (values, grad) = reward_gradient(ctx, &x, &out, i)?;
                r.reward_evals += groups;
                let n: Vec<f32> = grad.reshape((groups, ()))?.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
                x = (x.detach() + (grad * spec.step_size)?)?;
                r.timings.backward_ms += ms(t);
                for g in 0..groups {
                    rewards[g].push(values[g]);
                    norms[g] = n[g] as f64;
                }
            }
            if ctx.trace {
                for (g, trace) in traces.iter_mut().enumerate() {
                    let mut ev = TraceEvent::new(i, "guide", std::mem::take(&mut rewards[g]));
                    ev.grad_norm = Some(norms[g]);
                    trace.push(ev);
                }
            }
        }
        // The step from the moved state with the velocity computed before the moves.
        let x0 = sampler.predict_x0(&x, &out, i)?;
        let z = if sampler.step_needs_noise(i) { Some(r.noise(1)?) } else { None };
        x = r.blend(&sampler.transition(&x, &x0, prev.as_ref(), i, z.as_ref())?, i)?;
        r.tick(progress, i + 1, total, Some(&x0))?;
        prev = Some(x0);
    }
    let decoded = r.decode(&x)?;
    let rewards = r.score_images(&decoded)?.expect("a reward is set");
    let images = traces
        .into_iter()
        .enumerate()
        .map(|(g, mut trace)| {
            if ctx.trace {
                trace.push(TraceEvent::new(total, "final", vec![rewards[g]]));
            }
            Ok(SteeredImage { latents: x.narrow(0, g, 1)?, reward: Some(rewards[g]), trace, optimized_noise: None })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(r.finish(images, decoded, Some(unit), cond.truncated))
}

/// The rewards at x̂0 = predict_x0(x, out) and their gradient with respect to the state x with
/// the network output `out` held fixed (for flows ∇ₓ r(decode(x − σ·v)) = ∇ r at x̂0).
pub fn reward_gradient(
    ctx: &SteerContext,
    x: &Tensor,
    out: &Tensor,
    i: usize,
) -> Result<(Vec<f32>, Tensor), GenerationError> {
    let reward =
        ctx.reward.ok_or(GenerationError::InvalidInput(crate::error::FieldError::invalid("reward", "missing")))?;
    let state = Var::from_tensor(&x.detach())?;
    let x0 = ctx.sampler.predict_x0(state.as_tensor(), &out.detach(), i)?;
    let scores = reward.score_tensor(&ctx.model.decode(&x0)?, ctx.prompt)?;
    let values = scores.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let grads = scores.sum_all()?.backward()?;
    let grad = grads
        .get(state.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the state".into()))?
        .clone();
    Ok((values, grad))
}
