//! Server configuration: a TOML file, overridden by `TILLER_*` environment variables, overridden
//! by command-line flags (in that order; later wins).
//!
//! Every key is documented in docs/config.md (linked from the README) and in
//! `tiller.example.toml`, which a test parses.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TillerError};

/// The shapes-world model shipped under `models/` (trained by `training/train.sh`): the default
/// model whenever it is among the loaded models and no other default is configured.
pub const EMBEDDED_DEFAULT_MODEL: &str = "shapes";

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub limits: Limits,
    /// `[rewards.NAME]`: named rewards that requests can steer towards, in addition to the
    /// built-ins (`brightness`, `color`, `jpeg_compressibility`, `jpeg_incompressibility`); a
    /// table named like a built-in replaces it. Each table has a `kind` and that kind's keys
    /// (see [`crate::reward::RewardConfig`]). Not overridable from the environment.
    pub rewards: std::collections::BTreeMap<String, crate::reward::RewardConfig>,
    pub adapters: AdaptersConfig,
    pub jobs: JobsConfig,
    pub storage: StorageConfig,
}

/// `[storage]`: where experiments and their records live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of the embedded SQLite database (`tiller.db`), created when missing.
    pub data_dir: PathBuf,
    /// A database URL instead of the embedded file: `postgres://user:pass@host/db` for several
    /// replicas sharing one store (or `sqlite://path`).
    pub url: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { data_dir: PathBuf::from("data"), url: None }
    }
}

impl StorageConfig {
    /// The database URL: `url`, else the SQLite file under `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join("tiller.db").display()),
        }
    }
}

/// `[jobs]`: asynchronous jobs (`POST /v1/jobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Seconds a finished job (its status, result and events) stays readable; then 404.
    pub ttl_secs: u64,
    /// Jobs kept at once, finished or not; a submission beyond it first drops the oldest
    /// finished job, and is refused (429) if every kept job is still unfinished.
    pub max_jobs: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self { ttl_secs: 3600, max_jobs: 10_000 }
    }
}

/// `[adapters]`: LoRA adapters and the cache of adapted model variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersConfig {
    /// Directory of adapter files (`NAME.safetensors`, or `NAME/` with a PEFT or diffusers
    /// LoRA file). Missing = no adapters. `POST /v1/adapters` registers files inside it only.
    pub root: PathBuf,
    /// Memory budget for cached merged variants, MiB.
    pub cache_mib: usize,
    /// `auto` (merged and cached; a new combination's request of ≤ 2 steps runs unmerged),
    /// `always` or `never`.
    pub merge: crate::adapters::registry::MergePolicy,
    /// Skip adapter keys that match no module of the model (logged) instead of answering 400.
    pub lenient: bool,
}

impl Default for AdaptersConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("adapters"),
            cache_mib: 2048,
            merge: crate::adapters::registry::MergePolicy::Auto,
            lenient: false,
        }
    }
}

/// `[server]`: where to listen and who may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, `HOST:PORT`.
    pub bind: String,
    /// When set, `/v1/*` requests must carry `Authorization: Bearer <api_key>` (what OpenAI
    /// clients send).
    pub api_key: Option<String>,
    /// When set, `GET /metrics`, `POST /v1/adapters` and `DELETE /v1/adapters/{name}` require
    /// `Authorization: Bearer <admin_key>`.
    pub admin_key: Option<String>,
    /// Origins a browser page may call the API from (CORS), e.g. `["https://app.example"]`;
    /// `["*"]` allows any origin. Empty: no CORS headers (browsers then refuse cross-origin
    /// calls).
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { bind: DEFAULT_BIND.to_string(), api_key: None, admin_key: None, cors_origins: Vec::new() }
    }
}

/// The default listen address: loopback only, so a fresh checkout does not expose an
/// unauthenticated server to the network. Containers set `0.0.0.0:8080`.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";

