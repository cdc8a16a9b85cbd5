//! Feynman–Kac steering (Singhal et al. 2025): k particles per image, reweighted by reward
//! potentials on the predicted x0 at scheduled steps and resampled, so the population targets
//! p(x)·exp(β·r(x)).
//!
//! This is the corrected loop described in docs/steering.md, not the reference code's: log-space
//! weights, the potential belongs to the current particle (no one-step lag), every per-particle
//! field is gathered on resampling, and the final weights include the exact terminal
//! correction so that along every ancestry the log-potentials sum to β·r(x0). Only `diff` is
//! close to calibrated at small k; `max`, `sum` and `current` tilt intermediate populations much
//! harder and act as reward maximisers.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::weights::{argmax, categorical, ess, normalize, resample, Resampler};
use super::{gather, global_indices, tick, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
use crate::pipeline::{GenerationError, Progress};

/// How a particle's reward history becomes a log-potential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Potential {
    /// exp(β·(r_t − r_prev)): telescopes to exp(β·r0); calibrated sampling.
    #[default]
    Diff,
    /// exp(β·max reward so far): greedy.
    Max,
    /// exp(β·sum of rewards so far): greediest.
    Sum,
    /// exp(β·r_t): greedy.
    Current,
}

/// Which particle an image returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// One particle drawn from the final weights: a sample of the tilted target.
    #[default]
    Sample,
    /// The particle with the highest final reward.
    Best,
}

/// When to resample: every `every` steps from `start` to `end` (fractions of the trajectory),
/// never at step 0 (x̂0 of pure noise says nothing), plus the final reweighting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResampleSchedule {
    #[serde(default = "default_every")]
    #[schema(minimum = 1)]
    pub every: usize,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub start: f64,
    #[serde(default = "one")]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub end: f64,
}

impl Default for ResampleSchedule {
    fn default() -> Self {
        Self { every: default_every(), start: 0.0, end: 1.0 }
    }
}

impl ResampleSchedule {
    /// Whether step `i` of `n` reweights (and possibly resamples).
    pub fn contains(&self, i: usize, n: usize) -> bool {
        let first = (self.start * n as f64).ceil() as usize;
        let last = (self.end * n as f64).floor() as usize;
        i >= 1 && i >= first && i <= last && (i - first).is_multiple_of(self.every)
    }
}

fn default_every() -> usize {
    5
}
fn one() -> f64 {
    1.0
}
fn default_particles() -> usize {
    4
}
fn default_beta() -> f64 {
    10.0
}

/// `{"method": "fk", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FkSpec {
    /// Particles per image (k); default 4.
    #[serde(default = "default_particles")]
    #[schema(minimum = 1, example = 16)]
    pub particles: usize,
    /// Default `diff` (calibrated); `max`, `sum`, `current` maximise reward more greedily.
    #[serde(default)]
    pub potential: Potential,
    /// Inverse temperature of the target p(x)·exp(β·r(x)); default 10.
    #[serde(default = "default_beta")]
    #[schema(example = 4.0)]
    pub beta: f64,
    #[serde(default)]
    pub resample: ResampleSchedule,
    #[serde(default)]
    pub resampler: Resampler,
    /// Resample only when ESS < ess_threshold · k (a fraction in (0, 1]); null = always.
    #[serde(default)]
    pub ess_threshold: Option<f64>,
    #[serde(default)]
    pub select: Select,
}

impl FkSpec {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if !self.beta.is_finite() || self.beta < 0.0 {
            return err("beta", format!("must be a finite number ≥ 0, got {}", self.beta));
        }
        if self.resample.every == 0 {
            return err("resample.every", "must be at least 1".into());
        }
        let (s, e) = (self.resample.start, self.resample.end);
        if !(0.0..=1.0).contains(&s) || !(0.0..=1.0).contains(&e) || s > e {
            return err("resample", format!("need 0 ≤ start ≤ end ≤ 1, got start {s}, end {e}"));
        }
        if let Some(t) = self.ess_threshold {
            if !(t > 0.0 && t <= 1.0) {
                return err("ess_threshold", format!("must be in (0, 1] (a fraction of the particles), got {t}"));
            }
        }
        Ok(())
    }
}

/// (log-increment, new statistic) for one particle (docs/steering.md).
pub fn potential(kind: Potential, r: f64, stat: f64, beta: f64) -> (f64, f64) {
    match kind {
        Potential::Diff => (beta * (r - stat), r),
        Potential::Max => {
            let m = r.max(stat);
            (beta * m, m)
        }
        Potential::Sum => {
            let s = stat + r;
            (beta * s, s)
        }
        Potential::Current => (beta * r, r),
    }
}

