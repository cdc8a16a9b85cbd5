//! `jpeg_compressibility` / `jpeg_incompressibility`: the size of the image as a JPEG.
//!
//! The DDPO objectives: each image is quantised to 8-bit RGB as it would be saved, encoded at
//! quality 95, and scored by ∓ its size in kB (1000 bytes, as DDPO and SVDD use `len / 1000`).
//! Encoding is not differentiable, so these only serve gradient-free steering.

use candle_core::{DType, Device, Tensor};
use image::ImageEncoder;

use super::{image_dims, Reward, RewardResult};
use crate::util::encode::quantize;

/// JPEG quality the scores are defined at (DDPO's).
pub const JPEG_QUALITY: u8 = 95;

/// ∓ JPEG size in kB.
#[derive(Debug, Clone)]
pub struct JpegReward {
    name: String,
    /// +1 rewards large files (incompressibility), −1 small ones.
    sign: f32,
}

impl JpegReward {
    /// Smaller files score higher: −kB.
    pub fn compressibility() -> Self {
        Self { name: "jpeg_compressibility".into(), sign: -1.0 }
    }

    /// Larger files score higher: +kB.
    pub fn incompressibility() -> Self {
        Self { name: "jpeg_incompressibility".into(), sign: 1.0 }
    }

    /// The same reward under a configured name (`[rewards.NAME]`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// Size in bytes of each image (N, 3, H, W) in [0, 1] encoded as a quality-95 JPEG, after
/// `round(clamp(x, 0, 1) · 255)` quantisation (what the PNG output uses too).
pub fn jpeg_sizes(images: &Tensor) -> RewardResult<Vec<usize>> {
    let (n, h, w) = image_dims(images)?;
    let hwc = images.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        let rgb: Vec<u8> = hwc.get(i)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(quantize).collect();
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY)
            .write_image(&rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
            .map_err(|e| candle_core::Error::Msg(format!("JPEG encoding failed: {e}")))?;
        sizes.push(buf.len());
    }
    Ok(sizes)
}

impl Reward for JpegReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, images: &Tensor, _prompt: &str) -> RewardResult<Vec<f32>> {
        Ok(jpeg_sizes(images)?.into_iter().map(|bytes| self.sign * bytes as f32 / 1000.0).collect())
    }
}
