//! Noise schedules (betas, ᾱ) and timestep spacings, computed the way diffusers 0.42 computes them:
//! betas in float32 (torch's `linspace` formula), ᾱ = cumprod accumulated in float64 and stored
//! as float32 (torch's CPU cumprod), timesteps with numpy's `linspace`/`arange`/`round` semantics
//! (round half to even).

use super::config::{SchedulerConfig, TimestepSpacing};

/// Error text for an invalid schedule; `build_sampler` turns it into a candle error.
pub type ScheduleResult<T> = std::result::Result<T, String>;

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU: float32 step, the first half counts
/// up from `start`, the second half down from `end`, each value one fused multiply-add (torch's
/// kernels are built with FMA; this matches its output bit for bit).
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: accumulates in f64, stores f32.
pub fn cumprod_f32(v: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    v.iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ("squaredcos_cap_v2") transform, in f64 then
/// cast to f32 as `torch.tensor(betas, dtype=float32)`.
pub fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1) in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut s: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let s0 = s[0];
    let st = *s.last().unwrap();
    let scale = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v = (*v - st) * scale;
    }
    let ab: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for i in 1..ab.len() {
        out.push(1.0 - ab[i] / ab[i - 1]);
    }
    out
}

/// Betas and ᾱ of a scheduler config.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn from_config(cfg: &SchedulerConfig) -> ScheduleResult<Self> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err(format!("num_train_timesteps must be at least 2, got {n}"));
        }
        let mut betas = if let Some(tb) = &cfg.trained_betas {
            if tb.len() != n {
                return Err(format!("trained_betas has {} values but num_train_timesteps is {n}", tb.len()));
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match cfg.beta_schedule.as_str() {
                "linear" => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
                "scaled_linear" => torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => cosine_betas(n),
                other => return Err(format!("beta_schedule `{other}` is not supported")),
            }
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        if betas.iter().any(|b| !(0.0..=1.0).contains(b) || b.is_nan()) {
            return Err("betas must lie in [0, 1]".into());
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        Ok(Self { betas, alphas_cumprod })
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// ᾱ at an integer timestep as f64.
    pub fn abar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t] as f64
    }

    /// Karras/Euler sigmas `sqrt((1 − ᾱ)/ᾱ)` per training timestep, in float32 like diffusers.
    pub fn sigmas_f32(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
    }
}

/// numpy round (half to even).
fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` (endpoint true) in f64.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop − start)/step)`, values
/// `start + i·((start + step) − start)`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Integer timesteps of DDIM/DDPM `set_timesteps` (as i64, possibly ≥ num_train for odd configs).
pub fn integer_timesteps(spacing: TimestepSpacing, num_train: usize, steps: usize, steps_offset: usize) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (num_train - 1) as f64, steps).into_iter().rev().map(|t| np_round(t) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (num_train / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + steps_offset as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) as i64 - 1).collect()
        }
    }
}

/// Float timesteps of Euler / Euler-ancestral `set_timesteps` (float32 values, as f64).
pub fn float_timesteps(spacing: TimestepSpacing, num_train: usize, steps: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (num_train - 1) as f64, steps).into_iter().rev().map(|t| t as f32 as f64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (num_train / steps) as f64;
            (0..steps).rev().map(|i| (i as f64 * ratio) as f32 as f64 + steps_offset as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio).into_iter().map(|t| (np_round(t) as f32 - 1.0) as f64).collect()
        }
    }
}

/// Integer timesteps of `DPMSolverMultistepScheduler.set_timesteps`: linspace and leading space
/// `steps + 1` points and drop the last (0); trailing as for DDIM.
pub fn dpm_timesteps(spacing: TimestepSpacing, num_train: usize, steps: usize, steps_offset: usize) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train / (steps + 1)) as i64;
            (1..=steps as i64).rev().map(|i| i * ratio + steps_offset as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) as i64 - 1).collect()
        }
    }
}

/// `np.interp(x, arange(len(fp)), fp)` (clamped at both ends).
pub fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    if x == j as f64 {
        return lo;
    }
    (hi - lo) * (x - j as f64) + lo
}

