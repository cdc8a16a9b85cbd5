//! The `reward` field of a request: which reward to steer towards.
//!
//! Three JSON forms:
//!
//! * `"brightness"`: a reward by name;
//! * `{"name": "color", "target": [1.0, 0.0, 0.0]}`: one term with parameters;
//! * `[{"name": "clip_score", "weight": 1.0}, {"name": "jpeg_compressibility", "weight": 0.1}]`:
//!   a weighted sum.
//!
//! `Deserialize` is written by hand so that errors name the offending field (`reward[1].weight`),
//! which serde's untagged-enum messages cannot. The registry ([`super::RewardRegistry::build`])
//! resolves names and checks the rest.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{RewardError, RewardResult};

/// A reward to maximise: a name, one term, or a weighted sum of terms.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
#[schema(example = json!([{"name": "clip_score", "weight": 1.0}, {"name": "jpeg_compressibility", "weight": 0.1}]))]
pub enum RewardSpec {
    /// A reward by name (`GET /v1/rewards` lists them), weight 1.
    Name(String),
    /// One reward with parameters.
    Term(RewardTerm),
    /// `Σ weight · reward` over the terms (at least one).
    Sum(Vec<RewardTerm>),
}

/// One reward in a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    /// Reward name.
    #[schema(example = "color")]
    pub name: String,
    /// Multiplier of this reward's score; default 1; |weight| ≤ 1e6 (scores are f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -1e6, maximum = 1e6)]
    pub weight: Option<f64>,
    /// Target `[r, g, b]` in [0, 1], for `color`-kind rewards only (overrides a configured one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = rgb_schema)]
    pub target: Option<[f64; 3]>,
}

/// Largest |weight| of a reward term: scores are computed in f32, and a weight that can turn a
/// score into infinity would pass an f64 finiteness check and fail (or vanish) later.
pub const MAX_REWARD_WEIGHT: f64 = 1e6;

/// `[r, g, b]`: exactly three numbers in [0, 1].
fn rgb_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(ObjectBuilder::new().schema_type(Type::Number).minimum(Some(0.0)).maximum(Some(1.0)))
        .min_items(Some(3))
        .max_items(Some(3))
        .examples([serde_json::json!([1.0, 0.0, 0.0])])
        .build()
}

impl RewardTerm {
    pub fn named(name: impl Into<String>) -> Self {
        Self { name: name.into(), weight: None, target: None }
    }

    /// The weight, 1 when absent.
    pub fn weight(&self) -> f64 {
        self.weight.unwrap_or(1.0)
    }
}

/// A term of a spec together with the request fields to blame for it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocatedTerm {
    pub term: RewardTerm,
    /// Field of the reward name: `reward`, `reward.name` or `reward[i].name`.
    pub name_field: String,
    /// Prefix of the term's other fields: `reward` or `reward[i]`.
    pub prefix: String,
}

impl LocatedTerm {
    /// `prefix.key`, e.g. `reward[1].weight`.
    pub fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }
}

impl<'de> Deserialize<'de> for RewardSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use crate::util::json::{kind, nested};
        use serde::de::Error as _;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Name(s)),
            v @ Value::Object(_) => Ok(Self::Term(nested(v, "")?)),
            Value::Array(items) => Ok(Self::Sum(
                items.into_iter().enumerate().map(|(i, v)| nested(v, &format!("[{i}]"))).collect::<Result<_, _>>()?,
            )),
            other => Err(D::Error::custom(format!(
                "invalid type: {}, expected a reward name, a {{\"name\": ...}} object or a list of them",
                kind(&other)
            ))),
        }
    }
}

impl RewardSpec {
    /// The terms with their field names, after the structural checks: non-empty list,
    /// non-empty names, finite weights. Names are resolved by the registry.
    pub fn terms(&self) -> RewardResult<Vec<LocatedTerm>> {
        let located = match self {
            Self::Name(name) => vec![LocatedTerm {
                term: RewardTerm::named(name.clone()),
                name_field: "reward".into(),
                prefix: "reward".into(),
            }],
            Self::Term(term) => {
                vec![LocatedTerm { term: term.clone(), name_field: "reward.name".into(), prefix: "reward".into() }]
            }
            Self::Sum(terms) => {
                if terms.is_empty() {
                    return Err(RewardError::invalid("reward", "the list of reward terms is empty"));
                }
                terms
                    .iter()
                    .enumerate()
                    .map(|(i, term)| LocatedTerm {
                        term: term.clone(),
                        name_field: format!("reward[{i}].name"),
                        prefix: format!("reward[{i}]"),
                    })
                    .collect()
            }
        };
        for t in &located {
            if t.term.name.trim().is_empty() {
                return Err(RewardError::invalid(&t.name_field, "reward name is empty"));
            }
            let w = t.term.weight();
            if !w.is_finite() || w.abs() > MAX_REWARD_WEIGHT {
                return Err(RewardError::invalid(
                    t.field("weight"),
                    format!(
                        "weight must be a number between -{MAX_REWARD_WEIGHT:e} and {MAX_REWARD_WEIGHT:e}, got {w}"
                    ),
                ));
            }
        }
        Ok(located)
    }

    /// The structural checks of [`RewardSpec::terms`] alone.
    pub fn validate(&self) -> RewardResult<()> {
        self.terms().map(|_| ())
    }
}
