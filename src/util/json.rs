//! Typed JSON parsing whose errors name the field path (`steering.particles`, `reward[1].weight`).
//!
//! `serde_path_to_error` tracks the path through structs, maps and sequences, but not into the
//! enums that serde buffers first (internally tagged and untagged: `steering`, `reward`). Their
//! hand-written `Deserialize` impls parse their inner struct with [`nested`], which reports an
//! inner path inside the message as ``at `particles`: <message>``; `from_path` joins it onto
//! the outer path. Everything that parses request JSON goes through
//! [`parse_slice`] or [`parse_value`], so the joined path is the only one anyone sees.

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::error::{FieldError, FieldErrorKind};

/// Build a field error from the path serde_path_to_error reports and serde's message.
fn from_path(path: &serde_path_to_error::Path, message: &str) -> FieldError {
    let mut field = path_string(path);
    let mut message = message.to_string();
    // Inner paths reported by `nested` (possibly several levels deep).
    while let Some((inner, rest)) = split_nested(&message) {
        field = join(&field, &inner);
        message = rest;
    }
    let kind = if message.starts_with("unknown field") {
        FieldErrorKind::Unknown
    } else if message.starts_with("missing field") {
        FieldErrorKind::Missing
    } else if message.starts_with("invalid type") {
        FieldErrorKind::WrongType
    } else {
        FieldErrorKind::InvalidValue
    };
    if kind == FieldErrorKind::Unknown {
        // serde reports the unknown key's container; name the key itself.
        if let Some(key) = backticked(&message) {
            if !field.ends_with(&format!(".{key}")) && field != key {
                field = join(&field, &key);
            }
        }
    }
    if kind == FieldErrorKind::Missing {
        if let Some(key) = backticked(&message) {
            if !field.ends_with(&format!(".{key}")) && field != key {
                field = join(&field, &key);
            }
        }
    }
    let message = if field.is_empty() { message } else { format!("`{field}`: {message}") };
    FieldError { field, kind, message }
}

/// `a` + `b` as a field path: `steering` + `particles` = `steering.particles`,
/// `reward` + `[1].weight` = `reward[1].weight`.
fn join(a: &str, b: &str) -> String {
    if b.is_empty() {
        return a.to_string();
    }
    match (a.is_empty(), b.starts_with('[')) {
        (true, _) => b.to_string(),
        (false, true) => format!("{a}{b}"),
        (false, false) => format!("{a}.{b}"),
    }
}

/// The first backticked word of a serde message (`unknown field `x``).
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

const NESTED_PREFIX: &str = "at `";

fn split_nested(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix(NESTED_PREFIX)?;
    let (inner, rest) = rest.split_once("`: ")?;
    Some((inner.to_string(), rest.to_string()))
}

/// serde_path_to_error's path as `a.b[2].c`; `.` alone (the root) is empty.
fn path_string(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// JSON as Python's `json.dumps` writes it: the bare `NaN`, `Infinity` and `-Infinity` it
/// allows (diffusers writes `"lambda_min_clipped": -Infinity` into DPM-Solver scheduler configs)
/// become `null`, which config fields read as their default. Strings are left alone.
pub fn from_python_json(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("NaN") || text.contains("Infinity")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            let len = c.len_utf8();
            out.push(c);
            if c == '\\' {
                if let Some(n) = rest[len..].chars().next() {
                    out.push(n);
                    rest = &rest[len + n.len_utf8()..];
                    continue;
                }
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[len..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].iter().find(|t| rest.starts_with(**t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// Parse `bytes` as the JSON object `T`, naming the field at fault. The document is read as a
/// `Value` first: that separates syntax errors from data errors (serde_json reports some type
/// errors, a number where an enum's string belongs, as syntax errors when reading bytes), and
/// refuses the array form serde would accept for a struct.
pub fn parse_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| FieldError {
        field: String::new(),
        kind: FieldErrorKind::Syntax,
        message: format!("not valid JSON: {e}"),
    })?;
    if !value.is_object() {
        return Err(FieldError {
            field: String::new(),
            kind: FieldErrorKind::WrongType,
            message: format!("invalid type: {}, expected a JSON object", kind(&value)),
        });
    }
    parse_value(value)
}

/// Parse `bytes` as the value of the request field `field` (a command-line flag that takes a
/// request field's JSON): errors name the path from that field (`steering.particles`).
pub fn parse_as_field<T: DeserializeOwned>(field: &str, bytes: &[u8]) -> Result<T, FieldError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| FieldError {
        field: field.to_string(),
        kind: FieldErrorKind::Syntax,
        message: format!("`{field}` is not valid JSON: {e}"),
    })?;
    let wrapped = Value::Object(serde_json::Map::from_iter([(field.to_string(), value)]));
    let mut map: std::collections::BTreeMap<String, T> = parse_value(wrapped)?;
    Ok(map.remove(field).expect("the one key"))
}

/// Parse a JSON value as `T`, naming the field at fault.
pub fn parse_value<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| from_path(e.path(), &e.inner().to_string()))
}

