//! The rewards a server offers: built-ins plus `[rewards.NAME]` tables from the config, and
//! the resolution of a request's [`RewardSpec`] into one [`Reward`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::brightness::Brightness;
use super::color::{check_target, ColorReward};
use super::http::{check_url, HttpReward, DEFAULT_TIMEOUT_MS};
use super::jpeg::JpegReward;
use super::spec::RewardSpec;
use super::weighted::WeightedSum;
use super::{Reward, RewardError, RewardResult};
use crate::error::{Result, TillerError};

/// Reward kinds a `[rewards.NAME]` table may name.
pub const KINDS: &[&str] =
    &["brightness", "color", "jpeg_compressibility", "jpeg_incompressibility", "http", "clip_score", "aesthetic"];

/// Rewards every registry has, under their kind's name.
pub const BUILTINS: &[&str] = &["brightness", "color", "jpeg_compressibility", "jpeg_incompressibility"];

/// One `[rewards.NAME]` table of the server config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// One of [`KINDS`].
    pub kind: String,
    /// `http`: the scorer's `http://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `http`: time budget for one scoring call in milliseconds; default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `color`: default target `[r, g, b]` in [0, 1]; a request's `target` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<[f64; 3]>,
    /// `clip_score`, `aesthetic`: the CLIP model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `aesthetic`: the aesthetic MLP head (safetensors); default: a file in `path` (see
    /// [`super::clip::load_clip_reward`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<PathBuf>,
}

impl RewardConfig {
    pub fn of_kind(kind: impl Into<String>) -> Self {
        Self { kind: kind.into(), ..Self::default() }
    }

    /// Check the table named `key` without loading anything: a known kind, only the keys that
    /// kind uses, and their values.
    pub fn check(&self, key: &str) -> Result<()> {
        let field = |k: &str| format!("rewards.{key}.{k}");
        if !valid_name(key) {
            return Err(TillerError::field(
                format!("rewards.{key}"),
                "reward names use only letters, digits, `_`, `-` and `.`",
            ));
        }
        if !KINDS.contains(&self.kind.as_str()) {
            return Err(TillerError::field(
                field("kind"),
                format!("unknown reward kind `{}`; expected one of {}", self.kind, KINDS.join(", ")),
            ));
        }
        let used: &[&str] = match self.kind.as_str() {
            "color" => &["target"],
            "http" => &["url", "timeout_ms"],
            "clip_score" => &["path"],
            "aesthetic" => &["path", "head"],
            _ => &[],
        };
        let given = [
            ("url", self.url.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("target", self.target.is_some()),
            ("path", self.path.is_some()),
            ("head", self.head.is_some()),
        ];
        if let Some((k, _)) = given.iter().find(|(k, set)| *set && !used.contains(k)) {
            return Err(TillerError::field(field(k), format!("not used by reward kind `{}`", self.kind)));
        }
        let renamed = |e: RewardError, k: &str| match e {
            RewardError::Invalid(f) => TillerError::field(field(k), f.message),
            other => TillerError::field(field(k), other.to_string()),
        };
        if let Some(target) = &self.target {
            check_target(target, "target").map_err(|e| renamed(e, "target"))?;
        }
        if self.kind == "http" {
            let url =
                self.url.as_deref().ok_or_else(|| TillerError::field(field("url"), "an http reward needs a url"))?;
            check_url(url, "url").map_err(|e| renamed(e, "url"))?;
            if self.timeout_ms == Some(0) {
                return Err(TillerError::field(field("timeout_ms"), "must be at least 1"));
            }
        }
        if matches!(self.kind.as_str(), "clip_score" | "aesthetic") && self.path.is_none() {
            return Err(TillerError::field(field("path"), format!("a {} reward needs a model path", self.kind)));
        }
        Ok(())
    }
}

/// Rewards shipped as model directories: (reward name, directory under the models root, kind).
/// `tiller serve` offers each one whose directory exists, unless a `[rewards.NAME]` table
/// configures that name itself.
pub const SHIPPED: &[(&str, &str, &str)] = &[("shapes_clip", "shapes-clip", "clip_score")];

/// The configured `[rewards.*]` tables plus the [`SHIPPED`] rewards found under `models_root`.
pub fn with_shipped(
    configs: &BTreeMap<String, RewardConfig>,
    models_root: &std::path::Path,
) -> BTreeMap<String, RewardConfig> {
    let mut out = configs.clone();
    for &(name, dir, kind) in SHIPPED {
        let path = models_root.join(dir);
        if !out.contains_key(name) && path.join("config.json").is_file() {
            out.insert(name.to_string(), RewardConfig { path: Some(path), ..RewardConfig::of_kind(kind) });
        }
    }
    out
}

/// Check every `[rewards.NAME]` table (see [`RewardConfig::check`]).
pub fn check_configs(configs: &BTreeMap<String, RewardConfig>) -> Result<()> {
    configs.iter().try_for_each(|(key, cfg)| cfg.check(key))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// What `GET /v1/rewards` would list for one reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RewardInfo {
    /// The name requests use.
    pub name: String,
    /// The reward kind (`brightness`, `http`, ...; `custom` for rewards added in code).
    pub kind: String,
    /// Whether gradient-based steering can use it.
    pub differentiable: bool,
    /// `color`: the configured default target, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<[f64; 3]>,
    /// One line on what it scores.
    pub description: String,
}

enum Entry {
    Ready(Arc<dyn Reward>),
    /// Built per request, because the request may set the target.
    Color {
        target: Option<[f64; 3]>,
    },
}

struct Slot {
    kind: String,
    entry: Entry,
}

/// The rewards a server offers, by name.
pub struct RewardRegistry {
    slots: BTreeMap<String, Slot>,
}

impl std::fmt::Debug for RewardRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardRegistry").field("names", &self.names()).finish()
    }
}

