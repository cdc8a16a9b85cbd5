//! A/B experiments of generation strategies: arms (each a set of request fields that override the
//! user's), assignment of requests to arms (sticky by the OpenAI `user` field, or random), a
//! record of every image generated under an experiment (in [`store`]), feedback, and the
//! results with honest statistics ([`stats`]).

pub mod offline;
pub mod stats;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::FieldError;
use stats::{Difference, Estimate, Moments};
use store::{Feedback, Record};

/// How requests are split between arms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// By a stable hash of the request's `user` (and the experiment's name): the same user gets
    /// the same arm on every request and every replica, as long as the weights stay.
    #[default]
    Sticky,
    /// Independently for every request.
    Random,
}

/// `running` experiments take requests; `paused` and `stopped` refuse them; `archived` ones are
/// deleted from the list but keep their records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Running,
    Paused,
    Stopped,
    Archived,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Archived => "archived",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }
}

/// One arm: a name, its share of the traffic, and the generation fields it sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    /// Arm name (letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// Relative share of the traffic, ≥ 0; default 1.
    #[serde(default = "one")]
    pub weight: f64,
    /// Generation fields this arm sets, overriding the request's (model, steering, reward,
    /// scheduler, steps, guidance_scale, eta, adapters, ...); validated like a request.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub request: Map<String, Value>,
}

fn one() -> f64 {
    1.0
}

/// `POST /v1/experiments` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "fk-vs-ddim", "arms": [
    {"name": "ddim", "request": {"steps": 20}},
    {"name": "fk", "request": {"steps": 20, "steering": {"method": "fk", "particles": 4}, "reward": "shapes_clip"}}],
    "metrics": ["shapes_clip"], "assignment": "sticky"}))]
pub struct ExperimentSpec {
    /// Experiment name (letters, digits, `_`, `-`, `.`; at most 128), the `experiment` field of
    /// requests.
    pub name: String,
    /// Two to eight arms; the first is the control the others are compared with.
    pub arms: Vec<ArmSpec>,
    /// Rewards evaluated on every final image of the experiment (names from `GET /v1/rewards`).
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub assignment: Assignment,
}

/// Fields an arm may not set: they belong to the user's request.
pub const USER_FIELDS: &[&str] =
    &["prompt", "user", "experiment", "arm", "stream", "partial_images", "stream_progress"];

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

impl ExperimentSpec {
    /// The checks that need no model: names, arm count, weights, fields an arm may not set.
    pub fn check(&self) -> Result<(), FieldError> {
        if !valid_name(&self.name) {
            return Err(FieldError::invalid("name", "`name` must be 1 to 128 letters, digits, `_`, `-` or `.`"));
        }
        if !(2..=8).contains(&self.arms.len()) {
            return Err(FieldError::invalid("arms", format!("an experiment has 2 to 8 arms, got {}", self.arms.len())));
        }
        for (i, arm) in self.arms.iter().enumerate() {
            if !valid_name(&arm.name) {
                return Err(FieldError::invalid(
                    format!("arms[{i}].name"),
                    "arm names are 1 to 128 letters, digits, `_`, `-` or `.`",
                ));
            }
            if self.arms[..i].iter().any(|a| a.name == arm.name) {
                return Err(FieldError::invalid(
                    format!("arms[{i}].name"),
                    format!("arm `{}` is named twice", arm.name),
                ));
            }
            check_weight(&format!("arms[{i}].weight"), arm.weight)?;
            if let Some(k) = arm.request.keys().find(|k| USER_FIELDS.contains(&k.as_str())) {
                return Err(FieldError::invalid(
                    format!("arms[{i}].request.{k}"),
                    format!("an arm cannot set `{k}`: it belongs to the user's request"),
                ));
            }
        }
        check_total(&self.arms)?;
        let mut seen = Vec::new();
        for (i, m) in self.metrics.iter().enumerate() {
            if seen.contains(&m) {
                return Err(FieldError::invalid(format!("metrics[{i}]"), format!("metric `{m}` is listed twice")));
            }
            seen.push(m);
        }
        Ok(())
    }