/// For hand-written `Deserialize` impls of buffered enums: parse `value` as `T` and, on failure,
/// report the inner path (`prefix` + what serde found) inside the message, for
/// `from_path` to join onto the outer one.
pub fn nested<T: DeserializeOwned, E: serde::de::Error>(value: Value, prefix: &str) -> Result<T, E> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = join(prefix, &path_string(e.path()));
        let message = e.inner().to_string();
        if inner.is_empty() {
            E::custom(message)
        } else {
            E::custom(format!("{NESTED_PREFIX}{inner}`: {message}"))
        }
    })
}

/// "a string", "a list", ...: a JSON value's type as messages name it.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An error at `field` (relative to the value being deserialized), for hand-written impls.
pub fn error_at<E: serde::de::Error>(field: &str, message: impl std::fmt::Display) -> E {
    if field.is_empty() {
        E::custom(message)
    } else {
        E::custom(format!("{NESTED_PREFIX}{field}`: {message}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_non_finite_numbers_become_null() {
        let text = r#"{"a": -Infinity, "b": [NaN, Infinity], "c": "NaN -Infinity \"x\"", "d": 1.5}"#;
        let v: Value = serde_json::from_str(&from_python_json(text)).unwrap();
        assert_eq!(v["a"], Value::Null);
        assert_eq!(v["b"], serde_json::json!([null, null]));
        assert_eq!(v["c"], "NaN -Infinity \"x\"");
        assert_eq!(v["d"], 1.5);
        assert!(matches!(from_python_json("{}"), std::borrow::Cow::Borrowed(_)));
    }
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        items: Vec<Inner>,
    }

    fn err(json: &str) -> FieldError {
        parse_slice::<Outer>(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn names_the_field_path() {
        let e = err(r#"{"name": "a", "items": [{"count": 1}, {"count": "x"}]}"#);
        assert_eq!((e.field.as_str(), e.kind), ("items[1].count", FieldErrorKind::WrongType));
        assert!(e.message.starts_with("`items[1].count`: invalid type"), "{}", e.message);
        let e = err(r#"{"name": "a", "items": [{"count": 1, "cuont": 2}]}"#);
        assert_eq!((e.field.as_str(), e.kind), ("items[0].cuont", FieldErrorKind::Unknown));
        let e = err(r#"{"nmae": "a"}"#);
        assert_eq!((e.field.as_str(), e.kind), ("nmae", FieldErrorKind::Unknown));
        let e = err(r#"{"items": []}"#);
        assert_eq!((e.field.as_str(), e.kind), ("name", FieldErrorKind::Missing));
        let e = err(r#"{"name": "a", "items": [{}]}"#);
        assert_eq!((e.field.as_str(), e.kind), ("items[0].count", FieldErrorKind::Missing));
        let e = err(r#"{"name": "a", "items": [{"count": -1}]}"#);
        assert_eq!((e.field.as_str(), e.kind), ("items[0].count", FieldErrorKind::InvalidValue));
        let e = err(r#"{"name": "a""#);
        assert_eq!((e.field.as_str(), e.kind), ("", FieldErrorKind::Syntax));
        let e = err(r#"["a"]"#);
        assert_eq!((e.field.as_str(), e.kind), ("", FieldErrorKind::WrongType));
    }

    /// A buffered wrapper, as `steering` and `reward` are.
    #[derive(Debug)]
    #[allow(dead_code)]
    struct Wrapped(Inner);

    impl<'de> Deserialize<'de> for Wrapped {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let v = Value::deserialize(d)?;
            nested(v, "").map(Wrapped)
        }
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Holder {
        list: Vec<Wrapped>,
    }

    #[test]
    fn joins_nested_paths() {
        let e = parse_slice::<Holder>(br#"{"list": [{"count": 1}, {"count": 1, "x": 0}]}"#).unwrap_err();
        assert_eq!((e.field.as_str(), e.kind), ("list[1].x", FieldErrorKind::Unknown));
        let e = parse_slice::<Holder>(br#"{"list": [{"count": true}]}"#).unwrap_err();
        assert_eq!((e.field.as_str(), e.kind), ("list[0].count", FieldErrorKind::WrongType));
        assert!(!e.message.contains("at `"), "{}", e.message);
    }
}
