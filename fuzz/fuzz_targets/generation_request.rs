//! Arbitrary bytes through the generation request path up to the engine: JSON parsing with
//! field-level errors (`api::validate::parse_body`), validation against the limits and the
//! tiny SD fixture model (`api::validate::check`, steering and reward specs included), and, for
//! requests that pass, admission's memory estimate (`engine::estimate`). Any panic — an
//! arithmetic overflow included, since fuzz builds keep debug assertions — is a bug: every
//! input must end in `Ok` or an `ApiError`.
//!
//! The limits are the defaults with the size limits raised to their largest, as an operator
//! could configure them, so that the estimate sees huge sizes too.

#![no_main]

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use tiller::adapters::registry::AdapterRegistry;
use tiller::api::validate;
use tiller::config::Limits;
use tiller::engine::{estimate, EngineOptions, Job, ModelSummary};
use tiller::models::DiffusionModel;
use tiller::reward::RewardRegistry;

struct World {
    model: Arc<dyn DiffusionModel>,
    summary: ModelSummary,
    limits: Limits,
    rewards: RewardRegistry,
    adapters: AdapterRegistry,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sd15-tiny");
        let model = tiller::models::loader::load_model("sd15-tiny", &dir, &Device::Cpu, DType::F32).unwrap();
        let summary = ModelSummary {
            name: "sd15-tiny".into(),
            info: model.info().clone(),
            created: 0,
            default_scheduler: model.info().defaults.sampler,
        };
        let limits = Limits {
            max_width: Some(usize::MAX),
            max_height: Some(usize::MAX),
            max_pixels: Some(usize::MAX),
            ..Limits::default()
        };
        let rewards = RewardRegistry::new(&Default::default(), &Device::Cpu).unwrap();
        World { model, summary, limits, rewards, adapters: AdapterRegistry::empty() }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Ok(req) = validate::parse_body(data) else { return };
    let Ok(v) = validate::check(req, &w.limits, &w.summary, &w.rewards, &w.adapters) else { return };
    let job = Job { params: v.params, steering: v.steering, adapters: v.adapters, ..Default::default() };
    let est = estimate(w.model.as_ref(), &job, &EngineOptions::default());
    assert!(est.bytes > 0);
});
