//! `POST /v1/images/edits`: OpenAI's multipart form (`image`, optional `mask`, `prompt`, `n`,
//! `size`, ...) plus every tiller field of a generation request and `strength`. img2img without
//! a mask, inpainting with one; steering, adapters and streaming work as for generations.
//!
//! Form fields become the same typed request as a JSON body: nested fields arrive either as
//! JSON text (`steering={"method": "fk"}`, as curl users write them) or in the bracket notation
//! the `openai` client flattens `extra_body` into (`steering[method]=fk`,
//! `adapters[][name]=x`); scalar values are read as JSON where they parse (`4`, `true`), so
//! `n=2` is a number and a misspelt one is a type error naming its field.

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value};
use std::time::Instant;

use super::error::{ApiError, ErrorResponse};
use super::handlers::prepare_parsed;
use super::types::{ImageEditForm, ImageGenerationRequest, ImagesResponse, SseEvent};
use super::AppState;
use crate::pipeline::edit::EditInput;

/// Fields whose values are text even when they look like JSON (`prompt=42` is the prompt "42").
const TEXT_FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "model",
    "size",
    "response_format",
    "output_format",
    "user",
    "quality",
    "style",
    "scheduler",
    "init_latents",
];

/// The edit's files and strength, as read from the form.
#[derive(Debug, Default)]
pub struct EditForm {
    pub image: Vec<u8>,
    pub mask: Option<Vec<u8>>,
    pub strength: Option<f64>,
}

/// A form that cannot be read is the client's doing: 413 past the body limit, else 400.
fn form_error(status: StatusCode, text: String) -> ApiError {
    let status = if status == StatusCode::PAYLOAD_TOO_LARGE { status } else { StatusCode::BAD_REQUEST };
    ApiError::new(status, "invalid_body", format!("Cannot read the multipart form: {text}"))
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// Read the multipart form into the typed request and the edit's files.
pub(crate) async fn read_form(mut form: Multipart) -> Result<(ImageGenerationRequest, EditForm), ApiError> {
    let mut fields = Map::new();
    let mut edit = EditForm::default();
    let mut image: Option<Vec<u8>> = None;
    loop {
        let field = form.next_field().await.map_err(|e| form_error(e.status(), e.body_text()))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| form_error(e.status(), e.body_text()))?;
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_some() {
                    return Err(bad("image", "send one `image`: tiller edits one input image per request"));
                }
                image = Some(bytes.to_vec());
            }
            "mask" => edit.mask = Some(bytes.to_vec()),
            "strength" => {
                let text = String::from_utf8_lossy(&bytes);
                let s: f64 = text.trim().parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_type",
                        format!("`strength` must be a number, got `{text}`"),
                    )
                    .with_param("strength")
                })?;
                edit.strength = Some(s);
            }
            "" => return Err(bad("", "a form field has no name")),
            _ => {
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| bad(&name, format!("form field `{name}` is not UTF-8 text")))?;
                insert(&mut fields, &name, &text).map_err(|m| bad(&name, m))?;
            }
        }
    }
    edit.image = image.ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "missing_required_parameter", "`image` is required: the image to edit")
            .with_param("image")
    })?;
    let req: ImageGenerationRequest = crate::util::json::parse_value(Value::Object(fields))?;
    Ok((req, edit))
}

