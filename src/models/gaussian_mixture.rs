//! An analytic "model" whose data distribution is a Gaussian mixture in image space, with the
//! exact noise prediction (the posterior mean E[x0 | x_t]; docs/steering.md), on a
//! variance-preserving schedule (ε output) or a flow-matching one (velocity output, docs/flows.md).
//!
//! Because the optimal denoiser is known in closed form, so is the reward-tilted distribution
//! p(x)·exp(β·r(x)) for a linear reward: steering strategies can be checked against exact
//! answers while running through the very same samplers, engine and HTTP API as real models.
//! Data live in [-1, 1]; there is no VAE, and decoding is (x + 1) / 2. Prompts are ignored.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use crate::error::TillerError;
use crate::models::{DiffusionModel, ModelInfo, PredictionType, PromptEmbedding, SamplingDefaults};
use crate::sampling::schedule::{np_interp_index, NoiseSchedule};
use crate::sampling::{FlowSigmas, ScheduleConfig};

/// The file that marks a Gaussian-mixture model directory.
pub const CONFIG_FILE: &str = "gmm.json";

/// `gmm.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GmmConfig {
    pub kind: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub components: Vec<ComponentConfig>,
    /// Same fields as a diffusers `scheduler_config.json` (read with the same class defaults).
    pub scheduler: serde_json::Value,
}

/// One isotropic component N(mean, std² I).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    pub weight: f64,
    /// Per channel (constant over pixels) or a full C·H·W vector in CHW order.
    pub mean: Vec<f64>,
    pub std: f64,
}

/// A mixture of isotropic Gaussians in R^D, D = C·H·W.
#[derive(Debug, Clone)]
pub struct Mixture {
    /// Normalised mixture weights π_k.
    pub weights: Vec<f64>,
    /// Means μ_k, each of length D.
    pub means: Vec<Vec<f64>>,
    pub stds: Vec<f64>,
}

impl Mixture {
    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// Mode weights of the tilted target p(x)·exp(β·bᵀx) for a linear reward with gradient `b`:
    /// π'_k ∝ π_k·exp(β bᵀμ_k + ½β² τ_k² ‖b‖²) (docs/steering.md).
    pub fn tilted_weights(&self, b: &[f64], beta: f64) -> Vec<f64> {
        let bb: f64 = b.iter().map(|v| v * v).sum();
        let logs: Vec<f64> = (0..self.weights.len())
            .map(|k| {
                let bm: f64 = b.iter().zip(&self.means[k]).map(|(x, y)| x * y).sum();
                self.weights[k].ln() + beta * bm + 0.5 * beta * beta * self.stds[k].powi(2) * bb
            })
            .collect();
        let m = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logs.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|v| v / s).collect()
    }

    /// The component whose mean is nearest to `x` (length D): how tests assign samples to modes.
    pub fn nearest_component(&self, x: &[f32]) -> usize {
        let d2 = |m: &Vec<f64>| -> f64 { m.iter().zip(x).map(|(a, b)| (a - *b as f64).powi(2)).sum() };
        (0..self.means.len()).min_by(|&a, &b| d2(&self.means[a]).total_cmp(&d2(&self.means[b]))).unwrap_or(0)
    }
}

/// How a timestep maps to the path x_t = a·x0 + s·ε.
enum NoisePath {
    /// Variance preserving: a = √ᾱ_t, s = √(1 − ᾱ_t); the model predicts ε.
    Vp {
        schedule: NoiseSchedule,
        /// Euler's σ table, to map fractional timesteps to ᾱ as diffusers does.
        sigmas: Vec<f32>,
    },
    /// Flow matching: σ = t / N, a = 1 − σ, s = σ; the model predicts the velocity ε − x0.
    Flow { num_train: f64 },
}

/// The analytic model.
pub struct GaussianMixtureModel {
    info: ModelInfo,
    device: Device,
    mixture: Mixture,
    path: NoisePath,
    /// (K, D) means on the device.
    means: Tensor,
    shape: (usize, usize, usize),
}

