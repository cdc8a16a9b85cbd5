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
use super::{gather, global_indices, Runner, SteerContext, Steered, SteeredImage, TraceEvent};
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

/// When to reweight (and possibly resample): every `every` steps from `start` to `end`
/// (fractions of the trajectory), never at step 0 (x̂0 of pure noise says nothing), plus the
/// final reweighting. Unset fields scale with the request: `every` a tenth of the steps (at
/// least 1), the window 0.2–0.8 of the FK reference code, and then only steps whose transition
/// injects noise (after a resampling step without noise the copies stay identical), so a
/// 4-step LCM run reweights at steps 1 and 2. A 1-step run has only the final reweighting and
/// selection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResampleSchedule {
    /// Steps between reweightings; default `max(1, steps / 10)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub every: Option<usize>,
    /// First fraction of the trajectory that reweights; default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub start: Option<f64>,
    /// Last fraction of the trajectory that reweights; default 0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub end: Option<f64>,
}

/// The reference code's window (Singhal et al. 2025, resampling between 20 % and 80 % of the
/// steps).
pub const DEFAULT_WINDOW: (f64, f64) = (0.2, 0.8);

impl ResampleSchedule {
    /// Every step, the whole trajectory.
    pub fn explicit(every: usize, start: f64, end: f64) -> Self {
        Self { every: Some(every), start: Some(start), end: Some(end) }
    }

    fn is_default(&self) -> bool {
        self.every.is_none() && self.start.is_none() && self.end.is_none()
    }

