//! `/v1/adapters`: listing, registering and removing LoRA adapters.
//!
//! Listing is a `/v1` route like the others (the API key when one is configured). Registering
//! and removing change what every client can use, so they need the admin key when
//! `server.admin_key` is set, and otherwise the API key when `server.api_key` is set (see
//! [`super::middleware::require_manage_key`]).

use std::path::Path as FsPath;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{ApiError, ErrorResponse};
use super::types::{AdapterInfo, AdapterList, RegisterAdapterRequest};
use super::AppState;
use crate::adapters::lora::ModuleKey;
use crate::adapters::registry::{valid_name, AdapterRegistry};
use crate::adapters::{Adapter, Component};

/// Files that make a directory an adapter (PEFT and diffusers layouts).
const DIR_FILES: [&str; 2] = ["adapter_model.safetensors", "pytorch_lora_weights.safetensors"];

/// Best guess of the model family an adapter was made for: the file's own metadata first, then
/// an SDXL-only component or block naming, then the width of the UNet's cross-attention keys
/// (the text encoder's hidden size: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL) or of the text
/// encoder's own projections.
pub fn base_model_hint(a: &Adapter) -> Option<String> {
    for key in ["ss_base_model_version", "modelspec.architecture"] {
        if let Some(v) = a.metadata.get(key) {
            let v = v.to_ascii_lowercase();
            if v.contains("sdxl") || v.contains("-xl") {
                return Some("sdxl".into());
            }
            if v.starts_with("sd_v1") || v.contains("stable-diffusion-v1") {
                return Some("sd1".into());
            }
            if v.starts_with("sd_v2") || v.contains("stable-diffusion-v2") {
                return Some("sd2".into());
            }
        }
    }
    let layers = &a.file.layers;
    let sgm = |l: &&crate::adapters::lora::LoraLayer| {
        l.component == Component::Unet
            && matches!(&l.key, ModuleKey::Underscored(k)
                if ["input_blocks_", "middle_block_", "output_blocks_"].iter().any(|p| k.starts_with(p)))
    };
    if layers.iter().any(|l| l.component == Component::TextEncoder2) || layers.iter().any(|l| sgm(&l)) {
        return Some("sdxl".into());
    }
    let by_width = |w: usize| match w {
        768 => Some("sd1".to_string()),
        1024 => Some("sd2".to_string()),
        2048 => Some("sdxl".to_string()),
        _ => None,
    };
    let cross = layers.iter().find(|l| {
        l.component == Component::Unet && (l.source.ends_with("attn2_to_k") || l.source.ends_with("attn2.to_k"))
    });
    if let Some(l) = cross {
        return l.down.dims().get(1).copied().and_then(by_width);
    }
    let te = layers.iter().find(|l| l.component == Component::TextEncoder && l.source.ends_with("q_proj"));
    te.and_then(|l| l.down.dims().get(1).copied()).and_then(|w| if w == 1024 { Some("sd2".into()) } else { None })
}

fn info(a: &Adapter, root: &FsPath) -> AdapterInfo {
    let s = a.summary(root);
    AdapterInfo {
        object: "adapter".into(),
        name: s.name,
        format: s.format,
        rank: s.rank,
        base_model: base_model_hint(a),
        components: s.components.into_iter().collect(),
        modules: s.modules,
        module_keys: s.module_keys,
        size_bytes: s.size_bytes,
        path: s.path,
    }
}

fn root_of(reg: &AdapterRegistry) -> &FsPath {
    reg.root().unwrap_or(FsPath::new(""))
}

