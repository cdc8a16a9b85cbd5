//! `scheduler/scheduler_config.json` as diffusers writes it, plus the sampler kinds tiller offers.

use serde::{Deserialize, Serialize};

use crate::models::PredictionType;

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
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub thresholding: bool,
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
