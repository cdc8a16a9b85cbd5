//! Explicit noise for every stochastic draw, so a seed reproduces a result on any machine and
//! thread count (candle's CPU RNG cannot be seeded), and so parity tests can replay the exact
//! noise diffusers drew.

use candle_core::{Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};

/// A stream of standard-normal tensors.
pub trait NoiseSource: Send {
    fn next(&mut self, shape: &Shape, device: &Device) -> Result<Tensor>;
}

/// Seeded generator: ChaCha12 + the ziggurat normal of `rand_distr`, drawn sequentially in
/// row-major order, hence identical on every platform and thread count.
pub struct SeededNoise {
    rng: ChaCha12Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha12Rng::seed_from_u64(seed) }
    }

    pub fn sample_vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| StandardNormal.sample(&mut self.rng)).collect()
    }
}

impl NoiseSource for SeededNoise {
    fn next(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        let v = self.sample_vec(shape.elem_count());
        Tensor::from_vec(v, shape.clone(), device)
    }
}

/// Replays a fixed list of tensors in order (parity tests, client-supplied noise).
pub struct ReplayNoise {
    tensors: std::collections::VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors: tensors.into() }
    }
}

impl NoiseSource for ReplayNoise {
    fn next(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        let t = self.tensors.pop_front().ok_or_else(|| candle_core::Error::Msg("replay noise exhausted".into()))?;
        if t.shape() != shape {
            candle_core::bail!("replay noise has shape {:?}, expected {:?}", t.shape(), shape);
        }
        t.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_different_seed_different_noise() {
        let a = SeededNoise::new(7).sample_vec(64);
        let b = SeededNoise::new(7).sample_vec(64);
        let c = SeededNoise::new(8).sample_vec(64);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn seeded_noise_is_standard_normal() {
        let v = SeededNoise::new(1).sample_vec(200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
