//! `scheduler/scheduler_config.json` as diffusers writes it, plus the sampler kinds tiller offers.

use serde::{Deserialize, Serialize};

use super::flow::{FlowSchedulerConfig, FlowSigmas};

/// What the network predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// The family of noise schedules a scheduler class samples: variance-preserving diffusion on
/// betas, or flow matching (sigmas on the straight path x = (1 − σ)·x0 + σ·ε). Each sampler
/// kind runs on one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleFamily {
    /// Variance-preserving diffusion on a beta schedule (DDPM, DDIM, Euler, LCM, PNDM, ...).
    Vp,
    /// Flow matching with a velocity-predicting network (FlowMatchEulerDiscreteScheduler).
    Flow,
}

/// A model's noise schedule, by family: what its samplers are built from.
// One per loaded model: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ScheduleConfig {
    /// Variance-preserving diffusion on betas, as diffusers' `scheduler_config.json` gives it.
    Vp(SchedulerConfig),
    /// A flow-matching schedule, and how the model's pipeline spaces its sigmas.
    Flow { config: FlowSchedulerConfig, sigmas: FlowSigmas },
}

/// The flow-matching scheduler classes tiller samples.
pub const FLOW_CLASSES: &[&str] = &["FlowMatchEulerDiscreteScheduler"];

impl ScheduleConfig {
    /// Check a parsed `scheduler_config.json` and wrap it in its family (an unknown or
    /// flow-matching class is an error naming the class; see [`ScheduleConfig::from_json`]).
    pub fn from_scheduler_config(cfg: SchedulerConfig) -> std::result::Result<Self, String> {
        match cfg.family()? {
            ScheduleFamily::Vp => Ok(Self::Vp(cfg)),
            ScheduleFamily::Flow => Err(format!("`{}` is a flow-matching class", cfg.class_name)),
        }
    }

    /// Parse a `scheduler_config.json` of either family, by its `_class_name`; `sigmas` is how
    /// the model's pipeline spaces flow sigmas (ignored for beta schedules).
    pub fn from_json(text: &str, sigmas: FlowSigmas) -> std::result::Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(&crate::util::json::from_python_json(text)).map_err(|e| e.to_string())?;
        let class = value.get("_class_name").and_then(|c| c.as_str()).unwrap_or_default();
        if FLOW_CLASSES.contains(&class) {
            let config = FlowSchedulerConfig::from_json(text).map_err(|e| e.to_string())?;
            config.check()?;
            return Ok(Self::Flow { config, sigmas });
        }
        let cfg = SchedulerConfig::from_json(text).map_err(|e| e.to_string())?;
        Self::from_scheduler_config(cfg)
    }

    pub fn family(&self) -> ScheduleFamily {
        match self {
            Self::Vp(_) => ScheduleFamily::Vp,
            Self::Flow { .. } => ScheduleFamily::Flow,
        }
    }

    /// The beta-schedule config, for variance-preserving models.
    pub fn vp(&self) -> Option<&SchedulerConfig> {
        match self {
            Self::Vp(c) => Some(c),
            Self::Flow { .. } => None,
        }
    }

    /// The diffusers class named in the config.
    pub fn class_name(&self) -> &str {
        match self {
            Self::Vp(c) => &c.class_name,
            Self::Flow { config, .. } => &config.class_name,
        }
    }

    /// What the network predicts, by diffusers' name (`epsilon`, `v_prediction`, `sample`,
    /// and `flow_prediction` for a velocity).
    pub fn prediction_name(&self) -> &'static str {
        match self {
            Self::Vp(c) => match c.prediction_type {
                PredictionType::Epsilon => "epsilon",
                PredictionType::VPrediction => "v_prediction",
                PredictionType::Sample => "sample",
            },
            Self::Flow { .. } => "flow_prediction",
        }
    }

    /// The sampler a request that names none gets.
    pub fn default_sampler(&self) -> SamplerKind {
        match self {
            Self::Vp(c) => c.default_sampler(),
            Self::Flow { .. } => SamplerKind::FlowEuler,
        }
    }
}

/// diffusers scheduler classes on a beta schedule that tiller does not implement step for
/// step: a model shipping one of them is sampled with DDIM on the same betas (the usual
/// substitution; the betas, not the solver, define the model).
const VP_CLASSES_SAMPLED_WITH_DDIM: &[&str] = &[
    "PNDMScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "TCDScheduler",
];