/// `[models]`: which models to load and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Models root: every subdirectory holding `model_index.json` is a model named after the
    /// directory.
    pub root: PathBuf,
    /// Model used when a request names none; `None` = [`EMBEDDED_DEFAULT_MODEL`] when it is
    /// under `root`, else the first model by name.
    pub default: Option<String>,
    /// Only load these models (names under `root`); empty = load all of them.
    pub load: Vec<String>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// Weight and activation dtype.
    pub dtype: DTypeSpec,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("models"),
            default: None,
            load: Vec::new(),
            device: DeviceSpec::Auto,
            dtype: DTypeSpec::F32,
        }
    }
}

/// `[limits]`: what a request may ask for, and how long it may wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest image width; unset = twice the model's native width (so a 64×64 model does not
    /// accept 1024×1024 unless configured to).
    pub max_width: Option<usize>,
    /// Largest image height; unset = twice the model's native height.
    pub max_height: Option<usize>,
    /// Upper bound on `width * height`; unset = four times the model's native pixel count.
    pub max_pixels: Option<usize>,
    /// Images per request (OpenAI allows 10).
    pub max_n: usize,
    pub max_steps: usize,
    /// Prompt and negative prompt length in characters (Unicode scalar values).
    pub max_prompt_chars: usize,
    /// Request body size in bytes (base64 `init_latents` counts).
    pub max_body_bytes: usize,
    /// Jobs that may wait behind the running one; more get 429.
    pub queue_depth: usize,
    /// Time from receiving a request to its response, queueing included; past it the job is
    /// cancelled and the client gets 504.
    pub request_timeout_secs: u64,
    /// Steering: particles (FK), candidates (SVDD) or samples (best-of-N) per image. A request
    /// costs about n × this many denoiser batches' worth of memory.
    pub max_particles: usize,
    /// Steering: ReNO iterations per request.
    pub max_reno_iterations: usize,
    /// Steering: sampling steps of a ReNO request. ReNO backpropagates through every step of
    /// every iteration, keeping each step's activations; it is made for one- to four-step
    /// generators.
    pub max_reno_steps: usize,
    /// Peak memory the running jobs may use together, by their estimates, in MiB; a request
    /// that would need more on its own is refused (400). Unset = half the machine's memory.
    pub memory_budget_mib: Option<u64>,
    /// Jobs that run at once; their denoiser calls share batched forwards.
    pub max_running_jobs: usize,
    /// Most denoiser rows (latents, counting each CFG branch) in one batched forward.
    pub max_batch_rows: usize,
    /// How long a batch waits for running jobs that are busy decoding or scoring, ms.
    pub batch_wait_ms: u64,
    /// On SIGTERM: how long running and queued jobs may take to finish before they are
    /// cancelled (a second signal cancels them at once).
    pub shutdown_grace_secs: u64,
}

impl Limits {
    /// The size limits for a model whose native size is `native` (height, width): the configured
    /// ones, else twice the native sides and four times its pixels.
    pub fn size_limits(&self, native: (usize, usize)) -> (usize, usize, usize) {
        let (h, w) = native;
        (self.max_width.unwrap_or(2 * w), self.max_height.unwrap_or(2 * h), self.max_pixels.unwrap_or(4 * w * h))
    }

    /// The memory budget in bytes.
    pub fn memory_budget_bytes(&self) -> u64 {
        self.memory_budget_mib.map(|m| m.saturating_mul(1 << 20)).unwrap_or_else(crate::engine::default_memory_budget)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_width: None,
            max_height: None,
            max_pixels: None,
            max_n: 10,
            max_steps: 150,
            max_prompt_chars: 4000,
            max_body_bytes: 8 * 1024 * 1024,
            queue_depth: 16,
            request_timeout_secs: 300,
            max_particles: 64,
            max_reno_iterations: 200,
            max_reno_steps: 4,
            memory_budget_mib: None,
            max_running_jobs: 16,
            max_batch_rows: 16,
            batch_wait_ms: 5,
            shutdown_grace_secs: 30,
        }
    }
}

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when this build has CUDA and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => {
                    n.parse().map(Self::Cuda).map_err(|_| format!("invalid CUDA ordinal in `{s}`; expected cuda:N"))
                }
                None => Err(format!("invalid device `{s}`; expected auto, cpu or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Open the device. CUDA in a build without the `cuda` feature is a clear error.
    pub fn open(&self) -> Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Auto => {
                // `cuda_is_available` only says the binary was built with CUDA; whether a GPU
                // and a driver are there shows when the device is opened. A CUDA build on a
                // machine without either serves on the CPU, as `auto` promises.
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    match candle_core::Device::new_cuda(0) {
                        Ok(d) => return Ok(d),
                        Err(e) => tracing::warn!("no usable CUDA device ({e}); running on the CPU"),
                    }
                }
                Ok(candle_core::Device::Cpu)
            }
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(TillerError::field(
                        "device",
                        format!(
                            "`cuda:{n}` requested, but this tiller binary was built without CUDA \
                             support; rebuild with `cargo build --release --features cuda` or use \
                             `--device cpu`"
                        ),
                    ));
                }
                candle_core::Device::new_cuda(*n)
                    .map_err(|e| TillerError::field("device", format!("cannot open CUDA device {n}: {e}")))
            }
        }
    }
}

