//! The statistics of an experiment's results: means with 95 % intervals, the difference of each
//! arm against the control (Welch), an always-valid confidence sequence for that difference so
//! that reading results at any time keeps its error rate, Bradley–Terry strengths from pairwise
//! preferences, and latency quantiles.
//!
//! The always-valid sequence is the normal-mixture martingale of Robbins (1970), as used for A/B
//! tests by Johari, Pekelis and Walsh ("Always valid inference", 2017): with the estimate θ̂, its
//! variance V and a mixing variance τ², the likelihood ratio against θ = θ0 is
//! Λ = √(V/(V+τ²)) · exp(τ²(θ̂−θ0)² / (2V(V+τ²))), and {θ0 : Λ < 1/α} is a 1−α interval that holds
//! at every sample size simultaneously. Bradley–Terry strengths are fitted by Hunter's (2004)
//! minorise–maximise iteration.

use serde::Serialize;
use utoipa::ToSchema;

/// z for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Mean, sample standard deviation and count of a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: usize,
    pub mean: f64,
    /// Sample variance (n − 1 in the denominator); 0 below two values.
    pub var: f64,
}

impl Moments {
    pub fn of(xs: &[f64]) -> Self {
        let n = xs.len();
        if n == 0 {
            return Self::default();
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Self { n, mean, var }
    }

    /// Variance of the mean.
    pub fn var_of_mean(&self) -> f64 {
        if self.n == 0 {
            f64::INFINITY
        } else {
            self.var / self.n as f64
        }
    }
}

/// A mean with its 95 % interval `[lo, hi]` (normal approximation).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    /// 95 % interval; `null` with fewer than two values.
    pub ci: Option<[f64; 2]>,
}

pub fn mean_ci(m: &Moments) -> Estimate {
    let ci = (m.n >= 2).then(|| {
        let h = Z95 * m.var_of_mean().sqrt();
        [m.mean - h, m.mean + h]
    });
    Estimate { mean: m.mean, ci }
}

/// An arm's difference against the control.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Difference {
    /// mean(arm) − mean(control).
    pub diff: f64,
    /// Fixed-sample 95 % interval (Welch's normal approximation): valid only if read once, at a
    /// sample size fixed in advance.
    pub ci: Option<[f64; 2]>,
    /// Always-valid 95 % interval: may be read after every request without inflating errors.
    pub always_valid_ci: Option<[f64; 2]>,
    /// Always-valid p-value for "no difference" (the smallest α at which the always-valid
    /// interval excludes 0 at this or any earlier look is not tracked: this is the current one).
    pub always_valid_p: Option<f64>,
}

/// Samples per arm before the always-valid interval is reported.
pub const MIN_SEQUENTIAL_N: usize = 10;

/// Mixing variance τ² of the always-valid sequence, as a multiple of the pooled per-sample
/// variance: the sequence is tightest where the effect is about this large.
const TAU2_SCALE: f64 = 0.25;

pub fn difference(arm: &Moments, control: &Moments) -> Difference {
    let diff = arm.mean - control.mean;
    let v = arm.var_of_mean() + control.var_of_mean();
    if arm.n < 2 || control.n < 2 || !v.is_finite() {
        return Difference { diff, ci: None, always_valid_ci: None, always_valid_p: None };
    }
    if v == 0.0 {
        let p = if diff == 0.0 { 1.0 } else { 0.0 };
        return Difference {
            diff,
            ci: Some([diff, diff]),
            always_valid_ci: Some([diff, diff]),
            always_valid_p: Some(p),
        };
    }
    let h = Z95 * v.sqrt();
    let ci = Some([diff - h, diff + h]);
    // The sequence assumes a known variance; below a few samples per arm the estimate is too
    // rough for its guarantee, so it is not reported yet.
    if arm.n < MIN_SEQUENTIAL_N || control.n < MIN_SEQUENTIAL_N {
        return Difference { diff, ci, always_valid_ci: None, always_valid_p: None };
    }
    let tau2 = TAU2_SCALE * (arm.var + control.var) / 2.0;
    let (half, p) = confidence_sequence(diff, v, tau2.max(f64::MIN_POSITIVE), 0.05);
    Difference { diff, ci, always_valid_ci: Some([diff - half, diff + half]), always_valid_p: Some(p) }
}

/// Half-width of the 1−α always-valid interval around θ̂ and the always-valid p-value of θ = 0.
pub fn confidence_sequence(theta: f64, v: f64, tau2: f64, alpha: f64) -> (f64, f64) {
    let s = v + tau2;
    let half = ((v * s / tau2) * ((s / v).ln() + 2.0 * (1.0 / alpha).ln())).sqrt();
    let log_lambda = 0.5 * (v / s).ln() + tau2 * theta * theta / (2.0 * v * s);
    let p = (-log_lambda).exp().min(1.0);
    (half, p)
}