/// The sampler a request asks for. Defaults come from the model's scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum SamplerKind {
    Ddim,
    Ddpm,
    Euler,
    EulerAncestral,
    Lcm,
    /// Euler with Karras et al.'s σ schedule (A1111's "Euler Karras").
    EulerKarras,
    /// DPM-Solver++ 2M (diffusers' DPMSolverMultistepScheduler), σ as the config says.
    #[serde(rename = "dpmpp-2m")]
    #[value(name = "dpmpp-2m")]
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras σ (A1111's "DPM++ 2M Karras").
    #[serde(rename = "dpmpp-2m-karras")]
    #[value(name = "dpmpp-2m-karras")]
    DpmPp2mKarras,
    /// Flow matching: diffusers' FlowMatchEulerDiscreteScheduler.
    FlowEuler,
    /// Flow matching with noise (η): the DDIM-η step on the flow path.
    FlowSde,
}

impl SamplerKind {
    /// The name requests use (`euler-ancestral`).
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler-ancestral",
            SamplerKind::Lcm => "lcm",
            SamplerKind::EulerKarras => "euler-karras",
            SamplerKind::DpmPp2m => "dpmpp-2m",
            SamplerKind::DpmPp2mKarras => "dpmpp-2m-karras",
            SamplerKind::FlowEuler => "flow-euler",
            SamplerKind::FlowSde => "flow-sde",
        }
    }

    /// The schedule family the sampler runs on.
    pub fn family(self) -> ScheduleFamily {
        match self {
            SamplerKind::FlowEuler | SamplerKind::FlowSde => ScheduleFamily::Flow,
            _ => ScheduleFamily::Vp,
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// Fields of a diffusers scheduler config. Missing keys take the defaults of the class named
/// in `_class_name` (see `SchedulerConfig::from_json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    pub prediction_type: PredictionType,
    /// None when the key is absent: the sampler class default applies.
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    pub steps_offset: usize,
    /// None when absent (DDIM's class default is true; LCM's is true).
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub original_inference_steps: Option<usize>,
    #[serde(default)]
    pub timestep_scaling: Option<f64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub rescale_betas_zero_snr: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_karras_sigmas: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub thresholding: bool,
    /// Dynamic thresholding percentile (diffusers default 0.995).
    #[serde(default)]
    pub dynamic_thresholding_ratio: Option<f64>,
    /// Upper bound of the dynamic threshold (diffusers default 1.0).
    #[serde(default)]
    pub sample_max_value: Option<f64>,
    /// DDPM variance type; None = "fixed_small" (the class default).
    #[serde(default)]
    pub variance_type: Option<String>,
    /// Euler sigma interpolation; None = "linear". Only "linear" is supported.
    #[serde(default)]
    pub interpolation_type: Option<String>,
    /// Euler final sigma; None = "zero". Only "zero" is supported.
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// Euler timestep type; None = "discrete". Only "discrete" is supported.
    #[serde(default)]
    pub timestep_type: Option<String>,
    /// Karras σ bounds (Euler); None = the schedule's own extremes.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    /// DPM-Solver: None = "dpmsolver++", the only one supported.
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// DPM-Solver order; None = 2, the only one supported.
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// DPM-Solver's second-order rule; None = "midpoint", the only one supported.
    #[serde(default)]
    pub solver_type: Option<String>,
    /// DPM-Solver: first-order last step when fewer than 15 steps; None = true.
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: first-order last step always; None = false.
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver's λ clipping; only the default (none) is supported.
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_lu_lambdas: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_exponential_sigmas: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub use_beta_sigmas: bool,
}

/// diffusers configs sometimes write `null` for boolean options.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Default for SchedulerConfig {
    /// The defaults of diffusers' DDIM/DDPM/Euler classes (linear betas 1e-4 → 0.02).
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty scheduler config")
    }
}

