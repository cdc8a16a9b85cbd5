//! SVDD-PM, soft value-based decoding (Li et al. 2024; docs/steering.md): at every step but the
//! last, draw M candidate next states from the sampler's own transition (one shared model
//! prediction, fresh noise each), value each by the reward of its predicted x0, and keep one:
//! the argmax when α = 0, else a draw from softmax(value / α) (target p·exp(r/α)).
//!
//! The winner's model output at the next timestep is cached and reused as that step's shared
//! prediction, which saves one of the M + 1 evaluations per step of the reference code.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::weights::{argmax, categorical, ess, normalize};
use super::{gather, tick, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
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
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.alpha.is_finite() || self.alpha < 0.0 {
            return Err(("alpha".into(), format!("must be a finite number ≥ 0, got {}", self.alpha)));
        }
        Ok(())
    }
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
    let cond_one = r.conditioning(1)?;
    let cond_cands = if total > 1 { Some(r.conditioning(m)?) } else { None };
    let (unit, mut x) = r.initial(1)?;
    let repeat: Vec<u32> = (0..groups).flat_map(|g| std::iter::repeat_n(g as u32, m)).collect();
    let mut cached: Option<candle_core::Tensor> = None;
    let mut traces: Vec<Vec<TraceEvent>> = vec![Vec::new(); groups];

    for i in 0..total {
        let out = match cached.take() {
            Some(o) => o,
            None => r.predict(&cond_one, &x, i)?,
        };
        let x0 = sampler.predict_x0(&x, &out, i)?;
        if i + 1 == total {
            let z = if sampler.step_needs_noise(i) { Some(r.noise(1)?) } else { None };
            x = sampler.transition(&x, &x0, i, z.as_ref())?;
            tick(progress, i + 1, total, Some(&x0))?;
            break;
        }
        let xs = gather(&x, &repeat)?;
        let x0s = gather(&x0, &repeat)?;
        let z = if sampler.step_needs_noise(i) { Some(r.noise(m)?) } else { None };
        let cands = sampler.transition(&xs, &x0s, i, z.as_ref())?;
        let cond = cond_cands.as_ref().expect("built when total > 1");
        let out_c = r.predict(cond, &cands, i + 1)?;
        let x0_c = sampler.predict_x0(&cands, &out_c, i + 1)?;
        let values = r.score(&x0_c)?;
        let mut rows = Vec::with_capacity(groups);
        for (g, trace) in traces.iter_mut().enumerate() {
            let v = &values[g * m..(g + 1) * m];
            let (pick, probs) = if spec.alpha == 0.0 {
                (argmax(v), None)
            } else {
                let logits: Vec<f64> = v.iter().map(|&s| s as f64 / spec.alpha).collect();
                let w = normalize(&logits);
                (categorical(&w, &mut r.rngs[g]), Some(w))
            };
            if ctx.trace {
                let mut ev = TraceEvent::new(i, "select", v.to_vec());
                ev.ess = probs.as_deref().map(ess);
                ev.weights = probs;
                ev.chosen = Some(vec![pick]);
                trace.push(ev);
            }
            rows.push((g * m + pick) as u32);
        }
        x = gather(&cands, &rows)?;
        cached = Some(gather(&out_c, &rows)?);
        // The preview is the first image's chosen x̂0: a view, not a gather of every group.
        tick(progress, i + 1, total, Some(&x0_c.narrow(0, rows[0] as usize, 1)?))?;
    }

    let decoded = r.decode(&x)?;
    let rewards = r.score_images(&decoded)?.expect("svdd has a reward");
    let mut images = Vec::with_capacity(groups);
    for (g, trace) in traces.into_iter().enumerate() {
        images.push(SteeredImage {
            latents: x.narrow(0, g, 1)?,
            reward: Some(rewards[g]),
            trace,
            optimized_noise: None,
        });
    }
    let _ = unit;
    Ok(r.finish(images, decoded, None, cond_one.truncated))
}
