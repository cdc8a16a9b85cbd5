//! How well a model's VAE keeps the shapes world: encode each scene to latents (posterior mean),
//! decode, and measure the pixel error and whether the evaluator still reads the caption off the
//! reconstruction.

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::eval::{judge, Report};
use super::world::{image_to_tensor, tensor_to_image, Scene};
use crate::models::vae::AutoencoderKL;

/// Result of [`vae_round_trip`].
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    pub scenes: usize,
    /// Mean absolute error over all pixels and channels, on [0, 1].
    pub mae: f64,
    /// The worst scene's mean absolute error.
    pub max_scene_mae: f64,
    /// Scenes whose reconstruction the evaluator judges correct for the scene's own caption.
    pub detections_match: usize,
    /// `detections_match / scenes`.
    pub match_rate: f64,
    /// The evaluator's per-category report on the reconstructions.
    pub report: Report,
}

/// Round-trip `scenes` through `vae` in batches of `batch`.
pub fn vae_round_trip(
    vae: &AutoencoderKL,
    scenes: &[Scene],
    device: &Device,
    batch: usize,
) -> candle_core::Result<RoundTrip> {
    let (mut sum, mut max, mut matched) = (0.0f64, 0.0f64, 0usize);
    let mut outcomes = Vec::with_capacity(scenes.len());
    for chunk in scenes.chunks(batch.max(1)) {
        let images: Vec<Tensor> =
            chunk.iter().map(|s| image_to_tensor(&s.render(), device)).collect::<candle_core::Result<_>>()?;
        let x = Tensor::cat(&images, 0)?;
        let z = vae.encode_mean(&((&x * 2.0)? - 1.0)?)?;
        let y = ((vae.decode(&z)? + 1.0)? / 2.0)?.clamp(0.0, 1.0)?;
        let per_scene: Vec<f32> = (y.clone() - &x)?.abs()?.flatten_from(1)?.mean(1)?.to_vec1()?;
        for (i, scene) in chunk.iter().enumerate() {
            let e = per_scene[i] as f64;
            sum += e;
            max = max.max(e);
            let j = judge(&scene.caption, &tensor_to_image(&y.get(i)?)?);
            matched += j.correct as usize;
            outcomes.push((Some(scene.category()), j.correct));
        }
    }
    let n = scenes.len();
    Ok(RoundTrip {
        scenes: n,
        mae: if n == 0 { 0.0 } else { sum / n as f64 },
        max_scene_mae: max,
        detections_match: matched,
        match_rate: if n == 0 { 0.0 } else { matched as f64 / n as f64 },
        report: Report::from_outcomes(outcomes),
    })
}