/// List the registered LoRA adapters.
#[utoipa::path(
    get,
    path = "/v1/adapters",
    tag = "adapters",
    responses(
        (status = 200, description = "Registered adapters, by name", body = AdapterList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn list_adapters(State(state): State<AppState>) -> Json<AdapterList> {
    let reg = &state.adapters;
    let data = reg.list().into_iter().filter_map(|s| reg.get(&s.name).ok()).map(|a| info(&a, root_of(reg))).collect();
    Json(AdapterList { object: "list".into(), data })
}

/// Describe one adapter.
#[utoipa::path(
    get,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 200, description = "The adapter", body = AdapterInfo),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown adapter", body = ErrorResponse),
        (status = 414, description = "URI longer than 8192 bytes", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn get_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<AdapterInfo>, ApiError> {
    let a = state.adapters.get(&name).map_err(|e| ApiError::adapter(e, "name"))?;
    Ok(Json(info(&a, root_of(&state.adapters))))
}

/// Register a LoRA file inside the adapters root.
///
/// The file is read and validated completely (safetensors structure, finite values, a known
/// LoRA key layout) before it is registered; whether it fits a model is checked when a request
/// uses it. The file stays where it is; it is found again at the next start only if it lies
/// directly under the root (`NAME.safetensors` or `NAME/`).
#[utoipa::path(
    post,
    path = "/v1/adapters",
    tag = "adapters",
    request_body = RegisterAdapterRequest,
    responses(
        (status = 201, description = "Registered (or replaced, with `replace: true`)", body = AdapterInfo,
            headers(("Location" = String, description = "/v1/adapters/{name}"))),
        (status = 401, description = "Missing or wrong admin key (`server.admin_key`; the API key when no admin key is set)", body = ErrorResponse),
        (status = 409, description = "An adapter of that name exists (send `replace: true`, or DELETE it first)", body = ErrorResponse),
        (status = 413, description = "Body larger than 64 KiB (it names a file; it does not carry one)", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 400, description = "Malformed JSON, a bad field, a path outside the adapters root (`..`, symlinks leading out), or a malformed file; `error.param` names the field and the message the problem", body = ErrorResponse),
        (status = 500, description = "The file could not be read", body = ErrorResponse),
        (status = 503, description = "No adapters root: `adapters.root` does not exist", body = ErrorResponse),
    ),
    security((), ("admin_key" = []))
)]
pub async fn register_adapter(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match register_inner(&state, body).await {
        Ok((info, location)) => {
            let mut resp = (StatusCode::CREATED, Json(info)).into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// Largest `POST /v1/adapters` body: it names a file, it does not carry one.
pub const ADAPTER_BODY_LIMIT: usize = 64 * 1024;

/// Parse a `POST /v1/adapters` body; errors name the field (400).
pub fn parse_register(bytes: &[u8]) -> Result<RegisterAdapterRequest, ApiError> {
    Ok(crate::util::json::parse_slice(bytes)?)
}

/// The name an adapter gets when the request gives none: the file's stem, or the directory's
/// name for a PEFT/diffusers directory (as the client wrote the path, before symlinks).
fn default_name(path: &str, resolved: &FsPath) -> Option<String> {
    let p = FsPath::new(path);
    let file_name = p.file_name().and_then(|s| s.to_str())?;
    let name = if DIR_FILES.contains(&file_name) {
        p.parent().and_then(|d| d.file_name()).and_then(|s| s.to_str())?
    } else if DIR_FILES.iter().any(|f| resolved.ends_with(f)) && !file_name.ends_with(".safetensors") {
        file_name
    } else {
        p.file_stem().and_then(|s| s.to_str())?
    };
    Some(name.to_string())
}

async fn register_inner(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<(AdapterInfo, String), ApiError> {
    // A body over the limit is 413 like on every other route, not a generic 400.
    let bytes = body.map_err(|rej| super::handlers::body_error(rej, ADAPTER_BODY_LIMIT))?;
    let req = parse_register(&bytes)?;
    let reg = state.adapters.clone();
    if reg.root().is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "adapters_disabled",
            format!(
                "Adapters are disabled: the adapters root `{}` does not exist. Create it (or point \
                 `adapters.root` at an existing directory) and restart the server",
                state.adapters_root.display()
            ),
        ));
    }
    // Reading and validating a file of up to 2 GiB is blocking work.
    tokio::task::spawn_blocking(move || register_blocking(&reg, req))
        .await
        .map_err(|e| ApiError::internal(format!("registering the adapter failed: {e}")))?
}

fn register_blocking(
    reg: &Arc<AdapterRegistry>,
    req: RegisterAdapterRequest,
) -> Result<(AdapterInfo, String), ApiError> {
    let path = req.path.as_str();
    let resolved = reg.confine(path).map_err(|e| ApiError::adapter(e, "path"))?;
    let name = match req.name {
        Some(n) => n,
        None => default_name(path, &resolved).ok_or_else(|| {
            ApiError::invalid("name", format!("cannot derive an adapter name from `{path}`; send `name`"))
        })?,
    };
    if !valid_name(&name) {
        return Err(ApiError::invalid(
            "name",
            format!(
                "`{name}` is not a valid adapter name: 1 to 128 letters, digits, `_`, `-` or `.`, not starting with `.`"
            ),
        ));
    }
    let replace = req.replace.unwrap_or(false);
    if !replace && reg.get(&name).is_ok() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "adapter_exists",
            format!("An adapter named `{name}` already exists; send `\"replace\": true` or DELETE /v1/adapters/{name} first"),
        )
        .with_param("name"));
    }
    reg.register(Some(&name), path, replace).map_err(|e| match e {
        crate::adapters::AdapterError::Invalid(msg) => ApiError::invalid("path", format!("`{path}`: {msg}")),
        other => ApiError::adapter(other, "path"),
    })?;
    let a = reg.get(&name).map_err(|e| ApiError::adapter(e, "name"))?;
    tracing::info!("adapter `{name}` registered from {}", a.path.display());
    Ok((info(&a, root_of(reg)), format!("/v1/adapters/{name}")))
}

/// Unregister an adapter (its file stays on disk).
#[utoipa::path(
    delete,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 204, description = "Removed; requests naming it now get 404"),
        (status = 401, description = "Missing or wrong admin key (`server.admin_key`; the API key when no admin key is set)", body = ErrorResponse),
        (status = 404, description = "Unknown adapter", body = ErrorResponse),
        (status = 414, description = "URI longer than 8192 bytes", body = ErrorResponse),
    ),
    security((), ("admin_key" = []))
)]
pub async fn delete_adapter(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    state.adapters.remove(&name).map_err(|e| ApiError::adapter(e, "name"))?;
    tracing::info!("adapter `{name}` removed");
    Ok(StatusCode::NO_CONTENT)
}
