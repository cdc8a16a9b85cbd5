//! Small helpers shared by the CLI, the engine and the HTTP API.

pub mod encode;
pub mod json;
pub mod metrics;
pub mod tensor_io;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
