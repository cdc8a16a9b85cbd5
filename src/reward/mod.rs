//! Rewards: functions of decoded images (and the prompt) that steering strategies maximise.
//!
//! A [`Reward`] scores a batch of images in [0, 1] (N, 3, H, W) f32 and returns one number per
//! image (higher is better). Differentiable rewards also give the scores as a tensor that stays
//! in the autograd graph of the images, which ReNO needs. Rewards are named in the server config
//! (`[rewards.NAME]`) and referenced by name or spec in a request (see [`RewardSpec`]).

pub mod brightness;
pub mod clip;
pub mod color;
pub mod http;
pub mod jpeg;
pub mod registry;
pub mod spec;
pub mod weighted;

pub use registry::{RewardConfig, RewardInfo, RewardRegistry};
pub use spec::{RewardSpec, RewardTerm};
pub use weighted::WeightedSum;

use candle_core::{DType, Tensor};

/// Why a reward could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The request named a reward badly (unknown name, missing parameter): a 4xx.
    #[error("invalid value for {0}")]
    Invalid(crate::error::FieldError),
    /// An external scorer answered badly (connection refused, non-2xx, malformed body): a 502.
    #[error("reward `{reward}`: upstream scorer failed: {message}")]
    Upstream { reward: String, message: String },
    /// An external scorer did not answer in time: a 504.
    #[error("reward `{reward}`: upstream scorer timed out after {timeout_ms} ms")]
    Timeout { reward: String, timeout_ms: u64 },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl RewardError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RewardError::Invalid(crate::error::FieldError::invalid(field, message))
    }
}

pub type RewardResult<T> = std::result::Result<T, RewardError>;

/// A reward over decoded images.
pub trait Reward: Send + Sync {
    /// Short name used in metadata and metrics (e.g. `brightness`, `0.5*clip_score+1*color`).
    fn name(&self) -> &str;

    /// Whether [`Reward::score_tensor`] is available (gradients flow from the scores back to
    /// the images).
    fn differentiable(&self) -> bool {
        false
    }

    /// One score per image; `images` is (N, 3, H, W) f32 in [0, 1] on any device.
    /// Differentiable rewards get this from [`Reward::score_tensor`] on detached images, so a
    /// plain score never grows the caller's autograd graph and networks take their fused kernels.
    fn score(&self, images: &Tensor, prompt: &str) -> RewardResult<Vec<f32>> {
        Ok(self.score_tensor(&images.detach(), prompt)?.to_vec1()?)
    }

    /// Scores as an (N,) f32 tensor connected to `images` in the autograd graph.
    /// Only rewards with `differentiable() == true` implement it.
    fn score_tensor(&self, _images: &Tensor, _prompt: &str) -> RewardResult<Tensor> {
        Err(RewardError::invalid("reward", format!("reward `{}` is not differentiable", self.name())))
    }
}

/// `(n, h, w)` of an image batch, or an error unless it is (N, 3, H, W).
///
/// A wrong shape is a bug in the caller (the pipeline decodes to RGB), not a bad request.
pub fn image_dims(images: &Tensor) -> RewardResult<(usize, usize, usize)> {
    let bad = || candle_core::Error::Msg(format!("rewards expect images shaped (N, 3, H, W), got {:?}", images.dims()));
    let (n, c, h, w) = images.dims4().map_err(|_| bad())?;
    if c != 3 {
        return Err(bad().into());
    }
    Ok((n, h, w))
}

/// The images in a dtype fit for reductions: f64 stays (exact gradient checks), everything
/// else goes to f32 (sums of many f16/bf16 values lose too much).
pub(crate) fn float_images(images: &Tensor) -> RewardResult<Tensor> {
    Ok(match images.dtype() {
        DType::F64 | DType::F32 => images.clone(),
        _ => images.to_dtype(DType::F32)?,
    })
}
