//! The committed openapi/openapi.json must equal the document the server serves.
//!
//! Regenerate after changing the API:
//! `TILLER_UPDATE_OPENAPI=1 cargo test --test openapi_drift` (or `tiller openapi > openapi/openapi.json`).

use std::path::Path;

#[test]
fn committed_openapi_matches_the_served_document() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let generated = tiller::api::openapi_json();
    if std::env::var_os("TILLER_UPDATE_OPENAPI").is_some_and(|v| v != "0") {
        std::fs::write(&path, &generated).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{} is out of date (first difference at line {}).\nRegenerate it with \
             `TILLER_UPDATE_OPENAPI=1 cargo test --test openapi_drift` and commit the result.",
            path.display(),
            line + 1
        );
    }
}

#[test]
fn document_is_openapi_3_with_all_routes() {
    let doc: serde_json::Value = serde_json::from_str(&tiller::api::openapi_json()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/v1/images/generations", "/v1/models", "/v1/models/{model}", "/health", "/ready", "/metrics"] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    // The schema's fields are exactly those the parser accepts; serde lists them when it meets
    // an unknown one.
    let props = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"].as_object().unwrap();
    let documented: std::collections::BTreeSet<&str> = props.keys().map(|k| k.as_str()).collect();
    let err = tiller::api::validate::parse_body(br#"{"prompt": "x", "no_such_field": 1}"#).unwrap_err();
    assert_eq!(err.param.as_deref(), Some("no_such_field"));
    let accepted: std::collections::BTreeSet<&str> =
        err.message.split("expected one of ").nth(1).unwrap().split(", ").map(|f| f.trim_matches('`')).collect();
    assert_eq!(documented, accepted, "{}", err.message);
}
