//! Image edits: img2img (sampling starts from the input image noised to the first step run)
//! and inpainting by latent blending (after every step the region to keep is reset to the input
//! image noised to the next step), as diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` (4-channel UNet) do.
//!
//! Randomness, per image: the starting noise is drawn first (as for text-to-image), then the
//! VAE posterior sample `ε_vae` of the input image, then the step noise.

use candle_core::{DType, Result, Tensor};

use crate::models::DiffusionModel;
use crate::sampling::Sampler;

/// An edit request: the image and, for inpainting, the mask.
#[derive(Debug, Clone)]
pub struct EditInput {
    /// The image to edit, values in [0, 1], (1, 3, H, W) at the output size.
    pub image: Tensor,
    /// Where to repaint, (1, 1, H, W): values ≥ 0.5 are repainted, the rest kept. `None` edits
    /// the whole image.
    pub mask: Option<Tensor>,
    /// How much of the schedule to run, in (0, 1]: the edit runs the last ⌊strength·steps⌋
    /// steps, from the image noised to that step (1: from noise alone when inpainting).
    pub strength: f64,
}

impl EditInput {
    pub fn inpaint(&self) -> bool {
        self.mask.is_some()
    }
}

/// The latent-space view of an edit, per image (group).
#[derive(Debug, Clone)]
pub struct EditLatents {
    /// The input image's latents, sampled from the VAE posterior: (groups, C, h, w).
    pub image: Tensor,
    /// Latent mask (1, 1, h, w), 1 = repaint; `None` for img2img.
    pub mask: Option<Tensor>,
    /// Inpainting at strength 1 starts from noise alone.
    pub from_noise: bool,
}

/// The binarised mask at latent resolution: values ≥ 0.5 become 1, then nearest-neighbour
/// downsampling by the VAE factor (diffusers' mask processor, then `interpolate(size=latent)`).
pub fn latent_mask(mask: &Tensor, factor: usize) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    let bin = mask.to_dtype(DType::F32)?.ge(0.5f64)?.to_dtype(DType::F32)?;
    // Nearest neighbour at an integer factor samples pixel (y·f, x·f).
    bin.reshape((b, c, h / factor, factor, w / factor, factor))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((
        b,
        c,
        h / factor,
        w / factor,
    ))
}

/// Encode the edit's image once and sample its latents for every group with `eps_vae`
/// ((groups, C, h, w) standard-normal noise).
pub fn encode(model: &dyn DiffusionModel, edit: &EditInput, eps_vae: &Tensor) -> Result<EditLatents> {
    let (mean, std) = model.encode_posterior(&edit.image.to_device(model.device())?)?;
    let image = mean.broadcast_add(&eps_vae.broadcast_mul(&std)?)?;
    let mask = match &edit.mask {
        Some(m) => Some(latent_mask(&m.to_device(model.device())?, model.info().vae_scale_factor.max(1))?),
        None => None,
    };
    Ok(EditLatents { image, mask, from_noise: edit.inpaint() && edit.strength >= 1.0 })
}

/// `rows` rows from per-group rows (`t` has `groups` rows): each repeated `rows / groups` times.
pub fn per_row(t: &Tensor, rows: usize) -> Result<Tensor> {
    let groups = t.dim(0)?;
    if groups == rows {
        return Ok(t.clone());
    }
    let k = rows / groups;
    let idx: Vec<u32> = (0..groups as u32).flat_map(|g| std::iter::repeat_n(g, k)).collect();
    t.index_select(&Tensor::from_slice(&idx, rows, t.device())?, 0)
}

/// The state step 0 of `sampler` (already cut to the edit's steps) starts from: the image
/// latents noised with the unit noise `noise` (rows group-major), or the noise alone scaled by
/// `init_noise_sigma` for inpainting at strength 1.
pub fn start(sampler: &dyn Sampler, edit: &EditLatents, noise: &Tensor) -> Result<Tensor> {
    if edit.from_noise {
        return noise * sampler.init_noise_sigma();
    }
    let image = per_row(&edit.image, noise.dim(0)?)?;
    sampler.add_noise(&image, noise, 0)
}

/// After step `i`: inpainting resets the kept region to the image noised to step `i + 1` with
/// each row's starting noise (to the clean image after the last step); img2img changes nothing.
pub fn blend(sampler: &dyn Sampler, edit: &EditLatents, x: &Tensor, i: usize, noise: &Tensor) -> Result<Tensor> {
    let Some(mask) = &edit.mask else { return Ok(x.clone()) };
    let rows = x.dim(0)?;
    let image = per_row(&edit.image, rows)?;
    let keep = if i + 1 < sampler.num_steps() {
        sampler.add_noise(&image, &per_row(noise, rows)?, i + 1)?
    } else {
        image // the noise is not used at the last step
    };
    let mask = mask.to_dtype(x.dtype())?;
    // (1 − m)·keep + m·x
    keep.broadcast_mul(&mask.affine(-1.0, 1.0)?)?.add(&x.broadcast_mul(&mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_latent_mask_is_binarised_and_sampled_nearest() {
        // 4×4 mask, factor 2: samples pixels (0,0), (0,2), (2,0), (2,2).
        let m = Tensor::new(
            &[[[[0.6f32, 0.0, 0.2, 0.9], [0.0, 0.0, 0.0, 0.0], [0.49, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        let l = latent_mask(&m, 2).unwrap();
        assert_eq!(l.dims(), &[1, 1, 2, 2]);
        assert_eq!(l.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn rows_repeat_their_group() {
        let t = Tensor::new(&[[1f32], [2.0]], &Device::Cpu).unwrap();
        let r = per_row(&t, 6).unwrap();
        assert_eq!(r.to_vec2::<f32>().unwrap(), vec![vec![1.0], vec![1.0], vec![1.0], vec![2.0], vec![2.0], vec![2.0]]);
    }
}
