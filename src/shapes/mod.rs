//! The shapes world (spec v1): a procedural world of coloured shapes whose captions have an
//! exactly checkable meaning, its scene sampler and renderer ([`world`]), the evaluator that
//! judges images against captions ([`eval`]) and the VAE round-trip check ([`roundtrip`]) and the `tiller shapes` / `tiller eval shapes`
//! commands ([`cli`]).

pub mod cli;
pub mod eval;
pub mod roundtrip;
pub mod world;

pub use eval::{detect, evaluate, evaluate_by_category, judge, judge_spec, Detection, Judgement, Report};
pub use roundtrip::{vae_round_trip, RoundTrip};
pub use world::{
    parse_caption, render, sample_scene, sample_scene_of, CaptionSpec, Category, Color, Object, ObjectSpec, Relation,
    Scene, Shape,
};
