//! Weighted sums of rewards: `Σ wᵢ · rᵢ`, e.g. CLIP score plus a little compressibility.

use std::sync::Arc;

use candle_core::Tensor;

use super::{Reward, RewardError, RewardResult};

/// `Σ wᵢ · rᵢ` over its terms; differentiable when every term is.
pub struct WeightedSum {
    name: String,
    terms: Vec<(f64, Arc<dyn Reward>)>,
}

impl std::fmt::Debug for WeightedSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightedSum").field("name", &self.name).finish()
    }
}

impl WeightedSum {
    /// At least one term, every weight finite (else `Invalid { field: "reward" }`: the spec
    /// layer checks the same earlier and names the exact term).
    pub fn new(terms: Vec<(f64, Arc<dyn Reward>)>) -> RewardResult<Self> {
        if terms.is_empty() {
            return Err(RewardError::invalid("reward", "a weighted sum needs at least one term"));
        }
        if let Some((w, r)) = terms.iter().find(|(w, _)| !w.is_finite()) {
            return Err(RewardError::invalid("reward", format!("weight {w} of `{}` is not finite", r.name())));
        }
        Ok(Self { name: sum_name(&terms), terms })
    }

    pub fn terms(&self) -> &[(f64, Arc<dyn Reward>)] {
        &self.terms
    }
}

/// `1*brightness+0.1*jpeg_compressibility`; negative weights read `...-0.5*x`.
fn sum_name(terms: &[(f64, Arc<dyn Reward>)]) -> String {
    let mut name = String::new();
    for (i, (w, r)) in terms.iter().enumerate() {
        if i > 0 && !w.is_sign_negative() {
            name.push('+');
        }
        name.push_str(&format!("{w}*{}", r.name()));
    }
    name
}

impl Reward for WeightedSum {
    fn name(&self) -> &str {
        &self.name
    }

    fn differentiable(&self) -> bool {
        self.terms.iter().all(|(_, r)| r.differentiable())
    }

    fn score(&self, images: &Tensor, prompt: &str) -> RewardResult<Vec<f32>> {
        // Accumulated in f64: terms can differ by orders of magnitude.
        let mut total: Option<Vec<f64>> = None;
        for (w, r) in &self.terms {
            let scores = r.score(images, prompt)?;
            let acc = total.get_or_insert_with(|| vec![0.0; scores.len()]);
            if scores.len() != acc.len() {
                return Err(candle_core::Error::Msg(format!(
                    "reward `{}` returned {} scores, the others {}",
                    r.name(),
                    scores.len(),
                    acc.len()
                ))
                .into());
            }
            for (a, s) in acc.iter_mut().zip(scores) {
                *a += w * s as f64;
            }
        }
        Ok(total.unwrap_or_default().into_iter().map(|v| v as f32).collect())
    }

    fn score_tensor(&self, images: &Tensor, prompt: &str) -> RewardResult<Tensor> {
        if !self.differentiable() {
            return Err(RewardError::invalid("reward", format!("reward `{}` is not differentiable", self.name)));
        }
        let mut total: Option<Tensor> = None;
        for (w, r) in &self.terms {
            let term = r.score_tensor(images, prompt)?.affine(*w, 0.0)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        // `new` refuses empty sums.
        total.ok_or_else(|| RewardError::invalid("reward", "empty weighted sum"))
    }
}
