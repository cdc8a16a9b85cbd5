//! `POST /v1/images/edits` end to end: the multipart form (files, JSON-text and bracket fields),
//! img2img and inpainting on the analytic `models/toy-gmm` (whose VAE is exact, so the kept
//! region comes back pixel for pixel), steering with a mask, streaming, and every error naming
//! its field. Numerical parity with diffusers' pipelines is tests/parity_edits.rs.

mod http_support;

use std::path::PathBuf;

use http_support::*;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tiller::config::Config;

async fn gmm_server() -> TestServer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/toy-gmm");
    start(loaded_engine(&[("toy-gmm", dir)], 4), &Config::default()).await
}

const W: u32 = 8;
const H: u32 = 8;

/// A deterministic RGB test image, PNG-encoded.
fn input_png() -> (Vec<u8>, Vec<u8>) {
    let rgb: Vec<u8> =
        (0..W * H).flat_map(|i| [(i * 37 % 256) as u8, (i * 91 % 256) as u8, (i * 13 % 256) as u8]).collect();
    (tiller::util::encode::encode_rgb(&rgb, W, H).unwrap(), rgb)
}

/// White (repaint) on the left half.
fn left_half_mask() -> Vec<u8> {
    let rgb: Vec<u8> = (0..W * H).flat_map(|i| if i % W < W / 2 { [255u8; 3] } else { [0u8; 3] }).collect();
    tiller::util::encode::encode_rgb(&rgb, W, H).unwrap()
}

fn png_part(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes).file_name("x.png").mime_str("image/png").unwrap()
}

async fn edit(s: &TestServer, form: Form) -> (u16, Value) {
    let r = s.client.post(format!("{}/v1/images/edits", s.url)).multipart(form).send().await.unwrap();
    let st = r.status().as_u16();
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    if ct.starts_with("text/event-stream") {
        return (st, Value::String(r.text().await.unwrap()));
    }
    (st, r.json().await.unwrap_or(Value::Null))
}

fn base(extra: &[(&'static str, &'static str)]) -> Form {
    let mut f = Form::new().part("image", png_part(input_png().0)).text("prompt", "").text("seed", "3");
    for (k, v) in extra {
        f = f.text(*k, *v);
    }
    f
}

fn out_pixels(body: &Value, i: usize) -> Vec<u8> {
    let (w, h, rgb) = decode_png(body["data"][i]["b64_json"].as_str().unwrap());
    assert_eq!((w, h), (W, H));
    rgb
}

