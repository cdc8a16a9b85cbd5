//! `http`: an external scorer behind a URL.
//!
//! tiller POSTs `{"prompt": "...", "images": ["<base64 PNG>", ...]}` and expects
//! `{"scores": [number, ...]}` with exactly one finite number per image. Anything else is an
//! [`RewardError::Upstream`] saying what was wrong; no answer within `timeout_ms` is a
//! [`RewardError::Timeout`].
//!
//! The client is `ureq`, which is blocking: rewards are scored on the engine's plain worker
//! thread, and a blocking client there needs no async runtime (reqwest's blocking client runs
//! a hidden tokio runtime that panics if it is ever dropped inside another runtime). It is
//! built without TLS, so the URL must be `http://`.

use std::time::Duration;

use base64::Engine as _;
use candle_core::Tensor;
use serde::Deserialize;

use super::{image_dims, Reward, RewardError, RewardResult};

/// Default time budget for one scoring call, connection and body included.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Largest response body read; a score list is tiny, so more means a misbehaving scorer.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// A reward computed by an HTTP service.
pub struct HttpReward {
    name: String,
    url: String,
    timeout_ms: u64,
    agent: ureq::Agent,
}

impl std::fmt::Debug for HttpReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpReward")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Check a scorer URL; `field` is blamed in the error.
pub fn check_url(url: &str, field: &str) -> RewardResult<()> {
    let rest = match url.strip_prefix("http://") {
        Some(rest) => rest,
        None if url.starts_with("https://") => {
            return Err(RewardError::invalid(
                field,
                format!("`{url}`: https is not supported (tiller's scorer client has no TLS); use http://"),
            ))
        }
        None => return Err(RewardError::invalid(field, format!("`{url}` is not an http:// URL"))),
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(RewardError::invalid(field, format!("`{url}` has no host")));
    }
    url.parse::<ureq::http::Uri>().map_err(|e| RewardError::invalid(field, format!("`{url}`: {e}")))?;
    Ok(())
}

#[derive(Deserialize)]
struct Answer {
    // Options so that `null` (what serde_json writes for NaN) is reported as non-finite
    // rather than as a type error.
    scores: Vec<Option<f64>>,
}

impl HttpReward {
    /// A scorer at `url` (`http://` only) with a whole-call time budget of `timeout_ms` (≥ 1).
    pub fn new(name: impl Into<String>, url: impl Into<String>, timeout_ms: u64) -> RewardResult<Self> {
        let (name, url) = (name.into(), url.into());
        check_url(&url, "url")?;
        if timeout_ms == 0 {
            return Err(RewardError::invalid("timeout_ms", "must be at least 1"));
        }
        let config = ureq::Agent::config_builder()
            // End to end, body included, so a scorer that trickles bytes cannot stall the worker.
            .timeout_global(Some(Duration::from_millis(timeout_ms)))
            // Non-2xx answers are read here, so their body can go into the error message.
            .http_status_as_error(false)
            .build();
        Ok(Self { name, url, timeout_ms, agent: config.into() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    fn upstream(&self, message: impl Into<String>) -> RewardError {
        RewardError::Upstream { reward: self.name.clone(), message: message.into() }
    }

    fn transport_error(&self, e: ureq::Error) -> RewardError {
        match e {
            ureq::Error::Timeout(_) => RewardError::Timeout { reward: self.name.clone(), timeout_ms: self.timeout_ms },
            ureq::Error::Io(ref io) if io.kind() == std::io::ErrorKind::TimedOut => {
                RewardError::Timeout { reward: self.name.clone(), timeout_ms: self.timeout_ms }
            }
            e => self.upstream(format!("request to {} failed: {e}", self.url)),
        }
    }

    fn parse_answer(&self, body: &[u8], n: usize) -> RewardResult<Vec<f32>> {
        let answer: Answer = serde_json::from_slice(body).map_err(|e| {
            let text = String::from_utf8_lossy(body);
            // Python's json module writes NaN/Infinity as bare words, which are not JSON.
            let hint = if ["NaN", "Infinity"].iter().any(|w| text.contains(w)) {
                " (NaN and Infinity are not valid JSON scores)"
            } else {
                ""
            };
            self.upstream(format!(
                "malformed response, expected {{\"scores\": [number, ...]}}: {e}{hint}; body: {}",
                snippet(&text)
            ))
        })?;
        if answer.scores.len() != n {
            return Err(self.upstream(format!("expected {n} scores (one per image), got {}", answer.scores.len())));
        }
        answer
            .scores
            .iter()
            .enumerate()
            .map(|(i, s)| match s.map(|v| v as f32) {
                Some(v) if v.is_finite() => Ok(v),
                _ => Err(self.upstream(format!(
                    "score {i} is not a finite number: {}",
                    s.map_or("null".to_string(), |v| format!("{v:?}"))
                ))),
            })
            .collect()
    }
}

/// The start of a body, for error messages.
fn snippet(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

impl Reward for HttpReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, images: &Tensor, prompt: &str) -> RewardResult<Vec<f32>> {
        let (n, _, _) = image_dims(images)?;
        let pngs =
            crate::util::encode::encode_batch(&images.detach()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({
            "prompt": prompt,
            "images": pngs.iter().map(|p| b64.encode(p)).collect::<Vec<_>>(),
        });
        let body = serde_json::to_vec(&body).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut response = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            return Err(self.upstream(format!(
                "{} answered HTTP {status}: {}",
                self.url,
                snippet(&String::from_utf8_lossy(&bytes))
            )));
        }
        self.parse_answer(&bytes, n)
    }
}
