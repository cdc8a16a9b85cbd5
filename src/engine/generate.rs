//! Seed-replayable generation shared by the CLI and the engine.

use candle_core::Tensor;

use crate::models::DiffusionModel;
use crate::pipeline::{self, GenerationError, GenerationOutput, GenerationParams, Progress};

/// A generation together with the unit-variance initial noise it started from.
pub struct Replayable {
    pub output: GenerationOutput,
    /// (n, C, H/f, W/f) initial latents, as given or as drawn from the seed.
    pub init_latents: Tensor,
}

/// Generate with the per-image seeded noise, always drawing the initial noise from the seed's
/// generator first, even when `params.init_latents` replaces it. So a run given
/// `(seed, init_latents)` where `init_latents` is the noise that `seed` draws reproduces the
/// seed-only run exactly, for stochastic samplers too (their step noise comes after).
pub fn generate_replayable(
    model: &dyn DiffusionModel,
    params: &GenerationParams,
    progress: &mut dyn FnMut(Progress) -> bool,
) -> Result<Replayable, GenerationError> {
    let output = pipeline::generate(model, params, progress)?;
    let init_latents = output.init_latents.clone();
    Ok(Replayable { output, init_latents })
}

/// Denoiser evaluations one step costs for `n` latents (two per latent under classifier-free
/// guidance, mirroring [`pipeline::Conditioning`]).
pub fn evals_per_step(model: &dyn DiffusionModel, params: &GenerationParams) -> usize {
    let r = pipeline::resolve(model, params);
    let cfg = r.guidance_scale > 1.0 && !model.info().guidance_embedding;
    params.n.max(1) * if cfg { 2 } else { 1 }
}