/// Largest |difference| over the pixels of the right half (kept) and of the left half.
fn halves(a: &[u8], b: &[u8]) -> (u8, f64) {
    let mut kept = 0u8;
    let (mut left, mut count) = (0f64, 0f64);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let col = (i / 3) as u32 % W;
        let d = x.abs_diff(*y);
        if col >= W / 2 {
            kept = kept.max(d);
        } else {
            left += d as f64;
            count += 1.0;
        }
    }
    (kept, left / count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inpainting_keeps_the_unmasked_region_and_repaints_the_rest() {
    let s = gmm_server().await;
    let (_, rgb) = input_png();
    for steering in [None, Some(r#"{"method": "fk", "particles": 4}"#)] {
        let mut f = base(&[("steps", "10"), ("n", "2")]).part("mask", png_part(left_half_mask()));
        if let Some(st) = steering {
            f = f.text("steering", st).text("reward", "brightness");
        }
        let (st, body) = edit(&s, f).await;
        assert_eq!(st, 200, "{body}");
        for i in 0..2 {
            let (kept, repainted) = halves(&out_pixels(&body, i), &rgb);
            // The model's VAE is exact: the kept half is the input, up to 8-bit rounding.
            assert!(kept <= 1, "{steering:?} image {i}: kept region changed by {kept}");
            assert!(repainted > 10.0, "{steering:?} image {i}: the masked half was not repainted ({repainted})");
        }
        assert_eq!(body["data"][0]["tiller"]["steering"]["method"], if steering.is_some() { "fk" } else { "none" });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_strength_sets_how_far_the_image_moves() {
    let s = gmm_server().await;
    let (_, rgb) = input_png();
    let mut moved = vec![];
    for strength in ["0.1", "0.5", "1.0"] {
        let (st, body) = edit(&s, base(&[("steps", "20"), ("strength", strength)])).await;
        assert_eq!(st, 200, "{body}");
        let out = out_pixels(&body, 0);
        let mad = out.iter().zip(&rgb).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / rgb.len() as f64;
        moved.push(mad);
        // The same request replays byte for byte.
        let (_, again) = edit(&s, base(&[("steps", "20"), ("strength", strength)])).await;
        assert_eq!(again["data"][0]["b64_json"], body["data"][0]["b64_json"]);
    }
    assert!(moved[0] < moved[1] && moved[1] < moved[2], "mean |change| by strength: {moved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_is_the_mask_as_openai_uses_it() {
    let s = gmm_server().await;
    let (_, rgb) = input_png();
    // Transparent on the left half: the image's own alpha masks it, and a mask with alpha
    // (transparent = edit) does the same.
    let rgba: Vec<u8> = rgb
        .chunks(3)
        .enumerate()
        .flat_map(|(i, p)| [p[0], p[1], p[2], if (i as u32) % W < W / 2 { 0 } else { 255 }])
        .collect();
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgba,
        W,
        H,
        image::ExtendedColorType::Rgba8,
    )
    .unwrap();
    let alpha_image = Form::new().part("image", png_part(png.clone())).text("prompt", "").text("steps", "10");
    let alpha_mask = base(&[("steps", "10")]).part("mask", png_part(png));
    for form in [alpha_image, alpha_mask] {
        let (st, body) = edit(&s, form).await;
        assert_eq!(st, 200, "{body}");
        let (kept, repainted) = halves(&out_pixels(&body, 0), &rgb);
        assert!(kept <= 1 && repainted > 10.0, "kept {kept}, repainted {repainted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bracket_fields_output_formats_and_streaming() {
    let s = gmm_server().await;
    // The openai client's flattening of extra_body.
    let f = base(&[
        ("steps", "8"),
        ("steering[method]", "best_of_n"),
        ("steering[n]", "2"),
        ("reward[][name]", "brightness"),
        ("output_format", "webp"),
    ]);
    let (st, body) = edit(&s, f).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"][0]["tiller"]["steering"]["method"], "best_of_n");
    use base64::Engine as _;
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(body["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::WebP);
    // Streaming edits use OpenAI's image_edit events.
    let (st, text) = edit(&s, base(&[("steps", "8"), ("stream", "true"), ("partial_images", "1")])).await;
    assert_eq!(st, 200);
    let text = text.as_str().unwrap();
    assert!(text.contains("event: image_edit.partial_image"), "{text}");
    assert!(text.contains("event: image_edit.completed"), "{text}");
    assert!(!text.contains("image_generation"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_forms_are_400s_naming_the_field() {
    let s = gmm_server().await;
    let small_mask = tiller::util::encode::encode_rgb(&[255u8; 4 * 4 * 3], 4, 4).unwrap();
    let cases: Vec<(Form, u16, &str)> = vec![
        (Form::new().text("prompt", "x"), 400, "image"),
        (Form::new().part("image", png_part(b"not an image".to_vec())).text("prompt", "x"), 400, "image"),
        (Form::new().part("image", png_part(input_png().0)), 400, "prompt"),
        (base(&[]).part("mask", png_part(small_mask)), 400, "mask"),
        (base(&[("strength", "0")]), 400, "strength"),
        (base(&[("strength", "1.5")]), 400, "strength"),
        (base(&[("strength", "high")]), 400, "strength"),
        (base(&[("steps", "2"), ("strength", "0.3")]), 400, "strength"),
        (
            base(&[("steering[method]", "fk"), ("steering[partilces]", "4"), ("reward", "brightness")]),
            400,
            "steering.partilces",
        ),
        (base(&[("n", "two")]), 400, "n"),
        (base(&[("colour", "red")]), 400, "colour"),
        (base(&[("size", "7x9")]).part("mask", png_part(left_half_mask())), 400, "size"),
        (base(&[("model", "nope")]), 404, "model"),
        (base(&[("experiment", "x")]), 400, "experiment"),
    ];
    for (form, want, param) in cases {
        let (st, body) = edit(&s, form).await;
        assert_error(st, &body, want, Some(param));
    }
    // A JSON body is not a form.
    let r = s
        .client
        .post(format!("{}/v1/images/edits", s.url))
        .header("content-type", "application/json")
        .body(r#"{"prompt": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("multipart/form-data"), "{body}");
}

/// A server on the sd15 fixtures: the 4-channel model and the 9-channel inpainting one.
async fn fixture_server() -> TestServer {
    let models = [("sd15-tiny", fixture_dir("sd15-tiny")), ("sd15-inpaint-tiny", fixture_dir("sd15-inpaint-tiny"))];
    start(loaded_engine(&models, 4), &Config::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inpainting_unet_edits_with_a_mask_and_refuses_everything_else() {
    let s = fixture_server().await;
    let img16 = || {
        let rgb: Vec<u8> = (0..16u32 * 16).flat_map(|i| [(i * 7 % 256) as u8, (i * 3 % 256) as u8, 90]).collect();
        png_part(tiller::util::encode::encode_rgb(&rgb, 16, 16).unwrap())
    };
    let mask16 = || {
        let rgb: Vec<u8> = (0..16u32 * 16).flat_map(|i| if i % 16 < 8 { [255u8; 3] } else { [0u8; 3] }).collect();
        png_part(tiller::util::encode::encode_rgb(&rgb, 16, 16).unwrap())
    };
    for model in ["sd15-tiny", "sd15-inpaint-tiny"] {
        let form = Form::new()
            .part("image", img16())
            .part("mask", mask16())
            .text("prompt", "a red circle")
            .text("model", model)
            .text("steps", "4")
            .text("seed", "1");
        let (st, body) = edit(&s, form).await;
        assert_eq!(st, 200, "{model}: {body}");
        assert_eq!(body["data"][0]["tiller"]["model"], model);
    }
    // Without a mask, or as a text-to-image request, the inpainting model has nothing to do.
    let form = Form::new().part("image", img16()).text("prompt", "x").text("model", "sd15-inpaint-tiny");
    let (st, body) = edit(&s, form).await;
    assert_error(st, &body, 400, Some("mask"));
    let (st, body) = s.generate(serde_json::json!({"prompt": "x", "model": "sd15-inpaint-tiny"})).await;
    assert_error(st, &body, 400, Some("model"));
}

/// img2img and inpainting on the flow twin `models/toy-flow`: the flow sampler's `add_noise`
/// (σ·ε + (1 − σ)·x0) starts the edit and re-noises the kept region, which comes back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_work_on_the_flow_model() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/toy-flow");
    let s = start(loaded_engine(&[("toy-flow", dir)], 4), &Config::default()).await;
    let (_, rgb) = input_png();
    for steering in [None, Some(r#"{"method": "fk", "particles": 4}"#), Some(r#"{"method": "flowchef"}"#)] {
        let mut f = base(&[("steps", "10"), ("n", "2")]).part("mask", png_part(left_half_mask()));
        if let Some(st) = steering {
            f = f.text("steering", st).text("reward", "brightness");
        }
        let (st, body) = edit(&s, f).await;
        assert_eq!(st, 200, "{body}");
        for i in 0..2 {
            let (kept, repainted) = halves(&out_pixels(&body, i), &rgb);
            assert!(kept <= 1, "{steering:?} image {i}: kept region changed by {kept}");
            assert!(repainted > 10.0, "{steering:?} image {i}: the masked half was not repainted ({repainted})");
        }
    }
    let mut moved = vec![];
    for strength in ["0.1", "0.5", "1.0"] {
        let (st, body) = edit(&s, base(&[("steps", "20"), ("strength", strength)])).await;
        assert_eq!(st, 200, "{body}");
        let out = out_pixels(&body, 0);
        moved.push(out.iter().zip(&rgb).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / rgb.len() as f64);
    }
    assert!(moved[0] < moved[1] && moved[1] < moved[2], "mean |change| by strength: {moved:?}");
}