/// Bradley–Terry strengths of `k` items from `wins[i][j]` (times i was preferred over j),
/// normalised to sum to `k`; items never compared keep strength 1. Hunter's MM iteration.
pub fn bradley_terry(wins: &[Vec<f64>]) -> Vec<f64> {
    let k = wins.len();
    let mut p = vec![1.0; k];
    for _ in 0..1000 {
        let mut next = p.clone();
        for i in 0..k {
            let w: f64 = wins[i].iter().sum();
            let denom: f64 = (0..k)
                .filter(|&j| j != i)
                .map(|j| {
                    let n = wins[i][j] + wins[j][i];
                    if n > 0.0 {
                        n / (p[i] + p[j])
                    } else {
                        0.0
                    }
                })
                .sum();
            if denom > 0.0 && w > 0.0 {
                next[i] = w / denom;
            } else if denom > 0.0 {
                // Never preferred: its strength tends to 0; keep it small but positive.
                next[i] = 1e-6;
            }
        }
        let total: f64 = next.iter().sum();
        for x in &mut next {
            *x *= k as f64 / total;
        }
        let change = next.iter().zip(&p).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        p = next;
        if change < 1e-10 {
            break;
        }
    }
    p
}

/// The q-quantile (0 ≤ q ≤ 1) by linear interpolation between order statistics.
pub fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn moments_and_intervals_match_the_formulas() {
        let m = Moments::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((m.n, m.mean), (4, 2.5));
        assert!((m.var - 5.0 / 3.0).abs() < 1e-12);
        let e = mean_ci(&m);
        let h = Z95 * (5.0f64 / 3.0 / 4.0).sqrt();
        assert_eq!(e.ci, Some([2.5 - h, 2.5 + h]));
        assert_eq!(mean_ci(&Moments::of(&[7.0])).ci, None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.5), Some(2.5));
        assert_eq!(quantile(&[5.0], 0.95), Some(5.0));
    }

    #[test]
    fn bradley_terry_recovers_known_strengths() {
        // Expected wins under strengths (4, 2, 1): i beats j with probability s_i / (s_i + s_j).
        let s = [4.0, 2.0, 1.0];
        let wins: Vec<Vec<f64>> =
            (0..3).map(|i| (0..3).map(|j| if i == j { 0.0 } else { 300.0 * s[i] / (s[i] + s[j]) }).collect()).collect();
        let p = bradley_terry(&wins);
        let scale = 3.0 / 7.0;
        for (got, want) in p.iter().zip(s) {
            assert!((got - want * scale).abs() < 1e-6, "{p:?}");
        }
    }

    /// The always-valid interval keeps its coverage when read after every observation: under
    /// no difference, the fraction of runs in which it ever excludes 0 stays below α, while the
    /// fixed-sample interval, read the same way, errs far more often.
    #[test]
    fn always_valid_intervals_survive_peeking() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let normal = Normal::new(0.0, 1.0).unwrap();
        let (runs, looks) = (400, 200);
        let (mut av_err, mut fixed_err) = (0, 0);
        for _ in 0..runs {
            let (mut a, mut b) = (vec![], vec![]);
            let (mut av, mut fixed) = (false, false);
            for _ in 0..looks {
                a.push(normal.sample(&mut rng));
                b.push(normal.sample(&mut rng));
                let d = difference(&Moments::of(&a), &Moments::of(&b));
                if let (Some([lo, hi]), Some([flo, fhi])) = (d.always_valid_ci, d.ci) {
                    av |= lo > 0.0 || hi < 0.0;
                    fixed |= flo > 0.0 || fhi < 0.0;
                }
            }
            av_err += av as usize;
            fixed_err += fixed as usize;
        }
        let (av_rate, fixed_rate) = (av_err as f64 / runs as f64, fixed_err as f64 / runs as f64);
        assert!(av_rate <= 0.05, "always-valid error rate {av_rate}");
        assert!(fixed_rate > 0.2, "peeking at the fixed interval should inflate errors, got {fixed_rate}");
        // With a real effect it still finds it.
        let a: Vec<f64> = (0..400).map(|_| normal.sample(&mut rng) + 0.5).collect();
        let b: Vec<f64> = (0..400).map(|_| normal.sample(&mut rng)).collect();
        let d = difference(&Moments::of(&a), &Moments::of(&b));
        assert!(d.always_valid_ci.unwrap()[0] > 0.0 && d.always_valid_p.unwrap() < 0.05, "{d:?}");
    }
}