/// Model dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeSpec {
    #[default]
    F32,
    F16,
    Bf16,
}

impl FromStr for DTypeSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("invalid dtype `{other}`; expected f32, f16 or bf16")),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl DTypeSpec {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Check the dtype against the device (see [`crate::models::loader::check_dtype`]): bf16 on
    /// CPU is an error (candle's CPU bf16 conv2d fails), f16 on CPU a warning (slower than f32).
    pub fn check_device(self, device: &candle_core::Device) -> Result<candle_core::DType> {
        crate::models::loader::check_dtype(device, self.dtype())?;
        Ok(self.dtype())
    }
}

impl Config {
    /// Parse a TOML document.
    pub fn from_toml(text: &str) -> std::result::Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TillerError::file(path, format!("cannot read config file: {e}")))?;
        Self::from_toml(&text).map_err(|e| TillerError::file(path, format!("invalid config: {e}")))
    }

    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut cfg = match file {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Apply `TILLER_*` overrides; `get` looks a variable up (the process environment in
    /// [`Config::load`], a map in tests). See [`ENV_VARS`] for the list.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: FromStr>(var: &str, v: &str) -> Result<T>
        where
            T::Err: fmt::Display,
        {
            v.trim().parse().map_err(|e| TillerError::field(var, format!("cannot parse `{v}`: {e}")))
        }
        let nonempty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = nonempty("TILLER_BIND") {
            self.server.bind = v;
        }
        if let Some(v) = nonempty("TILLER_API_KEY") {
            self.server.api_key = Some(v);
        }
        if let Some(v) = nonempty("TILLER_ADMIN_KEY") {
            self.server.admin_key = Some(v);
        }
        if let Some(v) = nonempty("TILLER_MODELS_DIR") {
            self.models.root = PathBuf::from(v);
        }
        if let Some(v) = nonempty("TILLER_DATA_DIR") {
            self.storage.data_dir = PathBuf::from(v);
        }
        if let Some(v) = nonempty("TILLER_STORAGE_URL") {
            self.storage.url = Some(v);
        }
        if let Some(v) = nonempty("TILLER_ADAPTERS_DIR") {
            self.adapters.root = PathBuf::from(v);
        }
        if let Some(v) = nonempty("TILLER_DEFAULT_MODEL") {
            self.models.default = Some(v);
        }
        if let Some(v) = nonempty("TILLER_LOAD_MODELS") {
            self.models.load = v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(v) = nonempty("TILLER_DEVICE") {
            self.models.device = parse("TILLER_DEVICE", &v)?;
        }
        if let Some(v) = nonempty("TILLER_DTYPE") {
            self.models.dtype = parse("TILLER_DTYPE", &v)?;
        }
        let l = &mut self.limits;
        let optional_vars: [(&str, &mut Option<usize>); 3] = [
            ("TILLER_MAX_WIDTH", &mut l.max_width),
            ("TILLER_MAX_HEIGHT", &mut l.max_height),
            ("TILLER_MAX_PIXELS", &mut l.max_pixels),
        ];
        for (var, slot) in optional_vars {
            if let Some(v) = nonempty(var) {
                *slot = Some(parse(var, &v)?);
            }
        }
        if let Some(v) = nonempty("TILLER_MEMORY_BUDGET_MIB") {
            l.memory_budget_mib = Some(parse("TILLER_MEMORY_BUDGET_MIB", &v)?);
        }
        let usize_vars: [(&str, &mut usize); 9] = [
            ("TILLER_MAX_N", &mut l.max_n),
            ("TILLER_MAX_RUNNING_JOBS", &mut l.max_running_jobs),
            ("TILLER_MAX_BATCH_ROWS", &mut l.max_batch_rows),
            ("TILLER_MAX_STEPS", &mut l.max_steps),
            ("TILLER_MAX_PROMPT_CHARS", &mut l.max_prompt_chars),
            ("TILLER_MAX_BODY_BYTES", &mut l.max_body_bytes),
            ("TILLER_QUEUE_DEPTH", &mut l.queue_depth),
            ("TILLER_MAX_PARTICLES", &mut l.max_particles),
            ("TILLER_MAX_RENO_STEPS", &mut l.max_reno_steps),
        ];
        for (var, slot) in usize_vars {
            if let Some(v) = nonempty(var) {
                *slot = parse(var, &v)?;
            }
        }
        if let Some(v) = nonempty("TILLER_MAX_RENO_ITERATIONS") {
            l.max_reno_iterations = parse("TILLER_MAX_RENO_ITERATIONS", &v)?;
        }
        if let Some(v) = nonempty("TILLER_REQUEST_TIMEOUT_SECS") {
            l.request_timeout_secs = parse("TILLER_REQUEST_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = nonempty("TILLER_SHUTDOWN_GRACE_SECS") {
            l.shutdown_grace_secs = parse("TILLER_SHUTDOWN_GRACE_SECS", &v)?;
        }
        Ok(())
    }

    /// Check values that would make the server unusable.
    pub fn validate(&self) -> Result<()> {
        self.bind_addr()?;
        for o in &self.server.cors_origins {
            if o != "*" && axum::http::HeaderValue::from_str(o).is_err() || o.is_empty() {
                return Err(TillerError::field(
                    "server.cors_origins",
                    format!("`{o}` is not an origin like https://host"),
                ));
            }
        }
        crate::reward::registry::check_configs(&self.rewards)?;
        let l = &self.limits;
        let positive = [
            ("limits.max_width", l.max_width.unwrap_or(1)),
            ("limits.max_height", l.max_height.unwrap_or(1)),
            ("limits.max_pixels", l.max_pixels.unwrap_or(1)),
            ("limits.memory_budget_mib", l.memory_budget_mib.unwrap_or(1) as usize),
            ("limits.max_running_jobs", l.max_running_jobs),
            ("limits.max_batch_rows", l.max_batch_rows),
            ("limits.max_n", l.max_n),
            ("limits.max_steps", l.max_steps),
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.queue_depth", l.queue_depth),
            ("limits.request_timeout_secs", l.request_timeout_secs as usize),
            ("limits.max_particles", l.max_particles),
            ("limits.max_reno_iterations", l.max_reno_iterations),
            ("limits.max_reno_steps", l.max_reno_steps),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(TillerError::field(name, "must be at least 1"));
            }
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        let b = &self.server.bind;
        b.to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .ok_or_else(|| TillerError::field("server.bind", format!("`{b}` is not a HOST:PORT address")))
    }
}

/// Environment variables read by [`Config::apply_env`] and the config keys they override.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("TILLER_CONFIG", "(path of the config file)"),
    ("TILLER_BIND", "server.bind"),
    ("TILLER_API_KEY", "server.api_key"),
    ("TILLER_ADMIN_KEY", "server.admin_key"),
    ("TILLER_MODELS_DIR", "models.root"),
    ("TILLER_ADAPTERS_DIR", "adapters.root"),
    ("TILLER_DATA_DIR", "storage.data_dir"),
    ("TILLER_STORAGE_URL", "storage.url"),
    ("TILLER_DEFAULT_MODEL", "models.default"),
    ("TILLER_LOAD_MODELS", "models.load (comma-separated)"),
    ("TILLER_DEVICE", "models.device"),
    ("TILLER_DTYPE", "models.dtype"),
    ("TILLER_MAX_WIDTH", "limits.max_width"),
    ("TILLER_MAX_HEIGHT", "limits.max_height"),
    ("TILLER_MAX_PIXELS", "limits.max_pixels"),
    ("TILLER_MAX_N", "limits.max_n"),
    ("TILLER_MAX_STEPS", "limits.max_steps"),
    ("TILLER_MAX_PROMPT_CHARS", "limits.max_prompt_chars"),
    ("TILLER_MAX_BODY_BYTES", "limits.max_body_bytes"),
    ("TILLER_QUEUE_DEPTH", "limits.queue_depth"),
    ("TILLER_REQUEST_TIMEOUT_SECS", "limits.request_timeout_secs"),
    ("TILLER_MAX_PARTICLES", "limits.max_particles"),
    ("TILLER_MAX_RENO_ITERATIONS", "limits.max_reno_iterations"),
    ("TILLER_MAX_RENO_STEPS", "limits.max_reno_steps"),
    ("TILLER_MEMORY_BUDGET_MIB", "limits.memory_budget_mib"),
    ("TILLER_MAX_RUNNING_JOBS", "limits.max_running_jobs"),
    ("TILLER_MAX_BATCH_ROWS", "limits.max_batch_rows"),
    ("TILLER_SHUTDOWN_GRACE_SECS", "limits.shutdown_grace_secs"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().server.bind, DEFAULT_BIND);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml("[limits]\nmax_widht = 3\n").unwrap_err();
        assert!(e.contains("max_widht"), "{e}");
    }

    #[test]
    fn env_overrides_file() {
        let mut c = Config::from_toml("[models]\ndevice = \"cpu\"\n[limits]\nmax_n = 2\nqueue_depth = 3\n").unwrap();
        assert_eq!(c.models.device, DeviceSpec::Cpu);
        let env: HashMap<&str, &str> =
            [("TILLER_MAX_N", "7"), ("TILLER_DEVICE", "cuda:1"), ("TILLER_LOAD_MODELS", "a, b")].into();
        c.apply_env(|k| env.get(k).map(|s| s.to_string())).unwrap();
        assert_eq!(c.limits.max_n, 7);
        assert_eq!(c.limits.queue_depth, 3);
        assert_eq!(c.models.device, DeviceSpec::Cuda(1));
        assert_eq!(c.models.load, vec!["a".to_string(), "b".to_string()]);
        // The experiments store: the embedded file under data_dir, or a URL instead.
        assert_eq!(c.storage.database_url(), "sqlite://data/tiller.db?mode=rwc");
        let env: HashMap<&str, &str> = [("TILLER_DATA_DIR", "/var/tiller")].into();
        c.apply_env(|k| env.get(k).map(|s| s.to_string())).unwrap();
        assert_eq!(c.storage.database_url(), "sqlite:///var/tiller/tiller.db?mode=rwc");
        let env: HashMap<&str, &str> = [("TILLER_STORAGE_URL", "postgres://db/t")].into();
        c.apply_env(|k| env.get(k).map(|s| s.to_string())).unwrap();
        assert_eq!(c.storage.database_url(), "postgres://db/t");
        let bad: HashMap<&str, &str> = [("TILLER_MAX_N", "many")].into();
        let e = c.apply_env(|k| bad.get(k).map(|s| s.to_string())).unwrap_err();
        assert!(e.to_string().contains("TILLER_MAX_N"));
    }

    #[test]
    fn device_and_dtype_parse() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!("bf16".parse::<DTypeSpec>().unwrap(), DTypeSpec::Bf16);
        let cpu = candle_core::Device::Cpu;
        assert!(DTypeSpec::Bf16.check_device(&cpu).is_err());
        assert!(DTypeSpec::F32.check_device(&cpu).is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }

    #[test]
    fn zero_limits_are_rejected() {
        let mut c = Config::default();
        c.limits.queue_depth = 0;
        assert!(c.validate().unwrap_err().to_string().contains("queue_depth"));
        c = Config::default();
        c.server.bind = "nonsense".into();
        assert!(c.validate().is_err());
    }
}
