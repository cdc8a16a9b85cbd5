//! Best-of-N: N independent samples per image, keep the highest reward.
//! With N = 1 this is plain sampling (`method: none`), and the reward, if any, is reported.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{gather, weights::argmax, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
use crate::pipeline::{GenerationError, Progress};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BestOfNSpec {
    /// Samples drawn per image; default 4.
    #[serde(default = "default_n")]
    #[schema(minimum = 1, example = 8)]
    pub n: usize,
}

fn default_n() -> usize {
    4
}

pub fn run(
    ctx: &SteerContext,
    spec: &BestOfNSpec,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Steered, GenerationError> {
    let mut r = Runner::new(ctx);
    let (n, g) = (spec.n, r.groups());
    let cond = r.conditioning(n)?;
    let (unit, mut x) = r.initial(n)?;
    let sampler = ctx.sampler;
    let total = sampler.num_steps();
    let mut prev: Option<candle_core::Tensor> = None;
    for i in 0..total {
        let out = r.predict(&cond, &x, i)?;
        // `Sampler::step` is exactly `transition(predict_x0)`; spelled out so that the step's x̂0
        // is also the progress preview, at no extra cost.
        let x0 = sampler.predict_x0(&x, &out, i)?;
        let z = if sampler.step_needs_noise(i) { Some(r.noise(n)?) } else { None };
        x = r.blend(&sampler.transition(&x, &x0, prev.as_ref(), i, z.as_ref())?, i)?;
        r.tick(progress, i + 1, total, Some(&x0))?;
        prev = Some(x0);
    }
    let decoded_all = r.decode(&x)?;
    let rewards = r.score_images(&decoded_all)?;
    let mut rows = Vec::with_capacity(g);
    let mut images = Vec::with_capacity(g);
    for grp in 0..g {
        let rs = rewards.as_ref().map(|v| &v[grp * n..(grp + 1) * n]);
        let best = rs.map(argmax).unwrap_or(0);
        rows.push((grp * n + best) as u32);
        let mut trace = Vec::new();
        if ctx.trace && n > 1 {
            if let Some(rs) = rs {
                let mut ev = TraceEvent::new(total, "select", rs.to_vec());
                ev.chosen = Some(vec![best]);
                trace.push(ev);
            }
        }
        images.push(SteeredImage {
            latents: x.narrow(0, grp * n + best, 1)?,
            reward: rs.map(|v| v[best]),
            trace,
            optimized_noise: None,
        });
    }
    let decoded = gather(&decoded_all, &rows)?;
    let init = if n == 1 { Some(unit) } else { None };
    Ok(r.finish(images, decoded, init, cond.truncated))
}