impl GaussianMixtureModel {
    /// Load `dir/gmm.json`.
    pub fn load(name: &str, dir: &Path, device: &Device) -> crate::error::Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| TillerError::file(&path, e.to_string()))?;
        let cfg: GmmConfig = serde_json::from_str(&text).map_err(|e| TillerError::file(&path, e.to_string()))?;
        Self::from_config(name, &cfg, device).map_err(|e| match e {
            TillerError::InvalidField(f) => TillerError::file(&path, f.text()),
            other => other,
        })
    }

    pub fn from_config(name: &str, cfg: &GmmConfig, device: &Device) -> crate::error::Result<Self> {
        let bad = |field: &str, msg: String| TillerError::field(field, msg);
        if cfg.kind != "gaussian-mixture" {
            return Err(bad("kind", format!("expected \"gaussian-mixture\", got \"{}\"", cfg.kind)));
        }
        let (c, h, w) = (cfg.channels, cfg.height, cfg.width);
        if c == 0 || h == 0 || w == 0 {
            return Err(bad("channels", "channels, height and width must be positive".into()));
        }
        if c != 3 {
            // Decoding maps channels straight to RGB, and every reward scores RGB images.
            return Err(bad("channels", format!("must be 3 (decoded as RGB), got {c}")));
        }
        if cfg.components.is_empty() {
            return Err(bad("components", "at least one component is required".into()));
        }
        let d = c * h * w;
        let mut weights = Vec::new();
        let mut means = Vec::new();
        let mut stds = Vec::new();
        for (k, comp) in cfg.components.iter().enumerate() {
            if !(comp.weight.is_finite() && comp.weight > 0.0) {
                return Err(bad("components", format!("component {k}: weight must be positive")));
            }
            if !(comp.std.is_finite() && comp.std > 0.0) {
                return Err(bad("components", format!("component {k}: std must be positive")));
            }
            let mean = if comp.mean.len() == c {
                comp.mean.iter().flat_map(|&m| std::iter::repeat_n(m, h * w)).collect()
            } else if comp.mean.len() == d {
                comp.mean.clone()
            } else {
                return Err(bad(
                    "components",
                    format!(
                        "component {k}: mean has {} values; expected {c} (per channel) or {d} (C·H·W)",
                        comp.mean.len()
                    ),
                ));
            };
            if mean.iter().any(|v: &f64| !v.is_finite()) {
                return Err(bad("components", format!("component {k}: mean must be finite")));
            }
            weights.push(comp.weight);
            means.push(mean);
            stds.push(comp.std);
        }
        let total: f64 = weights.iter().sum();
        let weights = weights.iter().map(|w| w / total).collect();
        let mixture = Mixture { weights, means, stds };

        let schedule_config = ScheduleConfig::from_json(&cfg.scheduler.to_string(), FlowSigmas::Scheduler)
            .map_err(|m| bad("scheduler", m))?;
        let path = match &schedule_config {
            ScheduleConfig::Vp(scheduler) => {
                if !matches!(scheduler.prediction_type, PredictionType::Epsilon) {
                    return Err(bad("scheduler.prediction_type", "the analytic model predicts epsilon".into()));
                }
                let schedule = NoiseSchedule::from_config(scheduler).map_err(|m| bad("scheduler", m))?;
                let sigmas = schedule.sigmas_f32();
                NoisePath::Vp { schedule, sigmas }
            }
            ScheduleConfig::Flow { config, .. } => NoisePath::Flow { num_train: config.num_train_timesteps as f64 },
        };
        let flat: Vec<f32> = mixture.means.iter().flatten().map(|&v| v as f32).collect();
        let means = Tensor::from_vec(flat, (mixture.means.len(), d), device)?;
        let info = ModelInfo {
            name: name.to_string(),
            family: "gaussian-mixture".into(),
            latent_channels: c,
            vae_scale_factor: 1,
            default_size: (h, w),
            fixed_size: true,
            inpainting: false,
            defaults: SamplingDefaults::derive(&schedule_config, false, 0),
            scheduler: schedule_config,
            guidance_embedding: false,
            max_prompt_tokens: 0,
            patch_size: 1,
            max_side: None,
            zero_empty_negative: false,
        };
        Ok(Self { info, device: device.clone(), mixture, path, means, shape: (c, h, w) })
    }

    pub fn mixture(&self) -> &Mixture {
        &self.mixture
    }

    /// (a, s) of the path at a (possibly fractional) timestep; for VP schedules σ is
    /// interpolated like diffusers' Euler does.
    fn path_at(&self, t: f64) -> (f64, f64) {
        match &self.path {
            NoisePath::Vp { schedule, sigmas } => {
                let abar = if t.fract() == 0.0 && t >= 0.0 && (t as usize) < schedule.len() {
                    schedule.abar(t as usize)
                } else {
                    let sigma = np_interp_index(t, sigmas);
                    1.0 / (sigma * sigma + 1.0)
                };
                (abar.sqrt(), (1.0 - abar).sqrt())
            }
            NoisePath::Flow { num_train } => {
                let sigma = (t / num_train).clamp(0.0, 1.0);
                (1.0 - sigma, sigma)
            }
        }
    }

    /// The exact posterior mean E[x0 | x_t = x] for x shaped (B, D), with a = √ᾱ, s = √(1−ᾱ).
    /// Built from differentiable ops, so gradients flow back to x (ReNO).
    fn posterior_mean(&self, x: &Tensor, a: f64, s: f64) -> Result<Tensor> {
        let m = &self.mixture;
        let d = m.dim() as f64;
        let k = m.weights.len();
        let dtype = x.dtype();
        let sk: Vec<f64> = m.stds.iter().map(|t| a * a * t * t + s * s).collect();
        // log γ_k = log π_k − D/2·log S_k − ‖x − aμ_k‖² / (2 S_k), with
        // ‖x − aμ_k‖² = ‖x‖² − 2a x·μ_k + a²‖μ_k‖².
        let xx = x.sqr()?.sum_keepdim(1)?; // (B, 1)
        let xm = x.matmul(&self.means.to_dtype(dtype)?.t()?)?; // (B, K)
        let inv_2s: Vec<f64> = sk.iter().map(|v| 0.5 / v).collect();
        let consts: Vec<f64> = (0..k)
            .map(|j| {
                let mm: f64 = m.means[j].iter().map(|v| v * v).sum();
                m.weights[j].ln() - 0.5 * d * sk[j].ln() - a * a * mm * inv_2s[j]
            })
            .collect();
        let row = |v: &[f64]| Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), (1, k), &self.device);
        let inv_2s_t = row(&inv_2s)?.to_dtype(dtype)?;
        let two_a_inv_2s: Vec<f64> = inv_2s.iter().map(|v| 2.0 * a * v).collect();
        let logits = (xm.broadcast_mul(&row(&two_a_inv_2s)?.to_dtype(dtype)?)? - xx.broadcast_mul(&inv_2s_t)?)?
            .broadcast_add(&row(&consts)?.to_dtype(dtype)?)?;
        // Max-subtracted softmax composed from ops with a backward (the fused one has none).
        let mx = logits.max_keepdim(1)?.detach();
        let e = logits.broadcast_sub(&mx)?.exp()?;
        let gamma = e.broadcast_div(&e.sum_keepdim(1)?)?; // (B, K)
                                                          // E[x0|x] = Σ_k γ_k (s²/S_k μ_k + aτ_k²/S_k x).
        let mut c1 = Vec::with_capacity(k * m.dim());
        for (mean, skj) in m.means.iter().zip(&sk) {
            c1.extend(mean.iter().map(|&v| (s * s / skj * v) as f32));
        }
        let c1 = Tensor::from_vec(c1, (k, m.dim()), &self.device)?.to_dtype(dtype)?;
        let c2: Vec<f64> = (0..k).map(|j| a * m.stds[j].powi(2) / sk[j]).collect();
        let c2 = Tensor::from_vec(c2.iter().map(|&v| v as f32).collect::<Vec<_>>(), (k, 1), &self.device)?
            .to_dtype(dtype)?;
        let shrink = gamma.matmul(&c2)?; // (B, 1)
        gamma.matmul(&c1)? + x.broadcast_mul(&shrink)?
    }
}