/// A form value as JSON: text for the text fields, else JSON where it parses, else text.
fn leaf(top: &str, text: &str) -> Value {
    if TEXT_FIELDS.contains(&top) {
        return Value::String(text.to_string());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Put `name=text` into `root`, following the bracket notation: `a[b][c]` nests objects, `a[]`
/// appends to a list, and `a[][k]` adds `k` to the list's last object (a new object when that
/// one already has `k`).
fn insert(root: &mut Map<String, Value>, name: &str, text: &str) -> Result<(), String> {
    let (top, rest) = match name.find('[') {
        Some(i) => (&name[..i], &name[i..]),
        None => (name, ""),
    };
    let mut keys = Vec::new();
    let mut s = rest;
    while let Some(r) = s.strip_prefix('[') {
        let end = r.find(']').ok_or_else(|| format!("form field `{name}`: unclosed `[`"))?;
        keys.push(&r[..end]);
        s = &r[end + 1..];
    }
    if !s.is_empty() || top.is_empty() {
        return Err(format!("form field `{name}` is not `field`, `field[key]` or `field[]`"));
    }
    let value = leaf(top, text);
    if keys.is_empty() {
        if root.insert(top.to_string(), value).is_some() {
            return Err(format!("`{top}` is given twice"));
        }
        return Ok(());
    }
    let mut slot = root.entry(top.to_string()).or_insert(Value::Null);
    for (i, key) in keys.iter().enumerate() {
        let last = i + 1 == keys.len();
        if key.is_empty() {
            if slot.is_null() {
                *slot = Value::Array(Vec::new());
            }
            let Value::Array(list) = slot else { return Err(format!("`{name}` mixes a list with other values")) };
            if last {
                list.push(value);
                return Ok(());
            }
            // `a[][k]`: a new object unless the last one still lacks `k`.
            let next = keys[i + 1];
            let fresh = match list.last() {
                Some(Value::Object(o)) => o.contains_key(next),
                _ => true,
            };
            if fresh {
                list.push(Value::Object(Map::new()));
            }
            slot = list.last_mut().expect("pushed");
        } else {
            if slot.is_null() {
                *slot = Value::Object(Map::new());
            }
            let Value::Object(obj) = slot else { return Err(format!("`{name}` mixes an object with other values")) };
            if last {
                if obj.insert(key.to_string(), value).is_some() {
                    return Err(format!("`{name}` is given twice"));
                }
                return Ok(());
            }
            slot = obj.entry(key.to_string()).or_insert(Value::Null);
        }
    }
    Ok(())
}

/// The decoded input: the image (and mask) at the output size, and the size chosen.
pub(crate) struct DecodedEdit {
    pub input: EditInput,
    pub width: usize,
    pub height: usize,
}

impl EditForm {
    /// Decode the files for a model whose sizes are multiples of `factor`. `size` is the
    /// request's size (`None`/`auto`: the image's own size, rounded down to the factor). The
    /// mask is white (or opaque-to-transparent: OpenAI's convention, transparent = edit) where
    /// to repaint; without a mask, an image with transparency is masked by its alpha.
    pub(crate) fn decode(&self, factor: usize, size: Option<(usize, usize)>) -> Result<DecodedEdit, ApiError> {
        let img = image::load_from_memory(&self.image)
            .map_err(|e| bad("image", format!("`image` is not a PNG, JPEG or WebP image: {e}")))?;
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let (width, height) = match size {
            Some(wh) => wh,
            None => (iw - iw % factor, ih - ih % factor),
        };
        if width == 0 || height == 0 {
            return Err(bad(
                "image",
                format!("`image` is {iw}x{ih}, smaller than one latent pixel ({factor}x{factor})"),
            ));
        }
        let alpha_mask = |img: &image::DynamicImage| -> Option<Vec<f32>> {
            let rgba = img.to_rgba8();
            rgba.pixels().any(|p| p.0[3] < 255).then(|| rgba.pixels().map(|p| 1.0 - p.0[3] as f32 / 255.0).collect())
        };
        let mask_values: Option<Vec<f32>> = match &self.mask {
            Some(bytes) => {
                let m = image::load_from_memory(bytes)
                    .map_err(|e| bad("mask", format!("`mask` is not a PNG, JPEG or WebP image: {e}")))?;
                if (m.width() as usize, m.height() as usize) != (iw, ih) {
                    return Err(bad(
                        "mask",
                        format!("`mask` is {}x{}; it must be the image's size, {iw}x{ih}", m.width(), m.height()),
                    ));
                }
                Some(match alpha_mask(&m) {
                    Some(a) => a,
                    None => m.to_luma8().pixels().map(|p| p.0[0] as f32 / 255.0).collect(),
                })
            }
            None => alpha_mask(&img),
        };
        let strength = self.strength.unwrap_or(if mask_values.is_some() { 1.0 } else { 0.8 });
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(bad("strength", format!("`strength` must be in (0, 1], got {strength}")));
        }
        let rgb = img.to_rgb8();
        let rgb = if (iw, ih) == (width, height) {
            rgb
        } else {
            image::imageops::resize(&rgb, width as u32, height as u32, image::imageops::FilterType::Lanczos3)
        };
        let dev = candle_core::Device::Cpu;
        let err = |e: candle_core::Error| ApiError::internal(e.to_string());
        let pixels: Vec<f32> = rgb.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
        let image = candle_core::Tensor::from_vec(pixels, (1, height, width, 3), &dev)
            .and_then(|t| t.permute((0, 3, 1, 2))?.contiguous())
            .map_err(err)?;
        let mask = match mask_values {
            None => None,
            Some(values) => {
                let gray = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(iw as u32, ih as u32, values)
                    .expect("one value per pixel");
                let gray = if (iw, ih) == (width, height) {
                    gray
                } else {
                    image::imageops::resize(&gray, width as u32, height as u32, image::imageops::FilterType::Nearest)
                };
                Some(candle_core::Tensor::from_vec(gray.into_raw(), (1, 1, height, width), &dev).map_err(err)?)
            }
        };
        Ok(DecodedEdit { input: EditInput { image, mask, strength }, width, height })
    }
}

/// Edit an image (img2img, or inpainting with a mask).
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "images",
    request_body(content = ImageEditForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The edited images with tiller metadata, as for generations; with `stream: true`, \
            a `text/event-stream` of `image_edit.partial_image` and `image_edit.completed` events", body = ImagesResponse,
            content((ImagesResponse = "application/json"), (SseEvent = "text/event-stream"))),
        (status = 400, description = "Malformed form, a missing or undecodable `image`, a `mask` of another size, `strength` outside (0, 1] or leaving no step, or any invalid field of a generation request (`error.param` names it)", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key (when `server.api_key` is set)", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 413, description = "Body larger than `limits.max_body_bytes`", body = ErrorResponse),
        (status = 415, description = "Content-Type is not multipart/form-data", body = ErrorResponse),
        (status = 429, description = "Queue full; see the Retry-After header", body = ErrorResponse),
        (status = 500, description = "Internal error", body = ErrorResponse),
        (status = 503, description = "Models not loaded yet, or the server is shutting down", body = ErrorResponse),
        (status = 504, description = "Not finished within `limits.request_timeout_secs`", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn edit_image(
    State(state): State<AppState>,
    id: Option<axum::Extension<super::middleware::RequestId>>,
    headers: axum::http::HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let t0 = Instant::now();
    let mut label = None;
    let prepared = async {
        let is_form = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("multipart/form-data"));
        if !is_form {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "The request body must be a form: send `Content-Type: multipart/form-data` (curl -F)",
            ));
        }
        let form = form.map_err(|rej| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("Cannot read the multipart form: {}", rej.body_text()),
            )
        })?;
        let (req, edit) = read_form(form).await?;
        if req.experiment.is_some() || req.arm.is_some() {
            return Err(ApiError::invalid(
                "experiment",
                "edits cannot join an experiment yet; use /v1/images/generations",
            ));
        }
        prepare_parsed(&state, req, Some(edit), id.map(|i| i.0 .0), &mut label)
    }
    .await;
    super::handlers::respond(state, prepared, t0, label).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn form(items: &[(&str, &str)]) -> Result<Value, String> {
        let mut m = Map::new();
        for (k, v) in items {
            insert(&mut m, k, v)?;
        }
        Ok(Value::Object(m))
    }

    #[test]
    fn bracket_notation_rebuilds_the_json() {
        // What the openai client sends for extra_body (its `qs.stringify_items`, brackets).
        let v = form(&[
            ("prompt", "42"),
            ("n", "2"),
            ("steering[method]", "fk"),
            ("steering[particles]", "4"),
            ("steering[resample][every]", "2"),
            ("adapters[][name]", "a"),
            ("adapters[][scale]", "0.5"),
            ("adapters[][name]", "b"),
            ("reward[][name]", "x"),
            ("trace", "true"),
            ("tags[]", "p"),
            ("tags[]", "q"),
        ])
        .unwrap();
        assert_eq!(
            v,
            json!({"prompt": "42", "n": 2, "trace": true, "tags": ["p", "q"],
                   "steering": {"method": "fk", "particles": 4, "resample": {"every": 2}},
                   "adapters": [{"name": "a", "scale": 0.5}, {"name": "b"}], "reward": [{"name": "x"}]})
        );
        // JSON text works too (curl -F 'steering={"method": "fk"}').
        assert_eq!(form(&[("steering", r#"{"method": "fk"}"#)]).unwrap(), json!({"steering": {"method": "fk"}}));
        for bad in [&[("n", "1"), ("n", "2")][..], &[("a[", "1")], &[("a", "1"), ("a[b]", "2")]] {
            assert!(form(bad).is_err(), "{bad:?}");
        }
    }
}
