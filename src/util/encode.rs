//! Encoding decoded images: PNG (with an optional `parameters` text chunk), JPEG and WebP.

use candle_core::{DType, Device, Tensor};
use image::ImageEncoder;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Result, TillerError};

/// The file format of returned images (OpenAI's `output_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    /// Lossless WebP.
    Webp,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    /// The format a file name asks for (`.png`, `.jpg`/`.jpeg`, `.webp`), if any.
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to encode: the format and, for JPEG, the quality (OpenAI's `output_compression`,
/// 0–100, where 100 keeps the most detail; 0 is taken as 1, JPEG's lowest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub format: OutputFormat,
    pub quality: u8,
}

impl Default for Encoding {
    fn default() -> Self {
        Self { format: OutputFormat::Png, quality: 100 }
    }
}

/// Quantise one channel value in [0, 1] to a byte: `round(x * 255)`, clamped (NaN → 0).
pub fn quantize(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Encode a batch of images (n, 3, H, W) with values in [0, 1] as RGB PNGs, one per image.
pub fn encode_batch(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    encode_batch_as(images, Encoding::default(), |_| None)
}

/// Encode a batch of images (n, 3, H, W) with values in [0, 1]; `parameters(i)` is the text of
/// image i's PNG `parameters` chunk (ignored for JPEG and WebP).
pub fn encode_batch_as(
    images: &Tensor,
    encoding: Encoding,
    parameters: impl Fn(usize) -> Option<String>,
) -> Result<Vec<Vec<u8>>> {
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
        out.push(encode_rgb_as(&rgb, w as u32, h as u32, encoding, parameters(i).as_deref())?);
    }
    Ok(out)
}

/// Encode interleaved 8-bit RGB rows as a PNG.
pub fn encode_rgb(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    encode_rgb_as(rgb, width, height, Encoding::default(), None)
}

/// Encode interleaved 8-bit RGB rows; a PNG gets `parameters` as its `parameters` text chunk.
pub fn encode_rgb_as(
    rgb: &[u8],
    width: u32,
    height: u32,
    encoding: Encoding,
    parameters: Option<&str>,
) -> Result<Vec<u8>> {
    let fail =
        |e: &dyn std::fmt::Display| TillerError::Other(anyhow::anyhow!("{} encoding failed: {e}", encoding.format));
    let mut buf = Vec::new();
    match encoding.format {
        OutputFormat::Png => {
            let mut enc = png::Encoder::new(&mut buf, width, height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            if let Some(text) = parameters {
                // tEXt holds Latin-1 only; other text goes in an iTXt chunk (UTF-8), as PIL does.
                let keyword = PARAMETERS_KEYWORD.to_string();
                if text.chars().all(|c| (c as u32) < 256) {
                    enc.add_text_chunk(keyword, text.to_string()).map_err(|e| fail(&e))?;
                } else {
                    enc.add_itxt_chunk(keyword, text.to_string()).map_err(|e| fail(&e))?;
                }
            }
            let mut writer = enc.write_header().map_err(|e| fail(&e))?;
            writer.write_image_data(rgb).map_err(|e| fail(&e))?;
            writer.finish().map_err(|e| fail(&e))?;
        }
        OutputFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, encoding.quality.clamp(1, 100))
                .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| fail(&e))?;
        }
        OutputFormat::Webp => {
            image::codecs::webp::WebPEncoder::new_lossless(&mut buf)
                .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| fail(&e))?;
        }
    }
    Ok(buf)
}

/// The PNG text keyword under which Stable Diffusion web UIs store generation parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// What the `parameters` chunk records about one image.
#[derive(Debug, Clone)]
pub struct GenerationInfo<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub steps: usize,
    pub sampler: crate::sampling::SamplerKind,
    pub guidance_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub eta: f64,
    pub model: &'a str,
    /// `(name, scale)` per LoRA adapter.
    pub adapters: Vec<(&'a str, f64)>,
    /// The steering spec as JSON (`None` for plain sampling).
    pub steering: Option<String>,
    pub reward: Option<&'a str>,
}

/// The text in the layout AUTOMATIC1111's web UI writes and reads ("PNG Info", and the tools
/// that import its images): the prompt (LoRAs as `<lora:name:scale>` tags), a
/// `Negative prompt:` line, then `Key: value` pairs separated by `, `, values holding `,`, `:`
/// or a newline in JSON quotes. tiller adds `Eta`, `Steering` and `Reward`.
pub fn a1111_parameters(g: &GenerationInfo) -> String {
    let mut prompt = g.prompt.to_string();
    for (name, scale) in &g.adapters {
        prompt.push_str(&format!(" <lora:{name}:{scale}>"));
    }
    let mut text = prompt.trim().to_string();
    if let Some(neg) = g.negative_prompt.filter(|n| !n.is_empty()) {
        text.push_str(&format!("\nNegative prompt: {neg}"));
    }
    let sampler = match g.sampler {
        crate::sampling::SamplerKind::Ddim => "DDIM",
        crate::sampling::SamplerKind::Ddpm => "DDPM",
        crate::sampling::SamplerKind::Euler => "Euler",
        crate::sampling::SamplerKind::EulerAncestral => "Euler a",
        crate::sampling::SamplerKind::Lcm => "LCM",
        crate::sampling::SamplerKind::EulerKarras => "Euler Karras",
        crate::sampling::SamplerKind::DpmPp2m => "DPM++ 2M",
        crate::sampling::SamplerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        crate::sampling::SamplerKind::FlowEuler => "Euler",
        crate::sampling::SamplerKind::FlowSde => "Euler SDE",
    };
    let mut pairs: Vec<(&str, String)> = vec![
        ("Steps", g.steps.to_string()),
        ("Sampler", sampler.to_string()),
        ("CFG scale", g.guidance_scale.to_string()),
        ("Seed", g.seed.to_string()),
        ("Size", format!("{}x{}", g.width, g.height)),
        ("Model", g.model.to_string()),
        ("Eta", g.eta.to_string()),
    ];
    if let Some(s) = &g.steering {
        pairs.push(("Steering", s.clone()));
    }
    if let Some(r) = g.reward {
        pairs.push(("Reward", r.to_string()));
    }
    pairs.push(("Version", format!("tiller {}", env!("CARGO_PKG_VERSION"))));
    let line: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}: {}", quote(&v))).collect();
    text.push_str(&format!("\n{}", line.join(", ")));
    text
}

