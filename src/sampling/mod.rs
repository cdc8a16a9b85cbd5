//! Samplers (diffusers "schedulers"). They know nothing about networks: given the model output
//! at step `i` they predict x0 and take the transition x_t -> x_{t-1} with explicitly supplied
//! noise, so steering strategies can branch particles from any step.
//!
//! NOTE for implementers: this file fixes the interface; see the submodules for each sampler.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm;
pub mod euler;
pub mod flow;
pub mod lcm;
pub mod noise;
pub mod schedule;
pub mod vp;

pub use config::{PredictionType, SamplerKind, ScheduleConfig, ScheduleFamily, SchedulerConfig, TimestepSpacing};
pub use ddim::Ddim;
pub use ddpm::{Ddpm, DdpmVariance};
pub use dpm::DpmSolverPP2M;
pub use euler::Euler;
pub use flow::{FlowEuler, FlowSchedulerConfig, FlowSde, FlowSigmas};
pub use lcm::Lcm;
pub use noise::{NoiseSource, ReplayNoise, SeededNoise};
pub use schedule::NoiseSchedule;

use candle_core::{Result, Tensor};

/// One configured sampler for a fixed number of inference steps.
///
/// Step indices run `0..num_steps()`, 0 being the noisiest. All methods are pure (no internal
/// state), so one sampler can be shared by every particle of a request.
pub trait Sampler: Send + Sync {
    /// Number of denoising steps.
    fn num_steps(&self) -> usize;

    /// The (float) timestep fed to the network at step `i` (diffusers `scheduler.timesteps[i]`).
    fn timestep(&self, i: usize) -> f64;

    /// diffusers' `init_noise_sigma`: unit-variance initial noise is multiplied by this.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// diffusers' `scheduler.add_noise(x0, noise, timesteps[i])`: the forward process from a
    /// clean latent to the state step `i` starts from (an edit's starting point, inpainting's
    /// re-noised image).
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;

    /// diffusers' `scale_model_input` for step `i`.
    fn scale_model_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    /// The denoised prediction x0 at step `i` from the raw model output (per prediction type).
    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor>;

    /// Whether step `i` consumes fresh noise (false for deterministic steps, e.g. DDIM eta=0,
    /// Euler, or the last step of LCM/DDPM).
    fn step_needs_noise(&self, i: usize) -> bool;

    /// The transition x_t -> x_{t-1} given the predicted x0 and an explicit standard-normal
    /// `noise` tensor shaped like `x` (ignored when `step_needs_noise(i)` is false).
    ///
    /// `prev_x0` is the x̂0 each row had at step `i − 1` (`None` at a run's first step): what a
    /// multistep sampler (DPM-Solver++ 2M) extrapolates from. Strategies carry it with their
    /// rows, gathering it when they resample. Single-step samplers ignore it.
    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Whether `transition` reads `prev_x0`.
    fn is_multistep(&self) -> bool {
        false
    }

    /// Full step of a single-step sampler from the raw model output:
    /// `transition(x, predict_x0(x, out, i), None, i, noise)`. Multistep samplers refuse the
    /// steps that need history; loops use `predict_x0` and `transition` for them.
    fn step(&self, x: &Tensor, model_output: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let x0 = self.predict_x0(x, model_output, i)?;
        self.transition(x, &x0, None, i, noise)
    }

    /// Whether step `i` actually adds noise to the state. Usually `step_needs_noise`, but a
    /// sampler may draw noise it then scales by zero (Euler-ancestral's last step, kept for
    /// diffusers' noise-stream parity): copies of a particle do not diverge there.
    fn injects_noise(&self, i: usize) -> bool {
        self.step_needs_noise(i)
    }

    /// True if any step adds noise (particles can diverge).
    fn is_stochastic(&self) -> bool {
        (0..self.num_steps()).any(|i| self.injects_noise(i))
    }

    /// The σ schedule of σ-space samplers (Euler): one σ per step plus the final 0;
    /// `None` for ᾱ-space samplers.
    fn sigmas(&self) -> Option<Vec<f64>> {
        None
    }

    /// All timesteps, noisiest first (diffusers `scheduler.timesteps`).
    fn timesteps(&self) -> Vec<f64> {
        (0..self.num_steps()).map(|i| self.timestep(i)).collect()
    }
}

