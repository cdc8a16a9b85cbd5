//! Small helpers shared by the CLI, the engine and the HTTP API.

pub mod metrics;
pub mod png;
pub mod tensor_io;
