//! Image edits: img2img (sampling starts from the input image noised to the first step run)
//! and inpainting, as diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` do: with a standard UNet by latent blending (after every
//! step the region to keep is reset to the input image noised to the next step), with a
//! 9-channel inpainting UNet by giving it the mask and the masked image's latents as extra input
//! channels at every step (no blending).
//!
//! Randomness, per image: the starting noise is drawn first (as for text-to-image), then the
//! VAE posterior sample `ε_vae` of the input image, then (inpainting UNets) the masked image's,
//! then the step noise.

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
    /// Latent mask (1, 1, h, w), 1 = repaint, for blending; `None` for img2img and for
    /// inpainting UNets.
    pub mask: Option<Tensor>,
    /// An inpainting UNet's extra input: the latent mask and the masked image's latents,
    /// (groups, 1 + C, h, w).
    pub unet_input: Option<Tensor>,
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
/// ((groups, C, h, w) standard-normal noise); an inpainting UNet's masked image is sampled with
/// `eps_masked`.
pub fn encode(
    model: &dyn DiffusionModel,
    edit: &EditInput,
    eps_vae: &Tensor,
    eps_masked: Option<&Tensor>,
) -> Result<EditLatents> {
    let sample = |image: &Tensor, eps: &Tensor| -> Result<Tensor> {
        let (mean, std) = model.encode_posterior(&image.to_device(model.device())?)?;
        mean.broadcast_add(&eps.broadcast_mul(&std)?)
    };
    let image = sample(&edit.image, eps_vae)?;
    let factor = model.info().vae_scale_factor.max(1);
    let mask = match &edit.mask {
        Some(m) => Some(latent_mask(&m.to_device(model.device())?, factor)?),
        None => None,
    };
    let from_noise = edit.inpaint() && edit.strength >= 1.0;
    if !model.info().inpainting {
        return Ok(EditLatents { image, mask, unet_input: None, from_noise });
    }
    let (Some(pixel_mask), Some(latent), Some(eps)) = (&edit.mask, &mask, eps_masked) else {
        candle_core::bail!("an inpainting model edits with a mask")
    };
    // The image where it is kept; where it is repainted, 0 in the VAE's [−1, 1] range (mid-grey).
    let keep = pixel_mask.to_dtype(DType::F32)?.lt(0.5f64)?.to_dtype(edit.image.dtype())?.to_device(model.device())?;
    let image01 = edit.image.to_device(model.device())?;
    let masked01 = image01.broadcast_mul(&keep)?.broadcast_add(&keep.affine(-0.5, 0.5)?)?;
    let masked = sample(&masked01, eps)?;
    let groups = masked.dim(0)?;
    let latent = latent.to_dtype(masked.dtype())?.repeat((groups, 1, 1, 1))?;
    let unet_input = Tensor::cat(&[&latent, &masked], 1)?;
    Ok(EditLatents { image, mask: None, unet_input: Some(unet_input), from_noise })
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