/// The last `num_steps − start` steps of a sampler: an edit at strength s runs the last
/// ⌊s·N⌋ steps of the N-step schedule (diffusers' `get_timesteps` for img2img and inpainting).
pub struct FromStep {
    inner: Box<dyn Sampler>,
    start: usize,
}

impl FromStep {
    pub fn new(inner: Box<dyn Sampler>, start: usize) -> Self {
        assert!(start < inner.num_steps(), "an edit runs at least one step");
        Self { inner, start }
    }
}

impl Sampler for FromStep {
    fn num_steps(&self) -> usize {
        self.inner.num_steps() - self.start
    }
    fn timestep(&self, i: usize) -> f64 {
        self.inner.timestep(self.start + i)
    }
    fn init_noise_sigma(&self) -> f64 {
        self.inner.init_noise_sigma()
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        self.inner.add_noise(x0, noise, self.start + i)
    }
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.inner.scale_model_input(x, self.start + i)
    }
    fn predict_x0(&self, x: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        self.inner.predict_x0(x, model_output, self.start + i)
    }
    fn step_needs_noise(&self, i: usize) -> bool {
        self.inner.step_needs_noise(self.start + i)
    }
    fn transition(
        &self,
        x: &Tensor,
        x0: &Tensor,
        prev_x0: Option<&Tensor>,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.inner.transition(x, x0, prev_x0, self.start + i, noise)
    }
    fn is_multistep(&self) -> bool {
        self.inner.is_multistep()
    }
    fn step(&self, x: &Tensor, model_output: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        self.inner.step(x, model_output, self.start + i, noise)
    }
    fn injects_noise(&self, i: usize) -> bool {
        self.inner.injects_noise(self.start + i)
    }
    fn sigmas(&self) -> Option<Vec<f64>> {
        self.inner.sigmas().map(|s| s[self.start..].to_vec())
    }
}

/// The first step an edit at `strength` runs of `steps` (diffusers: `steps − int(steps·strength)`);
/// `None` when that leaves no step.
pub fn edit_start(steps: usize, strength: f64) -> Option<usize> {
    let run = ((steps as f64 * strength) as usize).min(steps);
    (run > 0).then(|| steps - run)
}

/// The timestep spacing a sampler class uses when the config has no `timestep_spacing` key
/// (DDIM/DDPM: "leading", Euler/Euler-ancestral: "linspace"; LCM has its own schedule).
pub fn default_spacing(kind: SamplerKind) -> TimestepSpacing {
    match kind {
        SamplerKind::Ddim | SamplerKind::Ddpm | SamplerKind::Lcm => TimestepSpacing::Leading,
        SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::EulerKarras => TimestepSpacing::Linspace,
        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => TimestepSpacing::Linspace,
        // Flow samplers space sigmas, not betas; the value is never read for them.
        SamplerKind::FlowEuler | SamplerKind::FlowSde => TimestepSpacing::Linspace,
    }
}

/// The spacing `kind` uses with `cfg`.
pub fn effective_spacing(kind: SamplerKind, cfg: &SchedulerConfig) -> TimestepSpacing {
    cfg.timestep_spacing.unwrap_or_else(|| default_spacing(kind))
}

fn lcm_original_steps(cfg: &SchedulerConfig) -> usize {
    cfg.original_inference_steps.unwrap_or(50)
}