impl DiffusionModel for GaussianMixtureModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding> {
        // Prompts are ignored; a (B, 1, 1) zero embedding keeps the CFG batch layout working.
        Ok(PromptEmbedding {
            hidden_states: Tensor::zeros((prompts.len(), 1, 1), DType::F32, &self.device)?,
            pooled: None,
            truncated: Vec::new(),
        })
    }

    fn guidance_embedding(&self, _guidance_scale: f64, _batch: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        _ctx: &PromptEmbedding,
        _cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if (c, h, w) != self.shape {
            candle_core::bail!("latents {:?} do not match the model's {:?}", (c, h, w), self.shape);
        }
        let ts = timesteps.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if ts.len() != b {
            candle_core::bail!("{} timesteps for {b} rows", ts.len());
        }
        let flat = x.reshape((b, c * h * w))?;
        // Rows at the same timestep share one call; rows are independent, so the split is exact.
        let mut rows = Vec::with_capacity(b);
        let mut start = 0;
        while start < b {
            let mut end = start + 1;
            while end < b && ts[end] == ts[start] {
                end += 1;
            }
            let (a, s) = self.path_at(ts[start]);
            if s <= 0.0 {
                candle_core::bail!("timestep {} is noise-free: the exact model has no output there", ts[start]);
            }
            let part = flat.narrow(0, start, end - start)?;
            let mean = self.posterior_mean(&part, a, s)?;
            rows.push(match self.path {
                // ε* = (x − a·E[x0|x]) / s
                NoisePath::Vp { .. } => ((part - (mean * a)?)? / s)?,
                // v* = E[ε − x0 | x] = (x − E[x0|x]) / σ, as a + s = 1
                NoisePath::Flow { .. } => ((part - mean)? / s)?,
            });
            start = end;
        }
        let eps = if rows.len() == 1 { rows.pop().expect("one") } else { Tensor::cat(&rows, 0)? };
        eps.reshape((b, c, h, w))
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        ((latents.to_dtype(DType::F32)? + 1.0)? / 2.0)?.clamp(0f32, 1f32)
    }

    fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        (images.to_dtype(DType::F32)? * 2.0)? - 1.0
    }
}

/// Draw `n` exact samples from the mixture (tests and benches use them as ground truth).
pub fn sample_mixture(m: &Mixture, n: usize, rng: &mut impl rand::Rng) -> Vec<Vec<f32>> {
    use rand_distr::{Distribution, StandardNormal};
    (0..n)
        .map(|_| {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let mut k = m.weights.len() - 1;
            for (j, w) in m.weights.iter().enumerate() {
                acc += w;
                if u < acc {
                    k = j;
                    break;
                }
            }
            m.means[k]
                .iter()
                .map(|&mu| {
                    let z: f64 = StandardNormal.sample(rng);
                    (mu + m.stds[k] * z) as f32
                })
                .collect()
        })
        .collect()
}
