//! Log-space importance weights, effective sample size and resampling (docs/steering.md).
//!
//! Weights stay logs until the last moment and are normalised with max-subtraction, so
//! β·r of order 100 or more never overflows; NaN log-weights count as −∞.

use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Normalised weights from log-weights. All −∞ (or NaN) gives the uniform distribution.
pub fn normalize(logw: &[f64]) -> Vec<f64> {
    let clean: Vec<f64> = logw.iter().map(|&l| if l.is_nan() { f64::NEG_INFINITY } else { l }).collect();
    let m = clean.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return vec![1.0 / logw.len() as f64; logw.len()];
    }
    if m == f64::INFINITY {
        // +∞ entries share the mass: exp(∞ − ∞) would be NaN.
        let inf = clean.iter().filter(|&&l| l == f64::INFINITY).count() as f64;
        return clean.iter().map(|&l| if l == f64::INFINITY { 1.0 / inf } else { 0.0 }).collect();
    }
    let w: Vec<f64> = clean.iter().map(|&l| (l - m).exp()).collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

/// Effective sample size 1 / Σ W², in [1, k] for normalised weights.
pub fn ess(w: &[f64]) -> f64 {
    1.0 / w.iter().map(|v| v * v).sum::<f64>()
}

/// How ancestors are drawn at a resampling step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Resampler {
    /// One uniform offset for k evenly spaced points: lowest variance (the default).
    #[default]
    Systematic,
    /// k independent categorical draws (what the FK and SVDD reference code does).
    Multinomial,
    /// One independent uniform per stratum [j/k, (j+1)/k).
    Stratified,
}

/// Draw `k` ancestor indices from normalised weights `w`.
pub fn resample(w: &[f64], k: usize, kind: Resampler, rng: &mut impl Rng) -> Vec<usize> {
    match kind {
        Resampler::Multinomial => (0..k).map(|_| categorical(w, rng)).collect(),
        Resampler::Systematic => {
            let u: f64 = rng.random::<f64>() / k as f64;
            invert_cdf(w, (0..k).map(|j| u + j as f64 / k as f64))
        }
        Resampler::Stratified => {
            let points: Vec<f64> = (0..k).map(|j| (j as f64 + rng.random::<f64>()) / k as f64).collect();
            invert_cdf(w, points.into_iter())
        }
    }
}

/// One index drawn from normalised weights.
pub fn categorical(w: &[f64], rng: &mut impl Rng) -> usize {
    let u: f64 = rng.random();
    invert_cdf(w, std::iter::once(u))[0]
}

/// For increasing points in [0, 1): the first index whose cumulative weight exceeds each point.
/// Rounding can leave the total slightly below 1; points past it go to the last index with
/// positive weight.
fn invert_cdf(w: &[f64], points: impl Iterator<Item = f64>) -> Vec<usize> {
    let last = w.iter().rposition(|&v| v > 0.0).unwrap_or(w.len() - 1);
    let mut out = Vec::new();
    let mut j = 0;
    let mut cum = w[0];
    for p in points {
        while cum <= p && j < last {
            j += 1;
            cum += w[j];
        }
        out.push(j);
    }
    out
}

/// Index of the largest value (first on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    #[test]
    fn normalize_survives_huge_and_degenerate_logs() {
        let w = normalize(&[1000.0, 1000.0 + 2f64.ln(), f64::NAN]);
        assert!((w[0] - 1.0 / 3.0).abs() < 1e-12 && (w[1] - 2.0 / 3.0).abs() < 1e-12 && w[2] == 0.0);
        assert_eq!(normalize(&[f64::NEG_INFINITY; 4]), vec![0.25; 4]);
        assert_eq!(normalize(&[f64::INFINITY, 0.0]), vec![1.0, 0.0]);
        assert!((ess(&[0.25; 4]) - 4.0).abs() < 1e-12);
        assert!((ess(&[1.0, 0.0, 0.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn resamplers_are_unbiased() {
        let w = vec![0.1, 0.6, 0.0, 0.3];
        let mut rng = ChaCha12Rng::seed_from_u64(7);
        for kind in [Resampler::Systematic, Resampler::Multinomial, Resampler::Stratified] {
            let mut counts = [0usize; 4];
            let (k, reps) = (8, 4000);
            for _ in 0..reps {
                for a in resample(&w, k, kind, &mut rng) {
                    counts[a] += 1;
                }
            }
            assert_eq!(counts[2], 0, "{kind:?} drew a zero-weight particle");
            for j in 0..4 {
                let freq = counts[j] as f64 / (k * reps) as f64;
                assert!((freq - w[j]).abs() < 0.01, "{kind:?}: index {j} drawn {freq}, weight {}", w[j]);
            }
        }
    }

    #[test]
    fn systematic_keeps_counts_within_one_of_expectation() {
        let w = vec![0.1, 0.6, 0.3];
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        for _ in 0..200 {
            let a = resample(&w, 10, Resampler::Systematic, &mut rng);
            for (j, wj) in w.iter().enumerate() {
                let c = a.iter().filter(|&&x| x == j).count() as f64;
                assert!((c - wj * 10.0).abs() <= 1.0 + 1e-9);
            }
        }
    }
}