/// Check request parameters against a sampler and scheduler config. Errors name the field
/// (`steps`, `eta`, `scheduler`) and are meant for a 400 answer.
pub fn check_params(kind: SamplerKind, cfg: &SchedulerConfig, steps: usize, eta: f64) -> crate::error::Result<()> {
    use crate::error::TillerError;
    if kind.family() != ScheduleFamily::Vp {
        return Err(wrong_family(kind, ScheduleFamily::Vp));
    }
    let max = match kind {
        SamplerKind::Lcm => lcm_original_steps(cfg).min(cfg.num_train_timesteps),
        _ => cfg.num_train_timesteps,
    };
    if steps == 0 {
        return Err(TillerError::field("steps", "must be at least 1"));
    }
    if steps > max {
        let what = if kind == SamplerKind::Lcm { "LCM's original_inference_steps" } else { "num_train_timesteps" };
        return Err(TillerError::field("steps", format!("{steps} exceeds {what} ({max})")));
    }
    if !(0.0..=1.0).contains(&eta) {
        return Err(TillerError::field("eta", format!("must be in [0, 1], got {eta}")));
    }
    let unsupported = |what: String| Err(TillerError::field("scheduler", format!("{what} is not supported")));
    if matches!(kind, SamplerKind::Euler | SamplerKind::EulerKarras | SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras)
    {
        if cfg.use_exponential_sigmas || cfg.use_beta_sigmas {
            return unsupported("exponential/beta sigmas".into());
        }
        if let Some(t) = cfg.interpolation_type.as_deref().filter(|t| *t != "linear") {
            return unsupported(format!("interpolation_type `{t}`"));
        }
        if let Some(t) = cfg.final_sigmas_type.as_deref().filter(|t| *t != "zero") {
            return unsupported(format!("final_sigmas_type `{t}`"));
        }
        if let Some(t) = cfg.timestep_type.as_deref().filter(|t| *t != "discrete") {
            return unsupported(format!("timestep_type `{t}`"));
        }
    }
    if kind == SamplerKind::Ddpm {
        ddpm_variance(cfg).map_err(|m| TillerError::field("scheduler", m))?;
    }
    if matches!(kind, SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras) {
        if let Some(what) = cfg.dpm_unsupported() {
            return unsupported(what);
        }
    }
    Ok(())
}

fn ddpm_variance(cfg: &SchedulerConfig) -> std::result::Result<DdpmVariance, String> {
    match cfg.variance_type.as_deref().unwrap_or("fixed_small") {
        "fixed_small" | "fixed_small_log" => Ok(DdpmVariance::FixedSmall),
        "fixed_large" => Ok(DdpmVariance::FixedLarge),
        other => Err(format!("DDPM variance_type `{other}` is not supported")),
    }
}

fn x0_processing(kind: SamplerKind, cfg: &SchedulerConfig) -> vp::X0Processing {
    let clip_default = kind != SamplerKind::Lcm; // DDIM/DDPM default clip_sample=true, LCM false
    if cfg.thresholding {
        vp::X0Processing::Threshold {
            ratio: cfg.dynamic_thresholding_ratio.unwrap_or(0.995),
            max: cfg.sample_max_value.unwrap_or(1.0),
        }
    } else if cfg.clip_sample.unwrap_or(clip_default) {
        vp::X0Processing::Clip(cfg.clip_sample_range)
    } else {
        vp::X0Processing::None
    }
}

fn to_usize_timesteps(ts: Vec<i64>, num_train: usize) -> Result<Vec<usize>> {
    ts.into_iter()
        .map(|t| {
            if t < 0 || t as usize >= num_train {
                candle_core::bail!("timestep {t} outside [0, {num_train}) (check steps_offset and steps)")
            }
            Ok(t as usize)
        })
        .collect()
}