impl SchedulerConfig {
    /// Parse `scheduler_config.json` (as Python writes it: a bare `-Infinity` reads as the
    /// default). Keys the file lacks take the defaults of its `_class_name` (the beta defaults
    /// differ for `LCMScheduler`: scaled_linear 0.00085 → 0.012).
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        let value: serde_json::Value = serde_json::from_str(&crate::util::json::from_python_json(text))?;
        let mut cfg: SchedulerConfig = serde_json::from_value(value.clone())?;
        if cfg.class_name == "LCMScheduler" {
            let has = |k: &str| value.get(k).is_some_and(|v| !v.is_null());
            if !has("beta_start") {
                cfg.beta_start = 0.00085;
            }
            if !has("beta_end") {
                cfg.beta_end = 0.012;
            }
            if !has("beta_schedule") {
                cfg.beta_schedule = "scaled_linear".into();
            }
        }
        Ok(cfg)
    }

    /// Read and parse a `scheduler_config.json` file.
    pub fn from_file(path: &std::path::Path) -> crate::error::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::error::TillerError::file(path, format!("cannot read scheduler config: {e}")))?;
        Self::from_json(&text)
            .map_err(|e| crate::error::TillerError::file(path, format!("malformed scheduler config: {e}")))
    }

    /// The scheduler config Stable Diffusion 1.x ships with (PNDM on scaled_linear betas,
    /// `steps_offset` 1, `set_alpha_to_one` false, no `timestep_spacing` key).
    pub fn stable_diffusion() -> Self {
        SchedulerConfig {
            class_name: "PNDMScheduler".into(),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Default::default()
        }
    }

    /// The schedule family of the config's `_class_name`, or an error naming the class when tiller
    /// cannot sample it (flow-matching and unknown classes), so a model never silently falls back
    /// to a sampler it was not trained for. An empty class name (configs written by hand) is VP.
    pub fn family(&self) -> std::result::Result<ScheduleFamily, String> {
        let c = self.class_name.as_str();
        if c.is_empty() || Self::kind_for_class(c).is_some() || VP_CLASSES_SAMPLED_WITH_DDIM.contains(&c) {
            return Ok(ScheduleFamily::Vp);
        }
        if FLOW_CLASSES.contains(&c) {
            return Ok(ScheduleFamily::Flow);
        }
        if c.starts_with("FlowMatch") {
            return Err(format!(
                "flow-matching scheduler class `{c}` is not supported; tiller samples {}",
                FLOW_CLASSES.join(", ")
            ));
        }
        Err(format!(
            "unknown scheduler class `{c}`; tiller samples DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, \
             EulerAncestralDiscreteScheduler, LCMScheduler and {}, and samples {} with DDIM on the same betas",
            FLOW_CLASSES.join(", "),
            VP_CLASSES_SAMPLED_WITH_DDIM.join(", ")
        ))
    }

    /// The sampler a model with this config uses when a request names none: the class's own
    /// sampler, or DDIM for the beta-schedule classes (and DPM-Solver variants) tiller does not
    /// implement.
    pub fn default_sampler(&self) -> SamplerKind {
        match Self::kind_for_class(&self.class_name) {
            Some(SamplerKind::DpmPp2m) if self.dpm_unsupported().is_some() => SamplerKind::Ddim,
            Some(k) => k,
            None => SamplerKind::Ddim,
        }
    }

    /// Why this config's DPM-Solver variant is not DPM-Solver++ 2M (None when it is).
    pub fn dpm_unsupported(&self) -> Option<String> {
        if let Some(a) = self.algorithm_type.as_deref().filter(|a| *a != "dpmsolver++") {
            return Some(format!("DPM-Solver algorithm_type `{a}` (only dpmsolver++)"));
        }
        if let Some(o) = self.solver_order.filter(|o| *o != 2) {
            return Some(format!("DPM-Solver solver_order {o} (only 2)"));
        }
        if let Some(t) = self.solver_type.as_deref().filter(|t| *t != "midpoint") {
            return Some(format!("DPM-Solver solver_type `{t}` (only midpoint)"));
        }
        if self.use_lu_lambdas {
            return Some("use_lu_lambdas".into());
        }
        if self.lambda_min_clipped.is_some_and(|l| l.is_finite()) {
            return Some("lambda_min_clipped".into());
        }
        if matches!(self.variance_type.as_deref(), Some("learned" | "learned_range")) {
            return Some("a learned variance".into());
        }
        None
    }

    /// The sampler kind a diffusers class name maps to (None for classes tiller does not implement).
    pub fn kind_for_class(class_name: &str) -> Option<SamplerKind> {
        match class_name {
            "DDIMScheduler" => Some(SamplerKind::Ddim),
            "DDPMScheduler" => Some(SamplerKind::Ddpm),
            "EulerDiscreteScheduler" => Some(SamplerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SamplerKind::EulerAncestral),
            "LCMScheduler" => Some(SamplerKind::Lcm),
            "DPMSolverMultistepScheduler" => Some(SamplerKind::DpmPp2m),
            _ => None,
        }
    }
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> PredictionType {
    PredictionType::Epsilon
}
fn default_clip_range() -> f64 {
    1.0
}