    /// The arm of a request: the forced one (`arm`), else by the assignment rule.
    pub fn assign(&self, user: Option<&str>, forced: Option<&str>) -> Result<usize, FieldError> {
        if let Some(name) = forced {
            return self.arms.iter().position(|a| a.name == name).ok_or_else(|| {
                let names: Vec<&str> = self.arms.iter().map(|a| a.name.as_str()).collect();
                FieldError::invalid(
                    "arm",
                    format!("experiment `{}` has no arm `{name}` (arms: {})", self.name, names.join(", ")),
                )
            });
        }
        let u = match (self.assignment, user) {
            (Assignment::Sticky, Some(user)) => unit_hash(&format!("{}\u{0}{user}", self.name)),
            (Assignment::Sticky, None) => {
                return Err(FieldError::invalid(
                    "user",
                    format!("experiment `{}` assigns arms by `user`: send a `user` (or force an `arm`)", self.name),
                ))
            }
            (Assignment::Random, _) => rand::random::<f64>(),
        };
        Ok(pick(&self.arms, u))
    }
}

fn check_weight(field: &str, w: f64) -> Result<(), FieldError> {
    if !(w.is_finite() && w >= 0.0) {
        return Err(FieldError::invalid(field, format!("weights are finite and ≥ 0, got {w}")));
    }
    Ok(())
}

fn check_total(arms: &[ArmSpec]) -> Result<(), FieldError> {
    if arms.iter().map(|a| a.weight).sum::<f64>() <= 0.0 {
        return Err(FieldError::invalid("arms", "at least one arm needs a positive weight"));
    }
    Ok(())
}

/// The arm at `u` ∈ [0, 1) of the weights' cumulative distribution.
fn pick(arms: &[ArmSpec], u: f64) -> usize {
    let total: f64 = arms.iter().map(|a| a.weight).sum();
    let mut acc = 0.0;
    for (i, a) in arms.iter().enumerate() {
        acc += a.weight / total;
        if u < acc && a.weight > 0.0 {
            return i;
        }
    }
    arms.iter().rposition(|a| a.weight > 0.0).unwrap_or(0)
}

/// FNV-1a, 64 bits: the same on every platform and replica.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A stable value in [0, 1) for a string.
fn unit_hash(s: &str) -> f64 {
    // FNV's low bits mix poorly; a final avalanche (splitmix64's) spreads them.
    let mut z = fnv1a(s);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// What is stored about a user: a hash, not the name.
pub fn user_hash(user: &str) -> String {
    format!("{:016x}", fnv1a(&format!("tiller-user\u{0}{user}")))
}

/// `PATCH /v1/experiments/{name}` body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentPatch {
    /// `running`, `paused` or `stopped`.
    #[serde(default)]
    pub status: Option<Status>,
    /// New weights by arm name (arms not named keep theirs). Sticky users may move when the
    /// weights change.
    #[serde(default)]
    pub weights: Option<BTreeMap<String, f64>>,
}

impl ExperimentPatch {
    pub fn apply(&self, spec: &mut ExperimentSpec, status: &mut Status) -> Result<(), FieldError> {
        if let Some(s) = self.status {
            if s == Status::Archived {
                return Err(FieldError::invalid(
                    "status",
                    "archive with DELETE; PATCH sets running, paused or stopped",
                ));
            }
            *status = s;
        }
        if let Some(w) = &self.weights {
            for (name, &weight) in w {
                let arm = spec.arms.iter_mut().find(|a| &a.name == name).ok_or_else(|| {
                    FieldError::invalid(format!("weights.{name}"), format!("no arm `{name}` in `{}`", spec.name))
                })?;
                check_weight(&format!("weights.{name}"), weight)?;
                arm.weight = weight;
            }
            check_total(&spec.arms)?;
        }
        Ok(())
    }
}

/// An experiment as the API returns it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Experiment {
    /// Always `experiment`.
    pub object: String,
    #[serde(flatten)]
    pub spec: ExperimentSpec,
    pub status: Status,
    /// Unix time, milliseconds.
    pub created_at: i64,
}

/// `GET /v1/experiments` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExperimentList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Experiment>,
}

/// One metric of one arm.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MetricResult {
    pub mean: f64,
    /// 95 % interval of the mean; `null` below two images.
    pub ci: Option<[f64; 2]>,
    /// Against the control arm (absent for the control itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_control: Option<Difference>,
}

/// Users' feedback on an arm's images.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedbackResult {
    /// Scores received.
    pub scores: usize,
    /// Mean score with its interval; `null` without scores.
    pub score: Option<Estimate>,
    /// Pairwise preferences this arm's images took part in (against another arm's).
    pub comparisons: usize,
    /// Share of those this arm won.
    pub win_rate: Option<f64>,
    /// Bradley–Terry strength from every preference between arms (mean 1 over the arms).
    pub strength: f64,
}

