//! PNG encoding of decoded images.

use candle_core::{DType, Device, Tensor};
use image::ImageEncoder;

use crate::error::{Result, TillerError};

/// Quantise one channel value in [0, 1] to a byte: `round(x * 255)`, clamped (NaN → 0).
pub fn quantize(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Encode a batch of images (n, 3, H, W) with values in [0, 1] as RGB PNGs, one per image.
pub fn encode_batch(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(TillerError::Other(anyhow::anyhow!("expected 3 image channels, got {c}")));
    }
    // (n, H, W, 3) row-major = interleaved RGB rows.
    let hwc = images.permute((0, 2, 3, 1))?.contiguous()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let values: Vec<f32> = hwc.get(i)?.flatten_all()?.to_vec1()?;
        let rgb: Vec<u8> = values.into_iter().map(quantize).collect();
        out.push(encode_rgb(&rgb, w as u32, h as u32)?);
    }
    Ok(out)
}

/// Encode interleaved 8-bit RGB rows as a PNG.
pub fn encode_rgb(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| TillerError::Other(anyhow::anyhow!("PNG encoding failed: {e}")))?;
    Ok(buf)
}

/// `out.png` for one image; `out_0.png`, `out_1.png`, ... for several (suffix before the
/// extension; `.png` is appended when the path has no extension).
pub fn numbered_paths(path: &std::path::Path, n: usize) -> Vec<std::path::PathBuf> {
    if n == 1 {
        return vec![path.to_path_buf()];
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = path.extension().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    (0..n).map(|i| path.with_file_name(format!("{stem}_{i}.{ext}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds() {
        assert_eq!(quantize(0.0), 0);
        assert_eq!(quantize(1.0), 255);
        assert_eq!(quantize(0.5), 128); // 127.5 rounds up
        assert_eq!(quantize(0.499 / 255.0 * 255.0 / 255.0), 0);
        assert_eq!(quantize(1.7 / 255.0), 2); // truncation would give 1
        assert_eq!(quantize(-3.0), 0);
        assert_eq!(quantize(f32::NAN), 0);
    }

    #[test]
    fn encodes_decodable_png() {
        let t = Tensor::ones((2, 3, 4, 6), DType::F32, &Device::Cpu).unwrap();
        let pngs = encode_batch(&t).unwrap();
        assert_eq!(pngs.len(), 2);
        let img = image::load_from_memory(&pngs[0]).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (6, 4));
        assert!(img.pixels().all(|p| p.0 == [255, 255, 255]));
    }

    #[test]
    fn numbered() {
        let p = std::path::Path::new("dir/out.png");
        assert_eq!(numbered_paths(p, 1), vec![p.to_path_buf()]);
        assert_eq!(
            numbered_paths(p, 2),
            vec![std::path::PathBuf::from("dir/out_0.png"), std::path::PathBuf::from("dir/out_1.png")]
        );
    }
}
