//! The OpenAPI document (served at `/openapi.json`, committed as `openapi/openapi.json`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorResponse};
use super::handlers;
use super::types::*;
use crate::sampling::SamplerKind;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tiller",
        description = "OpenAI-compatible image generation for diffusers-format Stable Diffusion \
                       models, with tiller extensions (seed, steps, scheduler, guidance, initial \
                       latents), inference-time steering towards a reward (best-of-N, FK \
                       steering, SVDD, ReNO), LoRA adapters, per-image replay metadata, \
                       OpenAI-style streaming with previews, and asynchronous jobs."
    ),
    paths(
        handlers::create_image,
        super::edits::edit_image,
        handlers::list_models,
        handlers::get_model,
        handlers::list_rewards,
        handlers::health,
        handlers::ready,
        handlers::metrics,
        super::adapters::list_adapters,
        super::adapters::get_adapter,
        super::adapters::register_adapter,
        super::adapters::delete_adapter,
        super::jobs::create_job,
        super::jobs::get_job,
        super::jobs::delete_job,
        super::jobs::job_events,
        super::experiments::create_experiment,
        super::experiments::list_experiments,
        super::experiments::get_experiment,
        super::experiments::patch_experiment,
        super::experiments::delete_experiment,
        super::experiments::experiment_results,
        super::experiments::post_feedback
    ),
    components(schemas(
        ImageGenerationRequest,
        ImageEditForm,
        ImagesResponse,
        SseEvent,
        PartialImageEvent,
        CompletedImageEvent,
        ImageUsage,
        InputTokensDetails,
        super::jobs::JobInfo,
        super::jobs::JobProgress,
        crate::engine::JobStatus,
        crate::engine::ModelFailure,
        Image,
        ImageMetadata,
        TimingsMs,
        ModelList,
        Model,
        ModelDetails,
        HealthStatus,
        ErrorResponse,
        ErrorBody,
        SamplerKind,
        SteeringMetadata,
        RewardList,
        AdapterRef,
        AppliedAdapter,
        AdapterVariant,
        AdapterList,
        AdapterInfo,
        RegisterAdapterRequest,
        crate::adapters::LoraFormat,
        crate::reward::RewardInfo,
        crate::reward::RewardSpec,
        crate::reward::RewardTerm,
        crate::steering::SteeringSpec,
        crate::steering::TraceEvent,
        crate::steering::PhaseTimings,
        crate::steering::Resampler,
        crate::steering::best_of_n::BestOfNSpec,
        crate::steering::fk::FkSpec,
        crate::steering::fk::Potential,
        crate::steering::fk::Select,
        crate::steering::fk::ResampleSchedule,
        crate::steering::svdd::SvddSpec,
        crate::steering::reno::RenoSpec,
        crate::steering::flowchef::FlowChefSpec,
        crate::steering::reno::Optimizer
    )),
    modifiers(&Security),
    tags(
        (name = "images", description = "Image generation (OpenAI Images API)"),
        (name = "models", description = "Loaded models (OpenAI Models API)"),
        (name = "rewards", description = "Rewards that steering can maximise"),
        (name = "adapters", description = "LoRA adapters requests can apply"),
        (name = "health", description = "Liveness, readiness and metrics")
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        components.add_security_scheme("api_key", bearer());
        components.add_security_scheme("admin_key", bearer());
    }
}

/// The document as pretty-printed JSON with a trailing newline (the committed file's format).
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().expect("OpenAPI serializes");
    s.push('\n');
    s
}
