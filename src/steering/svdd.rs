//! SVDD-PM, soft value-based decoding (Li et al. 2024; docs/steering.md): at every step but the
//! last, draw M candidate next states from the sampler's own transition (one shared model
//! prediction, fresh noise each), value each by the reward of its predicted x0, and keep one:
//! the argmax when α = 0, else a draw from softmax(value / α) (target p·exp(r/α)).
//!
//! The winner's model output at the next timestep is cached and reused as that step's shared
//! prediction, which saves one of the M + 1 evaluations per step of the reference code. A
//! one-step run (a 1-step LCM or Turbo generator) has no transition to choose between, so SVDD
//! chooses among M starting noises by the value of their x̂0 instead.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::weights::{argmax, categorical, ess, normalize};
use super::{gather, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
use crate::pipeline::{GenerationError, Progress};

fn default_candidates() -> usize {
    8
}

/// `{"method": "svdd", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SvddSpec {
    /// Candidates per step (M); default 8.
    #[serde(default = "default_candidates")]
    #[schema(minimum = 1, example = 16)]
    pub candidates: usize,
    /// Temperature: target p·exp(r/α); 0 (default) picks the best candidate.
    #[serde(default)]
    #[schema(minimum = 0.0)]
    pub alpha: f64,
}

impl SvddSpec {
    pub fn validate(&self) -> Result<(), crate::error::FieldError> {
        if !self.alpha.is_finite() || self.alpha < 0.0 {
            return Err(crate::error::FieldError::invalid(
                "alpha",
                format!("must be a finite number ≥ 0, got {}", self.alpha),
            ));
        }
        Ok(())
    }
}

/// Choose one of `m` candidates per group by their values: the argmax when α = 0, else a draw
/// from softmax(value / α). Returns global row indices.
fn select(r: &mut Runner, spec: &SvddSpec, values: &[f32], step: usize, traces: &mut [Vec<TraceEvent>]) -> Vec<u32> {
    let m = spec.candidates;
    let trace_on = r.ctx.trace;
    let mut rows = Vec::with_capacity(traces.len());
    for (g, trace) in traces.iter_mut().enumerate() {
        let v = &values[g * m..(g + 1) * m];
        let (pick, probs) = if spec.alpha == 0.0 {
            (argmax(v), None)
        } else {
            let logits: Vec<f64> = v.iter().map(|&s| s as f64 / spec.alpha).collect();
            let w = normalize(&logits);
            (categorical(&w, &mut r.rngs[g]), Some(w))
        };
        if trace_on {
            let mut ev = TraceEvent::new(step, "select", v.to_vec());
            ev.ess = probs.as_deref().map(ess);
            ev.weights = probs;
            ev.chosen = Some(vec![pick]);
            trace.push(ev);
        }
        rows.push((g * m + pick) as u32);
    }
    rows
}

pub fn run(
    ctx: &SteerContext,
    spec: &SvddSpec,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Steered, GenerationError> {
    let mut r = Runner::new(ctx);
    let (m, groups) = (spec.candidates, r.groups());
    let sampler = ctx.sampler;
    let total = sampler.num_steps();
    let mut traces: Vec<Vec<TraceEvent>> = vec![Vec::new(); groups];
    if total == 1 {
        return one_step(r, spec, traces, progress);
    }
    let cond_one = r.conditioning(1)?;
    let cond_cands = r.conditioning(m)?;
    let (_, mut x) = r.initial(1)?;
    let repeat: Vec<u32> = (0..groups).flat_map(|g| std::iter::repeat_n(g as u32, m)).collect();
    let mut cached: Option<candle_core::Tensor> = None;
    // The chosen rows' x̂0 of the previous step (multistep samplers).
    let mut prev: Option<candle_core::Tensor> = None;

    for i in 0..total {
        let out = match cached.take() {
            Some(o) => o,
            None => r.predict(&cond_one, &x, i)?,
        };
        let x0 = sampler.predict_x0(&x, &out, i)?;
        if i + 1 == total {
            let z = if sampler.step_needs_noise(i) { Some(r.noise(1)?) } else { None };
            x = r.blend(&sampler.transition(&x, &x0, prev.as_ref(), i, z.as_ref())?, i)?;
            r.tick(progress, i + 1, total, Some(&x0))?;
            break;
        }
        let xs = gather(&x, &repeat)?;
        let x0s = gather(&x0, &repeat)?;
        let prevs = prev.as_ref().map(|p| gather(p, &repeat)).transpose()?;
        let z = if sampler.step_needs_noise(i) { Some(r.noise(m)?) } else { None };
        let cands = r.blend(&sampler.transition(&xs, &x0s, prevs.as_ref(), i, z.as_ref())?, i)?;
        let out_c = r.predict(&cond_cands, &cands, i + 1)?;
        let x0_c = sampler.predict_x0(&cands, &out_c, i + 1)?;
        let values = r.score(&x0_c)?;
        let rows = select(&mut r, spec, &values, i, &mut traces);
        x = gather(&cands, &rows)?;
        cached = Some(gather(&out_c, &rows)?);
        prev = Some(gather(&x0s, &rows)?);
        // The preview is the first image's chosen x̂0: a view, not a gather of every group.
        r.tick(progress, i + 1, total, Some(&x0_c.narrow(0, rows[0] as usize, 1)?))?;
    }
    finish(r, x, traces, cond_one.truncated)
}

/// A one-step run has no transition to draw candidates from: SVDD chooses among M starting
/// noises by the value of their x̂0, which for a one-step sampler is the image itself.
fn one_step(
    mut r: Runner,
    spec: &SvddSpec,
    mut traces: Vec<Vec<TraceEvent>>,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Steered, GenerationError> {
    let sampler = r.ctx.sampler;
    let cond = r.conditioning(spec.candidates)?;
    let (_, xs) = r.initial(spec.candidates)?;
    let out = r.predict(&cond, &xs, 0)?;
    let x0s = sampler.predict_x0(&xs, &out, 0)?;
    let values = r.score(&x0s)?;
    let rows = select(&mut r, spec, &values, 0, &mut traces);
    let (x, x0) = (gather(&xs, &rows)?, gather(&x0s, &rows)?);
    let z = if sampler.step_needs_noise(0) { Some(r.noise(1)?) } else { None };
    let x = r.blend(&sampler.transition(&x, &x0, None, 0, z.as_ref())?, 0)?;
    r.tick(progress, 1, 1, Some(&x0.narrow(0, 0, 1)?))?;
    finish(r, x, traces, cond.truncated)
}

fn finish(
    mut r: Runner,
    x: candle_core::Tensor,
    traces: Vec<Vec<TraceEvent>>,
    truncated: bool,
) -> Result<Steered, GenerationError> {
    let decoded = r.decode(&x)?;
    let rewards = r.score_images(&decoded)?.expect("svdd has a reward");
    let mut images = Vec::with_capacity(traces.len());
    for (g, trace) in traces.into_iter().enumerate() {
        images.push(SteeredImage {
            latents: x.narrow(0, g, 1)?,
            reward: Some(rewards[g]),
            trace,
            optimized_noise: None,
        });
    }
    Ok(r.finish(images, decoded, None, truncated))
}