/// Karras et al. (2022) σ schedule: `steps` values from σ_max to σ_min evenly spaced in σ^(1/ρ),
/// ρ = 7, in f64 (diffusers' `_convert_to_karras`).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, steps).into_iter().map(|r| (hi + r * (lo - hi)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose σ is `sigma`, interpolating
/// linearly in log σ over the (ascending, float32) training σ table.
pub fn sigma_to_t(sigma: f64, sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let logs: Vec<f64> = sigmas.iter().map(|s| s.ln() as f64).collect();
    let below = logs.iter().take_while(|&&l| log_sigma - l >= 0.0).count();
    let low = below.saturating_sub(1).min(logs.len() - 2);
    let w = ((logs[low] - log_sigma) / (logs[low] - logs[low + 1])).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// LCM timesteps: `[k·j − 1 for j in 1..=original]` reversed, taken at
/// `floor(linspace(0, original, steps, endpoint=False))`.
pub fn lcm_timesteps(num_train: usize, original_steps: usize, steps: usize) -> Vec<i64> {
    let k = (num_train / original_steps) as i64;
    let origin: Vec<i64> = (1..=original_steps as i64).rev().map(|j| j * k - 1).collect();
    let step = origin.len() as f64 / steps as f64;
    (0..steps).map(|i| origin[(i as f64 * step).floor() as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> SchedulerConfig {
        SchedulerConfig::stable_diffusion()
    }

    #[test]
    fn scaled_linear_abar_reference_values() {
        let s = NoiseSchedule::from_config(&sd()).unwrap();
        for (t, want) in [(999, 0.00466), (749, 0.05662), (499, 0.27767), (249, 0.67543), (0, 0.99915)] {
            let got = s.abar(t);
            assert!((got - want).abs() < 5e-6, "abar[{t}] = {got}, want {want}");
        }
        // diffusers' exact float32 values
        assert_eq!(s.alphas_cumprod[999], 0.004_660_095_f32);
        assert_eq!(s.alphas_cumprod[0], 0.99915_f32);
        let sig = s.sigmas_f32();
        assert!((sig[999] as f64 - 14.6146).abs() < 1e-3, "{}", sig[999]);
        assert!((sig[749] as f64 - 4.0817).abs() < 1e-3);
        assert!((sig[499] as f64 - 1.6129).abs() < 1e-3);
        assert!((sig[249] as f64 - 0.6932).abs() < 1e-3);
    }

    #[test]
    fn cosine_schedule_uses_float_division() {
        let mut c = sd();
        c.beta_schedule = "squaredcos_cap_v2".into();
        let s = NoiseSchedule::from_config(&c).unwrap();
        // betas increase smoothly from ~4e-5 and are capped at 0.999 at the end.
        assert!(s.betas[0] > 1e-5 && s.betas[0] < 1e-4, "{}", s.betas[0]);
        assert_eq!(s.betas[999], 0.999);
        assert!(s.betas.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let mut c = sd();
        c.rescale_betas_zero_snr = true;
        let s = NoiseSchedule::from_config(&c).unwrap();
        assert_eq!(s.alphas_cumprod[999], 0.0);
        let plain = NoiseSchedule::from_config(&sd()).unwrap();
        assert!((s.alphas_cumprod[0] - plain.alphas_cumprod[0]).abs() < 1e-6);
    }

    #[test]
    fn spacings() {
        use TimestepSpacing::*;
        assert_eq!(integer_timesteps(Leading, 1000, 4, 1), vec![751, 501, 251, 1]);
        assert_eq!(integer_timesteps(Trailing, 1000, 4, 0), vec![999, 749, 499, 249]);
        assert_eq!(integer_timesteps(Trailing, 1000, 1, 0), vec![999]);
        assert_eq!(integer_timesteps(Linspace, 1000, 4, 0), vec![999, 666, 333, 0]);
        // round half to even: linspace(0, 999, 3) = [0, 499.5, 999] -> 500
        assert_eq!(integer_timesteps(Linspace, 1000, 3, 0), vec![999, 500, 0]);
        assert_eq!(float_timesteps(Linspace, 1000, 4, 0), vec![999.0, 666.0, 333.0, 0.0]);
        let fifty = float_timesteps(Linspace, 1000, 50, 0);
        assert_eq!(fifty[1], (999.0f64 * 48.0 / 49.0) as f32 as f64);
        let leading = integer_timesteps(Leading, 1000, 50, 1);
        assert_eq!(leading[0], 981);
        assert_eq!(*leading.last().unwrap(), 1);
    }

    #[test]
    fn lcm_schedules() {
        assert_eq!(lcm_timesteps(1000, 50, 1), vec![999]);
        assert_eq!(lcm_timesteps(1000, 50, 2), vec![999, 499]);
        assert_eq!(lcm_timesteps(1000, 50, 3), vec![999, 679, 339]);
        assert_eq!(lcm_timesteps(1000, 50, 4), vec![999, 759, 499, 259]);
        assert_eq!(lcm_timesteps(1000, 50, 8), vec![999, 879, 759, 639, 499, 379, 259, 139]);
        let t20 = lcm_timesteps(1000, 50, 20);
        assert_eq!(&t20[..4], &[999, 959, 899, 859]);
        assert_eq!(t20.len(), 20);
    }
}
