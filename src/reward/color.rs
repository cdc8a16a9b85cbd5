//! `color`: closeness of every pixel to a target RGB colour.
//!
//! score = −mean over pixels of ‖rgb − target‖², so 0 is a perfect match and anything else is
//! negative; the squared distance keeps the gradient linear in the error, which is what
//! gradient-based steering wants from a toy objective.

use candle_core::{DType, Tensor};

use super::{float_images, image_dims, Reward, RewardError, RewardResult};

/// Negative mean squared RGB distance to `target`.
#[derive(Debug, Clone)]
pub struct ColorReward {
    name: String,
    target: [f64; 3],
}

impl ColorReward {
    /// `target` is `[r, g, b]` in [0, 1]; otherwise `Invalid { field: "reward.target" }`.
    pub fn new(target: [f64; 3]) -> RewardResult<Self> {
        Self::checked("color", target, "reward.target")
    }

    /// Like [`ColorReward::new`], with the reward's name and the field to blame for a bad
    /// target (`reward[2].target`, `rewards.red.target`, ...).
    pub fn checked(name: impl Into<String>, target: [f64; 3], field: &str) -> RewardResult<Self> {
        check_target(&target, field)?;
        Ok(Self { name: name.into(), target })
    }

    pub fn target(&self) -> [f64; 3] {
        self.target
    }
}

/// A target colour must be three finite numbers in [0, 1].
pub fn check_target(target: &[f64; 3], field: &str) -> RewardResult<()> {
    if let Some(v) = target.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        return Err(RewardError::invalid(
            field,
            format!("target colour components must be in [0, 1], got {v} in {target:?}"),
        ));
    }
    Ok(())
}

impl Reward for ColorReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn differentiable(&self) -> bool {
        true
    }

    fn score_tensor(&self, images: &Tensor, _prompt: &str) -> RewardResult<Tensor> {
        image_dims(images)?;
        let x = float_images(images)?;
        let target = Tensor::new(&self.target, x.device())?.to_dtype(x.dtype())?.reshape((1, 3, 1, 1))?;
        let squared = x.broadcast_sub(&target)?.sqr()?.sum(1)?; // (N, H, W)
        let scores = squared.flatten_from(1)?.mean(1)?.neg()?;
        Ok(scores.to_dtype(DType::F32)?)
    }
}