impl Default for RewardRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl RewardRegistry {
    /// Only the built-in rewards ([`BUILTINS`]).
    pub fn builtin() -> Self {
        let mut slots = BTreeMap::new();
        let ready = |kind: &str, r: Arc<dyn Reward>| Slot { kind: kind.into(), entry: Entry::Ready(r) };
        slots.insert("brightness".into(), ready("brightness", Arc::new(Brightness::new())));
        slots.insert("color".into(), Slot { kind: "color".into(), entry: Entry::Color { target: None } });
        slots.insert(
            "jpeg_compressibility".into(),
            ready("jpeg_compressibility", Arc::new(JpegReward::compressibility())),
        );
        slots.insert(
            "jpeg_incompressibility".into(),
            ready("jpeg_incompressibility", Arc::new(JpegReward::incompressibility())),
        );
        Self { slots }
    }

    /// The built-ins plus one reward per `[rewards.NAME]` table; a table named like a
    /// built-in replaces it (e.g. `[rewards.color]` with a default target). CLIP rewards load
    /// their models onto `device` here.
    pub fn new(configs: &BTreeMap<String, RewardConfig>, device: &candle_core::Device) -> Result<Self> {
        let mut registry = Self::builtin();
        for (key, cfg) in configs {
            cfg.check(key)?;
            let reward: Arc<dyn Reward> = match cfg.kind.as_str() {
                "brightness" => Arc::new(Brightness::named(key.as_str())),
                "color" => {
                    registry.slots.insert(
                        key.clone(),
                        Slot { kind: cfg.kind.clone(), entry: Entry::Color { target: cfg.target } },
                    );
                    continue;
                }
                "jpeg_compressibility" => Arc::new(JpegReward::compressibility().named(key.as_str())),
                "jpeg_incompressibility" => Arc::new(JpegReward::incompressibility().named(key.as_str())),
                "http" => {
                    let url = cfg.url.clone().unwrap_or_default();
                    let reward = HttpReward::new(key.as_str(), url, cfg.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS))
                        .map_err(|e| TillerError::field(format!("rewards.{key}"), e.to_string()))?;
                    Arc::new(reward)
                }
                "clip_score" | "aesthetic" => {
                    let reward = super::clip::load_clip_reward(&cfg.kind, cfg, device).map_err(|e| {
                        TillerError::field(format!("rewards.{key}"), format!("cannot load {} reward: {e}", cfg.kind))
                    })?;
                    renamed(reward, key)
                }
                // `check` refused every other kind.
                other => {
                    return Err(TillerError::field(format!("rewards.{key}.kind"), format!("unknown kind `{other}`")))
                }
            };
            registry.slots.insert(key.clone(), Slot { kind: cfg.kind.clone(), entry: Entry::Ready(reward) });
        }
        Ok(registry)
    }

    /// Add (or replace) a reward under its own name, with kind `custom`.
    pub fn insert(&mut self, reward: Arc<dyn Reward>) {
        self.slots.insert(reward.name().to_string(), Slot { kind: "custom".into(), entry: Entry::Ready(reward) });
    }

    /// Reward names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.slots.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// Kind, differentiability and a description of one reward.
    pub fn info(&self, name: &str) -> Option<RewardInfo> {
        let slot = self.slots.get(name)?;
        let (differentiable, target) = match &slot.entry {
            Entry::Ready(r) => (r.differentiable(), None),
            Entry::Color { target } => (true, *target),
        };
        Some(RewardInfo {
            name: name.to_string(),
            kind: slot.kind.clone(),
            differentiable,
            target,
            description: match name {
                "shapes_clip" if slot.kind == "clip_score" => {
                    "ShapesCLIP (models/shapes-clip): how well a shapes-world image matches its prompt's colours, \
                     shapes, counts and relations"
                }
                _ => describe(&slot.kind),
            }
            .to_string(),
        })
    }

    /// [`RewardRegistry::info`] for every reward, by name.
    pub fn infos(&self) -> Vec<RewardInfo> {
        self.slots.keys().filter_map(|name| self.info(name)).collect()
    }

    /// Resolve a request's spec. A single term of weight 1 is the named reward itself; anything
    /// else is a [`WeightedSum`]. Errors name the request field (`reward[1].name`, ...).
    pub fn build(&self, spec: &RewardSpec) -> RewardResult<Arc<dyn Reward>> {
        let terms = spec.terms()?;
        let mut built = Vec::with_capacity(terms.len());
        for located in &terms {
            let term = &located.term;
            let slot = self.slots.get(&term.name).ok_or_else(|| {
                RewardError::invalid(
                    &located.name_field,
                    format!("unknown reward `{}`; available: {}", term.name, self.names().join(", ")),
                )
            })?;
            let reward: Arc<dyn Reward> = match &slot.entry {
                Entry::Color { target } => {
                    let target = term.target.or(*target).ok_or_else(|| {
                        RewardError::invalid(
                            located.field("target"),
                            format!(
                                "reward `{}` needs a target colour: {{\"name\": \"{}\", \"target\": [r, g, b]}} with \
                                 components in [0, 1]",
                                term.name, term.name
                            ),
                        )
                    })?;
                    Arc::new(ColorReward::checked(term.name.as_str(), target, &located.field("target"))?)
                }
                Entry::Ready(reward) => {
                    if term.target.is_some() {
                        return Err(RewardError::invalid(
                            located.field("target"),
                            format!("reward `{}` (kind {}) takes no target", term.name, slot.kind),
                        ));
                    }
                    reward.clone()
                }
            };
            built.push((term.weight(), reward));
        }
        if built.len() == 1 && built[0].0 == 1.0 {
            return Ok(built.remove(0).1);
        }
        Ok(Arc::new(WeightedSum::new(built)?))
    }
}

