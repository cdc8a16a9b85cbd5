//! tiller: an inference server for diffusion and flow image models that steers generation at
//! inference time.
//!
//! Data moves one way: `api → engine (queue) → pipeline (guidance, sampler ↔ model) → decode`.

pub mod adapters;
pub mod api;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod experiments;
pub mod models;
pub mod pipeline;
pub mod reward;
pub mod sampling;
pub mod shapes;
pub mod steering;
pub mod util;