pub fn run(
    ctx: &SteerContext,
    spec: &FkSpec,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Steered, GenerationError> {
    let mut r = Runner::new(ctx);
    let (k, groups) = (spec.particles, r.groups());
    let sampler = ctx.sampler;
    let total = sampler.num_steps();
    let cond = r.conditioning(k)?;
    let (_, mut x) = r.initial(k)?;

    let m = groups * k;
    let mut logw = vec![0f64; m];
    // Σ of log-potentials along each particle's whole ancestry (for the terminal correction).
    let mut log_g = vec![0f64; m];
    let mut stat = vec![if spec.potential == Potential::Max { f64::NEG_INFINITY } else { 0.0 }; m];
    let mut traces: Vec<Vec<TraceEvent>> = vec![Vec::new(); groups];

    for i in 0..total {
        let out = r.predict(&cond, &x, i)?;
        let mut x0 = sampler.predict_x0(&x, &out, i)?;
        if spec.resample.contains(i, total) {
            let rewards = r.score(&x0)?;
            for j in 0..m {
                let (inc, s) = potential(spec.potential, rewards[j] as f64, stat[j], spec.beta);
                logw[j] += inc;
                log_g[j] += inc;
                stat[j] = s;
            }
            let mut ancestors = Vec::with_capacity(groups);
            let mut any = false;
            for (g, trace) in traces.iter_mut().enumerate() {
                let range = g * k..(g + 1) * k;
                let w = normalize(&logw[range.clone()]);
                let e = ess(&w);
                let go = spec.ess_threshold.is_none_or(|t| e < t * k as f64);
                let a = if go {
                    logw[range.clone()].fill(0.0);
                    any = true;
                    resample(&w, k, spec.resampler, &mut r.rngs[g])
                } else {
                    (0..k).collect()
                };
                if ctx.trace {
                    let mut ev = TraceEvent::new(i, if go { "resample" } else { "reweight" }, rewards[range].to_vec());
                    ev.weights = Some(w);
                    ev.ess = Some(e);
                    ev.chosen = go.then(|| a.clone());
                    trace.push(ev);
                }
                ancestors.push(a);
            }
            if any {
                let idx = global_indices(&ancestors, k);
                x = gather(&x, &idx)?;
                x0 = gather(&x0, &idx)?;
                stat = idx.iter().map(|&j| stat[j as usize]).collect();
                log_g = idx.iter().map(|&j| log_g[j as usize]).collect();
                // Particles that were not resampled keep their weights; resampled groups start at 0.
                logw = idx.iter().map(|&j| logw[j as usize]).collect();
            }
        }
        let z = if sampler.step_needs_noise(i) { Some(r.noise(k)?) } else { None };
        x = sampler.transition(&x, &x0, i, z.as_ref())?;
        tick(progress, i + 1, total, Some(&x0))?;
    }

    // Terminal weights on the actual samples.
    let decoded_all = r.decode(&x)?;
    let r0 = r.score_images(&decoded_all)?.expect("fk has a reward");
    for j in 0..m {
        let r0j = r0[j] as f64;
        logw[j] += match spec.potential {
            Potential::Diff => spec.beta * (r0j - stat[j]),
            _ => spec.beta * r0j - log_g[j],
        };
    }
    let mut rows = Vec::with_capacity(groups);
    let mut images = Vec::with_capacity(groups);
    for (g, mut trace) in traces.into_iter().enumerate() {
        let range = g * k..(g + 1) * k;
        let w = normalize(&logw[range.clone()]);
        // One independent categorical draw, never element 0 of a resample (biased to low indices).
        let pick = match spec.select {
            Select::Sample => categorical(&w, &mut r.rngs[g]),
            Select::Best => argmax(&r0[range.clone()]),
        };
        if ctx.trace {
            let mut ev = TraceEvent::new(total, "final", r0[range.clone()].to_vec());
            ev.ess = Some(ess(&w));
            ev.weights = Some(w);
            ev.chosen = Some(vec![pick]);
            trace.push(ev);
        }
        let row = g * k + pick;
        rows.push(row as u32);
        images.push(SteeredImage {
            latents: x.narrow(0, row, 1)?,
            reward: Some(r0[row]),
            trace,
            optimized_noise: None,
        });
    }
    let decoded = gather(&decoded_all, &rows)?;
    Ok(r.finish(images, decoded, None, cond.truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_potentials_telescope_to_beta_r0() {
        // Along any ancestry the applied increments plus the terminal correction sum to β·r0.
        let rs = [0.3, -0.2, 0.9, 0.4];
        let r0 = 0.7;
        let beta = 3.0;
        for kind in [Potential::Diff, Potential::Max, Potential::Sum, Potential::Current] {
            let mut stat = if kind == Potential::Max { f64::NEG_INFINITY } else { 0.0 };
            let (mut total, mut log_g) = (0.0, 0.0);
            for &r in &rs {
                let (inc, s) = potential(kind, r, stat, beta);
                total += inc;
                log_g += inc;
                stat = s;
            }
            total += match kind {
                Potential::Diff => beta * (r0 - stat),
                _ => beta * r0 - log_g,
            };
            assert!((total - beta * r0).abs() < 1e-12, "{kind:?}: {total}");
        }
    }

    #[test]
    fn schedule_skips_step_zero_and_respects_the_window() {
        let s = ResampleSchedule { every: 5, start: 0.0, end: 1.0 };
        let steps: Vec<usize> = (0..20).filter(|&i| s.contains(i, 20)).collect();
        assert_eq!(steps, vec![5, 10, 15]);
        let s = ResampleSchedule { every: 2, start: 0.25, end: 0.5 };
        let steps: Vec<usize> = (0..20).filter(|&i| s.contains(i, 20)).collect();
        assert_eq!(steps, vec![5, 7, 9]);
    }
}