/// Build the sampler `kind` for `steps` inference steps on the betas of `cfg`, with the class
/// defaults of `kind` for keys the config lacks (as diffusers' `from_config` does).
pub fn build_sampler(kind: SamplerKind, cfg: &SchedulerConfig, steps: usize, eta: f64) -> Result<Box<dyn Sampler>> {
    check_params(kind, cfg, steps, eta).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let schedule =
        NoiseSchedule::from_config(cfg).map_err(|m| candle_core::Error::Msg(format!("scheduler config: {m}")))?;
    let n_train = cfg.num_train_timesteps;
    let spacing = effective_spacing(kind, cfg);
    let pred = cfg.prediction_type;
    Ok(match kind {
        SamplerKind::FlowEuler | SamplerKind::FlowSde => unreachable!("check_params refuses flow samplers here"),
        SamplerKind::Ddim => {
            let ts = schedule::integer_timesteps(spacing, n_train, steps, cfg.steps_offset);
            let ts = to_usize_timesteps(ts, n_train)?;
            let alpha_one = cfg.set_alpha_to_one.unwrap_or(true);
            Box::new(Ddim::new(&schedule, ts, alpha_one, eta, pred, x0_processing(kind, cfg)))
        }
        SamplerKind::Ddpm => {
            let ts = schedule::integer_timesteps(spacing, n_train, steps, cfg.steps_offset);
            let ts = to_usize_timesteps(ts, n_train)?;
            let var = ddpm_variance(cfg).map_err(candle_core::Error::Msg)?;
            Box::new(Ddpm::new(&schedule, ts, var, pred, x0_processing(kind, cfg)))
        }
        SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::EulerKarras => {
            let mut ts = schedule::float_timesteps(spacing, n_train, steps, cfg.steps_offset);
            if ts.len() != steps {
                candle_core::bail!("{spacing:?} spacing gives {} timesteps for {steps} steps", ts.len());
            }
            let mut full = schedule.sigmas_f32();
            if cfg.rescale_betas_zero_snr {
                // diffusers sets ᾱ[-1] = 2^-24 for Euler so σ_max stays finite
                let a = 2f32.powi(-24);
                *full.last_mut().unwrap() = ((1.0 - a) / a).sqrt();
            }
            let mut sigmas: Vec<f64> = ts.iter().map(|&t| schedule::np_interp_index(t, &full) as f32 as f64).collect();
            if kind == SamplerKind::EulerKarras || cfg.use_karras_sigmas {
                // Between the config's bounds or the step schedule's own extremes; timesteps back
                // from σ through the training table.
                let lo = cfg.sigma_min.unwrap_or(sigmas[steps - 1]);
                let hi = cfg.sigma_max.unwrap_or(sigmas[0]);
                sigmas = schedule::karras_sigmas(lo, hi, steps).into_iter().map(|s| s as f32 as f64).collect();
                ts = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &full) as f32 as f64).collect();
            }
            sigmas.push(0.0);
            let leading = spacing == TimestepSpacing::Leading;
            Box::new(Euler::new(ts, sigmas, leading, kind == SamplerKind::EulerAncestral, pred))
        }
        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => {
            let full = schedule.sigmas_f32();
            let (ts, mut sigmas): (Vec<f64>, Vec<f64>) = if kind == SamplerKind::DpmPp2mKarras || cfg.use_karras_sigmas
            {
                // Between the training table's extremes; timesteps rounded to integers
                // (except on the cosine schedule), as DPMSolverMultistepScheduler does.
                let k = schedule::karras_sigmas(full[0] as f64, full[n_train - 1] as f64, steps);
                let cosine = cfg.beta_schedule == "squaredcos_cap_v2";
                let ts = k
                    .iter()
                    .map(|&s| {
                        let t = schedule::sigma_to_t(s, &full);
                        if cosine {
                            t
                        } else {
                            t.round_ties_even()
                        }
                    })
                    .collect();
                (ts, k.into_iter().map(|s| s as f32 as f64).collect())
            } else {
                let ts = schedule::dpm_timesteps(spacing, n_train, steps, cfg.steps_offset);
                let ts = to_usize_timesteps(ts, n_train)?;
                let sig = ts.iter().map(|&t| full[t] as f64).collect();
                (ts.into_iter().map(|t| t as f64).collect(), sig)
            };
            if ts.iter().any(|&t| !(0.0..n_train as f64).contains(&t)) {
                candle_core::bail!("DPM-Solver timesteps {ts:?} leave [0, {n_train})");
            }
            sigmas.push(0.0);
            let lower_final = cfg.euler_at_final.unwrap_or(false)
                || (cfg.lower_order_final.unwrap_or(true) && steps < 15)
                || cfg.final_sigmas_type.as_deref().unwrap_or("zero") == "zero";
            let x0p = if cfg.thresholding { x0_processing(kind, cfg) } else { vp::X0Processing::None };
            Box::new(DpmSolverPP2M::new(ts, sigmas, lower_final, pred, x0p))
        }
        SamplerKind::Lcm => {
            let orig = lcm_original_steps(cfg);
            let ts = to_usize_timesteps(schedule::lcm_timesteps(n_train, orig, steps), n_train)?;
            let scaling = cfg.timestep_scaling.unwrap_or(10.0);
            Box::new(Lcm::new(&schedule, ts, scaling, pred, x0_processing(kind, cfg)))
        }
    })
}

