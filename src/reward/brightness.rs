//! `brightness`: the mean of the image over all channels and pixels, in [0, 1].
//!
//! A toy objective with a closed-form gradient; it makes steering visibly work (images get
//! lighter) and lets tests check gradients exactly.

use candle_core::{DType, Tensor};

use super::{float_images, image_dims, Reward, RewardResult};

/// Mean pixel value per image.
#[derive(Debug, Clone)]
pub struct Brightness {
    name: String,
}

impl Brightness {
    pub fn new() -> Self {
        Self::named("brightness")
    }

    /// The same reward under a configured name (`[rewards.NAME]`).
    pub fn named(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

impl Default for Brightness {
    fn default() -> Self {
        Self::new()
    }
}

impl Reward for Brightness {
    fn name(&self) -> &str {
        &self.name
    }

    fn differentiable(&self) -> bool {
        true
    }

    fn score_tensor(&self, images: &Tensor, _prompt: &str) -> RewardResult<Tensor> {
        image_dims(images)?;
        let scores = float_images(images)?.flatten_from(1)?.mean(1)?;
        Ok(scores.to_dtype(DType::F32)?)
    }
}