    /// The steps (of `n`, with transitions that inject noise where `injects_noise(i)`) that
    /// reweight. An explicit schedule is taken as given; the default one keeps only steps
    /// followed by noise.
    pub fn steps(&self, n: usize, injects_noise: impl Fn(usize) -> bool) -> Vec<usize> {
        let every = self.every.unwrap_or((n / 10).max(1));
        let first = (self.start.unwrap_or(DEFAULT_WINDOW.0) * n as f64).ceil() as usize;
        let last = (self.end.unwrap_or(DEFAULT_WINDOW.1) * n as f64).floor() as usize;
        let default = self.is_default();
        (first.max(1)..=last.min(n.saturating_sub(1)))
            .filter(|i| (i - first).is_multiple_of(every))
            .filter(|&i| !default || injects_noise(i))
            .collect()
    }
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
    pub fn validate(&self) -> Result<(), crate::error::FieldError> {
        let err = |f: &str, m: String| Err(crate::error::FieldError::invalid(f, m));
        if !(self.beta.is_finite() && (0.0..=MAX_BETA).contains(&self.beta)) {
            return err("beta", format!("must be a number in [0, {MAX_BETA:e}], got {}", self.beta));
        }
        if self.resample.every == Some(0) {
            return err("resample.every", "must be at least 1".into());
        }
        let s = self.resample.start.unwrap_or(DEFAULT_WINDOW.0);
        let e = self.resample.end.unwrap_or(DEFAULT_WINDOW.1);
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

/// Largest β accepted: with rewards of f32 range the log-potentials stay finite (|β·r| ≤ 3.4e44),
/// so the terminal correction β·r0 − Σ log G is never ∞ − ∞.
pub const MAX_BETA: f64 = 1e6;

/// (log-increment, new statistic) for one particle (docs/steering.md). A non-finite reward (NaN
/// from a broken scorer, ±∞) gives the particle zero weight (increment −∞) and leaves its
/// statistic alone: `f64::max` would skip a NaN and keep the old weight.
pub fn potential(kind: Potential, r: f64, stat: f64, beta: f64) -> (f64, f64) {
    if !r.is_finite() {
        return (f64::NEG_INFINITY, stat);
    }
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

/// Per-particle state of the log-weights.
#[derive(Debug, Clone)]
pub struct Weights {
    pub kind: Potential,
    pub beta: f64,
    /// Current log-weights.
    pub logw: Vec<f64>,
    /// Σ of finite log-potentials along each particle's whole ancestry (for the terminal correction).
    pub log_g: Vec<f64>,
    /// The potential's statistic (previous reward, running max or sum).
    pub stat: Vec<f64>,
}

impl Weights {
    pub fn new(kind: Potential, beta: f64, m: usize) -> Self {
        let stat = vec![if kind == Potential::Max { f64::NEG_INFINITY } else { 0.0 }; m];
        Self { kind, beta, logw: vec![0.0; m], log_g: vec![0.0; m], stat }
    }

    /// Apply one reweighting with a reward per particle.
    pub fn reweight(&mut self, rewards: &[f32]) {
        for (j, &r) in rewards.iter().enumerate() {
            let (inc, s) = potential(self.kind, r as f64, self.stat[j], self.beta);
            self.logw[j] += inc;
            if inc.is_finite() {
                self.log_g[j] += inc;
            }
            self.stat[j] = s;
        }
    }

    /// The exact terminal correction with the final rewards: along every ancestry the
    /// log-potentials then sum to β·r0. Dead particles (−∞) stay dead; a non-finite r0 kills.
    pub fn terminal(&mut self, r0: &[f32]) {
        for (j, &r) in r0.iter().enumerate() {
            let r = r as f64;
            if !r.is_finite() {
                self.logw[j] = f64::NEG_INFINITY;
            } else if self.logw[j] != f64::NEG_INFINITY {
                self.logw[j] += match self.kind {
                    // stat is the last finite reward (0 when the particle was never scored)
                    Potential::Diff => self.beta * (r - self.stat[j]),
                    _ => self.beta * r - self.log_g[j],
                };
            }
        }
    }

    /// Keep rows `idx` (after resampling).
    pub fn gather(&mut self, idx: &[u32]) {
        let pick = |v: &[f64]| idx.iter().map(|&j| v[j as usize]).collect::<Vec<_>>();
        self.logw = pick(&self.logw);
        self.log_g = pick(&self.log_g);
        self.stat = pick(&self.stat);
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

    let mut wts = Weights::new(spec.potential, spec.beta, groups * k);
    let schedule = spec.resample.steps(total, |i| sampler.injects_noise(i));
    let mut traces: Vec<Vec<TraceEvent>> = vec![Vec::new(); groups];
    // Each particle's x̂0 of the previous step (multistep samplers), resampled with it.
    let mut prev: Option<candle_core::Tensor> = None;

    for i in 0..total {
        let out = r.predict(&cond, &x, i)?;
        let mut x0 = sampler.predict_x0(&x, &out, i)?;
        if schedule.contains(&i) {
            let rewards = r.score(&x0)?;
            wts.reweight(&rewards);
            let mut ancestors = Vec::with_capacity(groups);
            let mut any = false;
            for (g, trace) in traces.iter_mut().enumerate() {
                let range = g * k..(g + 1) * k;
                let w = normalize(&wts.logw[range.clone()]);
                let e = ess(&w);
                let go = spec.ess_threshold.is_none_or(|t| e < t * k as f64);
                let a = if go {
                    wts.logw[range.clone()].fill(0.0);
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
                prev = prev.map(|p| gather(&p, &idx)).transpose()?;
                // Particles that were not resampled keep their weights; resampled groups start at 0.
                wts.gather(&idx);
            }
        }
        let z = if sampler.step_needs_noise(i) { Some(r.noise(k)?) } else { None };
        x = r.blend(&sampler.transition(&x, &x0, prev.as_ref(), i, z.as_ref())?, i)?;
        r.tick(progress, i + 1, total, Some(&x0))?;
        prev = Some(x0);
    }

    // Terminal weights on the actual samples.
    let decoded_all = r.decode(&x)?;
    let r0 = r.score_images(&decoded_all)?.expect("fk has a reward");
    wts.terminal(&r0);
    let mut rows = Vec::with_capacity(groups);
    let mut images = Vec::with_capacity(groups);
    for (g, mut trace) in traces.into_iter().enumerate() {
        let range = g * k..(g + 1) * k;
        let w = normalize(&wts.logw[range.clone()]);
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
        let noisy = |_| true;
        let s = ResampleSchedule::explicit(5, 0.0, 1.0);
        assert_eq!(s.steps(20, noisy), vec![5, 10, 15]);
        let s = ResampleSchedule::explicit(2, 0.25, 0.5);
        assert_eq!(s.steps(20, noisy), vec![5, 7, 9]);
    }

    #[test]
    fn default_schedule_scales_with_the_step_count() {
        let d = ResampleSchedule::default();
        // 50 steps: every 5 inside 0.2–0.8 (the reference window)
        assert_eq!(d.steps(50, |_| true), vec![10, 15, 20, 25, 30, 35, 40]);
        // 4-step LCM: noise after steps 0, 1, 2, none after the last
        assert_eq!(d.steps(4, |i| i < 3), vec![1, 2]);
        assert_eq!(d.steps(2, |i| i < 1), Vec::<usize>::new());
        assert_eq!(d.steps(1, |_| false), Vec::<usize>::new());
        // the old fixed `every: 5` never reweighted a 4-step run
        assert_eq!(ResampleSchedule::explicit(5, 0.0, 1.0).steps(4, |_| true), Vec::<usize>::new());
        // an explicit field keeps the others' defaults
        let s = ResampleSchedule { every: Some(1), ..Default::default() };
        assert_eq!(s.steps(10, |_| true), vec![2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn a_nan_reward_kills_the_particle_under_every_potential() {
        for kind in [Potential::Diff, Potential::Max, Potential::Sum, Potential::Current] {
            let mut w = Weights::new(kind, 2.0, 3);
            w.reweight(&[0.5, 0.9, 0.2]);
            w.reweight(&[0.4, f32::NAN, 0.3]);
            let p = normalize(&w.logw);
            assert_eq!(p[1], 0.0, "{kind:?}: {p:?}");
            w.terminal(&[0.5, 0.9, 0.3]);
            let p = normalize(&w.logw);
            assert_eq!(p[1], 0.0, "{kind:?}: {p:?}");
            assert!(p.iter().all(|v| v.is_finite()), "{kind:?}: {p:?}");
            // a non-finite final reward kills too
            w.terminal(&[f32::INFINITY, 0.0, 0.0]);
            assert_eq!(normalize(&w.logw)[0], 0.0, "{kind:?}");
        }
    }

    #[test]
    fn huge_beta_never_makes_the_terminal_correction_nan() {
        for kind in [Potential::Diff, Potential::Max, Potential::Sum, Potential::Current] {
            let mut w = Weights::new(kind, MAX_BETA, 2);
            for _ in 0..50 {
                w.reweight(&[f32::MAX, -f32::MAX]);
            }
            w.terminal(&[f32::MAX, -f32::MAX]);
            assert!(w.logw.iter().all(|l| !l.is_nan()), "{kind:?}: {:?}", w.logw);
            let p = normalize(&w.logw);
            assert!(p.iter().all(|v| v.is_finite()) && (p.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{kind:?}");
            assert!(p[0] > p[1], "{kind:?}: {p:?}");
        }
        let too_big = FkSpec { beta: 1e7, ..serde_json::from_str("{}").unwrap() };
        assert_eq!(too_big.validate().unwrap_err().field, "beta");
    }
}