fn describe(kind: &str) -> &'static str {
    match kind {
        "brightness" => "mean pixel value in [0, 1]",
        "color" => "minus the mean squared RGB distance to `target` [r, g, b] (0 is a perfect match)",
        "jpeg_compressibility" => "minus the size in kB of the image as a quality-95 JPEG",
        "jpeg_incompressibility" => "the size in kB of the image as a quality-95 JPEG",
        "http" => "scores from an external HTTP scorer",
        "clip_score" => "CLIP similarity between the image and the prompt",
        "aesthetic" => "LAION aesthetic predictor on CLIP image embeddings",
        _ => "a reward added in code",
    }
}

/// `reward` under the config key's name, so that metadata says what the request said.
fn renamed(reward: Arc<dyn Reward>, name: &str) -> Arc<dyn Reward> {
    if reward.name() == name {
        reward
    } else {
        Arc::new(Renamed { name: name.to_string(), inner: reward })
    }
}

struct Renamed {
    name: String,
    inner: Arc<dyn Reward>,
}

impl Reward for Renamed {
    fn name(&self) -> &str {
        &self.name
    }

    fn differentiable(&self) -> bool {
        self.inner.differentiable()
    }

    fn score(&self, images: &Tensor, prompt: &str) -> RewardResult<Vec<f32>> {
        self.inner.score(images, prompt)
    }

    fn score_tensor(&self, images: &Tensor, prompt: &str) -> RewardResult<Tensor> {
        self.inner.score_tensor(images, prompt)
    }
}