/// The error for a sampler asked to run on a schedule of the other family.
fn wrong_family(kind: SamplerKind, schedule: ScheduleFamily) -> crate::error::TillerError {
    let (what, use_) = match schedule {
        ScheduleFamily::Vp => ("a variance-preserving (beta) schedule", "ddim, ddpm, euler, euler-ancestral or lcm"),
        ScheduleFamily::Flow => ("a flow-matching schedule", "flow-euler or flow-sde"),
    };
    crate::error::TillerError::field(
        "scheduler",
        format!("`{kind}` cannot sample this model: it has {what}; use {use_}"),
    )
}

/// Check request parameters for a flow sampler (steps, η); errors name the field.
pub fn check_flow_params(
    kind: SamplerKind,
    cfg: &FlowSchedulerConfig,
    steps: usize,
    eta: f64,
) -> crate::error::Result<()> {
    use crate::error::TillerError;
    if kind.family() != ScheduleFamily::Flow {
        return Err(wrong_family(kind, ScheduleFamily::Flow));
    }
    if steps == 0 {
        return Err(TillerError::field("steps", "must be at least 1"));
    }
    if steps > cfg.num_train_timesteps {
        return Err(TillerError::field(
            "steps",
            format!("{steps} exceeds num_train_timesteps ({})", cfg.num_train_timesteps),
        ));
    }
    if !(0.0..=1.0).contains(&eta) {
        return Err(TillerError::field("eta", format!("must be in [0, 1], got {eta}")));
    }
    Ok(())
}

/// Build flow sampler `kind` for `steps` steps: η is flow-sde's noise level (flow-euler
/// ignores it), `image_seq_len` the image's token count for resolution-dependent shifting.
pub fn build_flow_sampler(
    kind: SamplerKind,
    cfg: &FlowSchedulerConfig,
    sigmas: FlowSigmas,
    steps: usize,
    eta: f64,
    image_seq_len: usize,
) -> Result<Box<dyn Sampler>> {
    check_flow_params(kind, cfg, steps, eta).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    cfg.check().map_err(|m| candle_core::Error::Msg(format!("scheduler config: {m}")))?;
    let sig = cfg.sigmas(steps, sigmas, image_seq_len);
    if sig.iter().any(|s| !(s.is_finite() && *s > 0.0 && *s <= 1.0)) {
        candle_core::bail!("scheduler config gives sigmas outside (0, 1]: {sig:?}");
    }
    Ok(match kind {
        SamplerKind::FlowEuler => Box::new(FlowEuler::new(sig, cfg.num_train_timesteps, cfg.stochastic_sampling)),
        _ => Box::new(FlowSde::new(sig, cfg.num_train_timesteps, eta)),
    })
}

/// Build sampler `kind` on a model's schedule (the entry point for model code). `image_seq_len`
/// is the image's length in network tokens (flow models shift their sigmas by it).
pub fn build_for(
    kind: SamplerKind,
    schedule: &ScheduleConfig,
    steps: usize,
    eta: f64,
    image_seq_len: usize,
) -> Result<Box<dyn Sampler>> {
    match schedule {
        ScheduleConfig::Vp(cfg) => build_sampler(kind, cfg, steps, eta),
        ScheduleConfig::Flow { config, sigmas } => build_flow_sampler(kind, config, *sigmas, steps, eta, image_seq_len),
    }
}

/// [`check_params`] on a model's schedule.
pub fn check_for(kind: SamplerKind, schedule: &ScheduleConfig, steps: usize, eta: f64) -> crate::error::Result<()> {
    match schedule {
        ScheduleConfig::Vp(cfg) => check_params(kind, cfg, steps, eta),
        ScheduleConfig::Flow { config, .. } => check_flow_params(kind, config, steps, eta),
    }
}

/// The timesteps `kind` uses for `steps` steps with `cfg` (diffusers `scheduler.timesteps`).
pub fn timesteps_for(kind: SamplerKind, cfg: &SchedulerConfig, steps: usize) -> Result<Vec<f64>> {
    Ok(build_sampler(kind, cfg, steps, 0.0)?.timesteps())
}