/// A value as the web UI quotes it: JSON-quoted when it holds `,`, `:` or a newline.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_default()
    } else {
        v.to_string()
    }
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

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])).collect()
    }

    #[test]
    fn jpeg_and_webp_round_trip() {
        let (w, h) = (48, 32);
        let rgb = gradient(w, h);
        let webp = encode_rgb_as(&rgb, w, h, Encoding { format: OutputFormat::Webp, quality: 100 }, None).unwrap();
        assert_eq!(image::guess_format(&webp).unwrap(), image::ImageFormat::WebP);
        let back = image::load_from_memory(&webp).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), &rgb, "WebP output is lossless");
        let mut sizes = vec![];
        for quality in [95, 30] {
            let jpeg = encode_rgb_as(&rgb, w, h, Encoding { format: OutputFormat::Jpeg, quality }, None).unwrap();
            assert_eq!(image::guess_format(&jpeg).unwrap(), image::ImageFormat::Jpeg);
            let back = image::load_from_memory(&jpeg).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (w, h));
            let mad = back.as_raw().iter().zip(&rgb).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>()
                / rgb.len() as f64;
            assert!(mad < if quality == 95 { 2.0 } else { 8.0 }, "quality {quality}: mean abs diff {mad}");
            sizes.push(jpeg.len());
        }
        assert!(sizes[1] < sizes[0], "lower quality, smaller file: {sizes:?}");
    }

    fn read_parameters(png_bytes: &[u8]) -> Option<String> {
        let reader = png::Decoder::new(std::io::Cursor::new(png_bytes)).read_info().unwrap();
        let info = reader.info();
        let latin1 = info.uncompressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEYWORD);
        let utf8 = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEYWORD);
        latin1.map(|c| c.text.clone()).or_else(|| utf8.map(|c| c.get_text().unwrap()))
    }

    /// The key-value line as the web UI's reader splits it: `Key: value` pairs separated by
    /// commas, values optionally in JSON quotes.
    fn parse_pairs(line: &str) -> Vec<(String, String)> {
        let mut out = vec![];
        let mut rest = line.trim();
        while !rest.is_empty() {
            let (key, after) = rest.split_once(':').unwrap();
            let after = after.trim_start();
            let (value, next) = if after.starts_with('"') {
                let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
                let v = de.next().unwrap().unwrap();
                (v, &after[de.byte_offset()..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            out.push((key.trim().to_string(), value));
            rest = next.trim_start_matches(',').trim_start();
        }
        out
    }

    #[test]
    fn png_parameters_chunk_round_trips_in_the_web_ui_layout() {
        let steering = r#"{"method":"fk","particles":4,"beta":10.0}"#.to_string();
        for prompt in ["one red circle, two blue squares", "un cercle rouge ≠ carré"] {
            let info = GenerationInfo {
                prompt,
                negative_prompt: Some("blurry"),
                steps: 20,
                sampler: crate::sampling::SamplerKind::EulerAncestral,
                guidance_scale: 7.5,
                seed: 42,
                width: 64,
                height: 48,
                eta: 1.0,
                model: "shapes",
                adapters: vec![("shapes-lcm", 0.8)],
                steering: Some(steering.clone()),
                reward: Some("shapes_clip"),
            };
            let text = a1111_parameters(&info);
            let png_bytes = encode_rgb_as(&gradient(8, 8), 8, 8, Encoding::default(), Some(&text)).unwrap();
            assert_eq!(read_parameters(&png_bytes).as_deref(), Some(text.as_str()));
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            assert_eq!(lines[0], format!("{prompt} <lora:shapes-lcm:0.8>"));
            assert_eq!(lines[1], "Negative prompt: blurry");
            let pairs = parse_pairs(lines[2]);
            let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
            assert_eq!(get("Steps"), Some("20"));
            assert_eq!(get("Sampler"), Some("Euler a"));
            assert_eq!(get("CFG scale"), Some("7.5"));
            assert_eq!(get("Seed"), Some("42"));
            assert_eq!(get("Size"), Some("64x48"));
            assert_eq!(get("Model"), Some("shapes"));
            assert_eq!(get("Steering"), Some(steering.as_str()));
            assert_eq!(get("Reward"), Some("shapes_clip"));
        }
        // Without parameters, no chunk.
        assert_eq!(read_parameters(&encode_rgb(&gradient(8, 8), 8, 8).unwrap()), None);
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