/// What an arm's images cost.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CostResult {
    /// Mean denoiser evaluations per image.
    pub nfe: f64,
    /// Mean reward evaluations per image.
    pub reward_evals: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ArmResult {
    pub name: String,
    /// Images recorded.
    pub n: usize,
    pub metrics: BTreeMap<String, MetricResult>,
    pub feedback: FeedbackResult,
    pub cost: CostResult,
}

/// `GET /v1/experiments/{name}/results` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExperimentResults {
    /// Always `experiment.results`.
    pub object: String,
    pub experiment: String,
    pub status: Status,
    /// Images recorded over all arms.
    pub n: usize,
    /// Per arm, the control (first arm) first.
    pub arms: Vec<ArmResult>,
    /// How to read the intervals.
    pub note: String,
}

/// The results of `spec` from its records and feedback.
pub fn results(spec: &ExperimentSpec, status: Status, records: &[Record], feedback: &[Feedback]) -> ExperimentResults {
    let arm_of: BTreeMap<&str, usize> = spec.arms.iter().enumerate().map(|(i, a)| (a.name.as_str(), i)).collect();
    let record_arm: BTreeMap<&str, usize> =
        records.iter().filter_map(|r| arm_of.get(r.arm.as_str()).map(|&i| (r.image_id.as_str(), i))).collect();
    let k = spec.arms.len();
    let by_arm: Vec<Vec<&Record>> =
        (0..k).map(|i| records.iter().filter(|r| arm_of.get(r.arm.as_str()) == Some(&i)).collect()).collect();
    let moments =
        |rs: &[&Record], m: &str| Moments::of(&rs.iter().filter_map(|r| r.metrics.get(m).copied()).collect::<Vec<_>>());
    let mut wins = vec![vec![0.0; k]; k];
    let mut scores: Vec<Vec<f64>> = vec![Vec::new(); k];
    for f in feedback {
        let Some(&a) = record_arm.get(f.image_id.as_str()) else { continue };
        if let Some(s) = f.score {
            scores[a].push(s);
        }
        if let Some(&b) = f.preferred_over.as_deref().and_then(|o| record_arm.get(o)) {
            if a != b {
                wins[a][b] += 1.0;
            }
        }
    }
    let strength = stats::bradley_terry(&wins);
    let arms = (0..k)
        .map(|i| {
            let rs = &by_arm[i];
            let metrics = spec
                .metrics
                .iter()
                .map(|m| {
                    let own = moments(rs, m);
                    let est = stats::mean_ci(&own);
                    let vs_control = (i > 0).then(|| stats::difference(&own, &moments(&by_arm[0], m)));
                    (m.clone(), MetricResult { mean: est.mean, ci: est.ci, vs_control })
                })
                .collect();
            let won: f64 = wins[i].iter().sum();
            let comparisons: f64 = won + (0..k).map(|j| wins[j][i]).sum::<f64>();
            let latencies: Vec<f64> = rs.iter().map(|r| r.latency_ms).collect();
            let mean = |f: &dyn Fn(&Record) -> f64| {
                if rs.is_empty() {
                    0.0
                } else {
                    rs.iter().map(|r| f(r)).sum::<f64>() / rs.len() as f64
                }
            };
            ArmResult {
                name: spec.arms[i].name.clone(),
                n: rs.len(),
                metrics,
                feedback: FeedbackResult {
                    scores: scores[i].len(),
                    score: (!scores[i].is_empty()).then(|| stats::mean_ci(&Moments::of(&scores[i]))),
                    comparisons: comparisons as usize,
                    win_rate: (comparisons > 0.0).then(|| won / comparisons),
                    strength: strength[i],
                },
                cost: CostResult {
                    nfe: mean(&|r| r.denoiser_evals as f64),
                    reward_evals: mean(&|r| r.reward_evals as f64),
                    latency_p50_ms: stats::quantile(&latencies, 0.5),
                    latency_p95_ms: stats::quantile(&latencies, 0.95),
                },
            }
        })
        .collect();
    ExperimentResults {
        object: "experiment.results".into(),
        experiment: spec.name.clone(),
        status,
        n: records.len(),
        arms,
        note: "`ci` is a fixed-sample 95 % interval (read it once, at a sample size chosen in advance); \
               `always_valid_ci` and `always_valid_p` may be read after every request without inflating \
               false positives"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(weights: &[f64], assignment: Assignment) -> ExperimentSpec {
        ExperimentSpec {
            name: "e".into(),
            arms: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| ArmSpec { name: format!("a{i}"), weight: w, request: Map::new() })
                .collect(),
            metrics: vec![],
            assignment,
        }
    }

    #[test]
    fn sticky_assignment_is_stable_and_follows_the_weights() {
        let s = spec(&[1.0, 3.0], Assignment::Sticky);
        let users: Vec<String> = (0..4000).map(|i| format!("user-{i}")).collect();
        let arms: Vec<usize> = users.iter().map(|u| s.assign(Some(u), None).unwrap()).collect();
        for (u, &a) in users.iter().zip(&arms).take(200) {
            assert_eq!(s.assign(Some(u), None).unwrap(), a, "same user, same arm");
        }
        let share = arms.iter().filter(|&&a| a == 1).count() as f64 / arms.len() as f64;
        assert!((share - 0.75).abs() < 0.03, "share of the 3:1 arm {share}");
        // Forcing, a zero-weight arm, and a sticky experiment without a user.
        assert_eq!(s.assign(Some("x"), Some("a0")).unwrap(), 0);
        assert_eq!(s.assign(Some("x"), Some("nope")).unwrap_err().field, "arm");
        assert_eq!(s.assign(None, None).unwrap_err().field, "user");
        let z = spec(&[0.0, 1.0], Assignment::Random);
        assert!((0..200).all(|_| z.assign(None, None).unwrap() == 1));
    }

    #[test]
    fn specs_are_checked() {
        let mut s = spec(&[1.0, 1.0], Assignment::Sticky);
        assert!(s.check().is_ok());
        s.arms[1].request.insert("prompt".into(), Value::String("x".into()));
        assert_eq!(s.check().unwrap_err().field, "arms[1].request.prompt");
        assert_eq!(spec(&[1.0], Assignment::Sticky).check().unwrap_err().field, "arms");
        assert_eq!(spec(&[0.0, 0.0], Assignment::Sticky).check().unwrap_err().field, "arms");
        assert_eq!(spec(&[1.0, f64::NAN], Assignment::Sticky).check().unwrap_err().field, "arms[1].weight");
        let mut p = spec(&[1.0, 1.0], Assignment::Sticky);
        let mut st = Status::Running;
        ExperimentPatch { status: Some(Status::Paused), weights: Some([("a1".to_string(), 0.0)].into()) }
            .apply(&mut p, &mut st)
            .unwrap();
        assert_eq!((st, p.arms[1].weight), (Status::Paused, 0.0));
        let e =
            ExperimentPatch { status: None, weights: Some([("zz".to_string(), 1.0)].into()) }.apply(&mut p, &mut st);
        assert_eq!(e.unwrap_err().field, "weights.zz");
    }

    #[test]
    fn results_count_every_record_and_compare_with_the_control() {
        let s = ExperimentSpec { metrics: vec!["m".into()], ..spec(&[1.0, 1.0], Assignment::Random) };
        let rec = |id: usize, arm: &str, v: f64| Record {
            image_id: format!("i{id}"),
            experiment: "e".into(),
            arm: arm.into(),
            user_hash: None,
            prompt: "p".into(),
            seed: id as u64,
            metrics: [("m".to_string(), v)].into_iter().collect(),
            denoiser_evals: if arm == "a0" { 10 } else { 40 },
            reward_evals: 0,
            latency_ms: id as f64,
            created_at: id as i64,
        };
        let records: Vec<Record> = (0..40)
            .map(|i| rec(i, if i % 2 == 0 { "a0" } else { "a1" }, (i % 2) as f64 + (i % 5) as f64 * 0.01))
            .collect();
        let feedback = vec![
            Feedback { image_id: "i1".into(), score: None, preferred_over: Some("i0".into()) },
            Feedback { image_id: "i3".into(), score: None, preferred_over: Some("i2".into()) },
            Feedback { image_id: "i2".into(), score: None, preferred_over: Some("i5".into()) },
            Feedback { image_id: "i0".into(), score: Some(3.0), preferred_over: None },
        ];
        let r = results(&s, Status::Running, &records, &feedback);
        assert_eq!(r.n, 40);
        assert_eq!((r.arms[0].n, r.arms[1].n), (20, 20));
        let d = r.arms[1].metrics["m"].vs_control.as_ref().unwrap();
        assert!((d.diff - 1.0).abs() < 0.05 && d.always_valid_ci.unwrap()[0] > 0.0, "{d:?}");
        assert!(r.arms[0].metrics["m"].vs_control.is_none());
        assert_eq!((r.arms[0].cost.nfe, r.arms[1].cost.nfe), (10.0, 40.0));
        assert_eq!(r.arms[1].feedback.comparisons, 3);
        assert!((r.arms[1].feedback.win_rate.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!(r.arms[1].feedback.strength > r.arms[0].feedback.strength);
        assert_eq!(r.arms[0].feedback.scores, 1);
    }
}
