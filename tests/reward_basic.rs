//! Non-network rewards, weighted sums, request specs and the registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use image::ImageEncoder;
use rand::{Rng, SeedableRng};
use tiller::config::Config;
use tiller::reward::brightness::Brightness;
use tiller::reward::color::ColorReward;
use tiller::reward::jpeg::{jpeg_sizes, JpegReward};
use tiller::reward::{
    Reward, RewardConfig, RewardError, RewardRegistry, RewardResult, RewardSpec, RewardTerm, WeightedSum,
};

fn random_images(n: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..n * 3 * h * w).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu).unwrap()
}

fn invalid_field<T: std::fmt::Debug>(r: RewardResult<T>) -> String {
    match r {
        Err(RewardError::Invalid(e)) => e.field,
        other => panic!("expected RewardError::Invalid, got {other:?}"),
    }
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn brightness_is_the_mean_over_channels_and_pixels() {
    // Image 0: channel c, pixel p = (c * 4 + p) / 12, so the mean is 5.5 / 12; image 1 is flat.
    let mut data: Vec<f32> = (0..12).map(|i| i as f32 / 12.0).collect();
    data.extend([0.25f32; 12]);
    let images = Tensor::from_vec(data, (2, 3, 2, 2), &Device::Cpu).unwrap();
    let scores = Brightness::new().score(&images, "").unwrap();
    assert_eq!(scores.len(), 2);
    assert!(close(scores[0], 5.5 / 12.0, 1e-6), "{scores:?}");
    assert!(close(scores[1], 0.25, 1e-6), "{scores:?}");
    let t = Brightness::new().score_tensor(&images, "").unwrap();
    assert_eq!(t.dims(), &[2]);
    assert_eq!(t.dtype(), DType::F32);
}

#[test]
fn rewards_reject_non_rgb_batches() {
    let gray = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(Brightness::new().score(&gray, "").is_err());
    assert!(JpegReward::compressibility().score(&gray, "").is_err());
    let flat = Tensor::zeros((3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(ColorReward::new([0.0; 3]).unwrap().score(&flat, "").is_err());
}

/// d(sum of scores)/d(images) from autograd against central finite differences on every
/// element (both rewards are at most quadratic, so central differences are exact up to
/// rounding).
fn check_gradient(reward: &dyn Reward) {
    assert!(reward.differentiable());
    let x0 = random_images(2, 3, 4, 7);
    let var = Var::from_tensor(&x0).unwrap();
    let scores = reward.score_tensor(var.as_tensor(), "").unwrap();
    assert_eq!(scores.dims(), &[2]);
    let grads = scores.sum_all().unwrap().backward().unwrap();
    let grad: Vec<f32> =
        grads.get(var.as_tensor()).expect("gradient reaches the images").flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2f32;
    let total = |v: &[f32]| -> f32 {
        let t = Tensor::from_slice(v, x0.dims(), &Device::Cpu).unwrap();
        reward.score(&t, "").unwrap().iter().sum()
    };
    for (i, g) in grad.iter().enumerate() {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let fd = (total(&plus) - total(&minus)) / (2.0 * eps);
        assert!(close(*g, fd, 2e-4), "{}: element {i}: autograd {} vs finite differences {fd}", reward.name(), g);
    }
}

#[test]
fn brightness_gradient_matches_finite_differences() {
    check_gradient(&Brightness::new());
}

#[test]
fn color_gradient_matches_finite_differences() {
    check_gradient(&ColorReward::new([0.9, 0.2, 0.4]).unwrap());
}

#[test]
fn color_scores_negative_mean_squared_distance() {
    let target = [1.0, 0.0, 0.5];
    // One image exactly the target, one black (distance² 1.25 per pixel).
    let exact = Tensor::new(&[1.0f32, 0.0, 0.5], &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap();
    let exact = exact.broadcast_as((1, 3, 2, 3)).unwrap().contiguous().unwrap();
    let black = Tensor::zeros((1, 3, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let images = Tensor::cat(&[&exact, &black], 0).unwrap();
    let scores = ColorReward::new(target).unwrap().score(&images, "").unwrap();
    assert!(close(scores[0], 0.0, 1e-7), "{scores:?}");
    assert!(close(scores[1], -1.25, 1e-6), "{scores:?}");
    // Against a direct computation on noise.
    let noise = random_images(1, 3, 5, 3);
    let v: Vec<f32> = noise.flatten_all().unwrap().to_vec1().unwrap();
    let pixels = 15;
    let mut expect = 0.0f64;
    for p in 0..pixels {
        for (c, t) in target.iter().enumerate() {
            expect += (v[c * pixels + p] as f64 - t).powi(2);
        }
    }
    expect = -expect / pixels as f64;
    let got = ColorReward::new(target).unwrap().score(&noise, "").unwrap()[0];
    assert!(close(got, expect as f32, 1e-5), "{got} vs {expect}");
}

#[test]
fn color_target_is_validated() {
    for bad in [[1.5, 0.0, 0.0], [0.0, -0.1, 0.0], [0.0, 0.0, f64::NAN]] {
        assert_eq!(invalid_field(ColorReward::new(bad)), "reward.target", "{bad:?}");
    }
    assert!(ColorReward::new([0.0, 1.0, 0.5]).is_ok());
}

/// The test's own JPEG encoding of one image: same quantisation, same encoder and quality.
fn independent_jpeg_len(images: &Tensor, i: usize) -> usize {
    let (_, _, h, w) = images.dims4().unwrap();
    let v: Vec<f32> = images.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut rgb = Vec::with_capacity(h * w * 3);
    for p in 0..h * w {
        for c in 0..3 {
            rgb.push((v[c * h * w + p].clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
        .write_image(&rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .unwrap();
    buf.len()
}

#[test]
fn jpeg_scores_match_an_independent_encode() {
    // Values outside [0, 1] exercise the clamp.
    let images = (random_images(2, 24, 32, 11).affine(1.2, -0.1)).unwrap();
    let sizes = jpeg_sizes(&images).unwrap();
    let comp = JpegReward::compressibility().score(&images, "").unwrap();
    let incomp = JpegReward::incompressibility().score(&images, "").unwrap();
    assert_eq!(sizes.len(), 2);
    for (i, ((&size, &c), &inc)) in sizes.iter().zip(&comp).zip(&incomp).enumerate() {
        let expect = independent_jpeg_len(&images, i);
        assert_eq!(size, expect);
        assert_eq!(c, -(expect as f32) / 1000.0);
        assert_eq!(inc, expect as f32 / 1000.0);
    }
    assert!(!JpegReward::compressibility().differentiable());
    assert!(JpegReward::compressibility().score_tensor(&images, "").is_err());
}

#[test]
fn flat_images_are_more_compressible_than_noise() {
    let flat = Tensor::full(0.5f32, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let noise = random_images(1, 32, 32, 5);
    let images = Tensor::cat(&[&flat, &noise], 0).unwrap();
    let comp = JpegReward::compressibility().score(&images, "").unwrap();
    assert!(comp[0] > comp[1], "{comp:?}");
    let incomp = JpegReward::incompressibility().score(&images, "").unwrap();
    assert!(incomp[0] < incomp[1], "{incomp:?}");
}

#[test]
fn weighted_sums_add_weighted_scores() {
    let images = random_images(3, 4, 4, 1);
    let bright: Arc<dyn Reward> = Arc::new(Brightness::new());
    let color: Arc<dyn Reward> = Arc::new(ColorReward::new([1.0, 0.0, 0.0]).unwrap());
    let jpeg: Arc<dyn Reward> = Arc::new(JpegReward::compressibility());
    let b = bright.score(&images, "").unwrap();
    let c = color.score(&images, "").unwrap();
    let j = jpeg.score(&images, "").unwrap();

    let sum = WeightedSum::new(vec![(1.0, bright.clone()), (0.1, jpeg.clone())]).unwrap();
    assert_eq!(sum.name(), "1*brightness+0.1*jpeg_compressibility");
    assert!(!sum.differentiable());
    assert!(sum.score_tensor(&images, "").is_err());
    let s = sum.score(&images, "").unwrap();
    assert_eq!(s.len(), 3);
    for ((s, b), j) in s.iter().zip(&b).zip(&j) {
        assert!(close(*s, b + 0.1 * j, 1e-5), "{s} {b} {j}");
    }

    let diff = WeightedSum::new(vec![(2.0, bright.clone()), (-0.5, color.clone())]).unwrap();
    assert_eq!(diff.name(), "2*brightness-0.5*color");
    assert!(diff.differentiable());
    let t: Vec<f32> = diff.score_tensor(&images, "").unwrap().to_vec1().unwrap();
    let s = diff.score(&images, "").unwrap();
    for (((t, s), b), c) in t.iter().zip(&s).zip(&b).zip(&c) {
        let expect = 2.0 * b - 0.5 * c;
        assert!(close(*t, expect, 1e-5) && close(*s, expect, 1e-5), "{t} {s} {expect}");
    }
    check_gradient(&diff);

    assert_eq!(invalid_field(WeightedSum::new(vec![])), "reward");
    assert_eq!(invalid_field(WeightedSum::new(vec![(f64::INFINITY, bright)])), "reward");
}

#[test]
fn spec_parses_the_three_forms() {
    let name: RewardSpec = serde_json::from_str(r#""brightness""#).unwrap();
    assert_eq!(name, RewardSpec::Name("brightness".into()));
    let term: RewardSpec = serde_json::from_str(r#"{"name": "color", "target": [1.0, 0.0, 0.0]}"#).unwrap();
    assert_eq!(
        term,
        RewardSpec::Term(RewardTerm { name: "color".into(), weight: None, target: Some([1.0, 0.0, 0.0]) })
    );
    let sum_json = r#"[{"name": "clip_score", "weight": 1.0}, {"name": "jpeg_compressibility", "weight": 0.1}]"#;
    let sum: RewardSpec = serde_json::from_str(sum_json).unwrap();
    let RewardSpec::Sum(terms) = &sum else { panic!("{sum:?}") };
    assert_eq!(terms.len(), 2);
    assert_eq!(terms[1].weight(), 0.1);
    assert_eq!(RewardTerm::named("x").weight(), 1.0);
    // Every form round-trips.
    for text in [r#""brightness""#, r#"{"name": "color", "target": [1.0, 0.0, 0.0]}"#, sum_json] {
        let parsed: RewardSpec = serde_json::from_str(text).unwrap();
        let back = serde_json::to_string(&parsed).unwrap();
        assert_eq!(serde_json::from_str::<RewardSpec>(&back).unwrap(), parsed);
    }
    // Unknown keys do not pass silently.
    assert!(serde_json::from_str::<RewardSpec>(r#"{"name": "color", "taget": [1, 0, 0]}"#).is_err());
}

#[test]
fn spec_errors_name_the_field() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        reward: RewardSpec,
    }
    // The request parser's path: field errors carry the path from the body's root.
    let parse = |text: &str| {
        tiller::util::json::parse_slice::<Body>(format!(r#"{{"reward": {text}}}"#).as_bytes()).map_err(|e| e.field)
    };
    assert_eq!(parse("3").unwrap_err(), "reward");
    assert_eq!(parse(r#"{"name": "color", "taget": [1, 0, 0]}"#).unwrap_err(), "reward.taget");
    assert_eq!(parse(r#"{"weight": 2}"#).unwrap_err(), "reward.name");
    assert_eq!(parse(r#"[{"name": "a"}, {"name": "b", "weight": "x"}]"#).unwrap_err(), "reward[1].weight");
    assert_eq!(parse(r#"[{"name": "color", "target": [1, 0]}]"#).unwrap_err(), "reward[0].target");
    assert_eq!(parse(r#"["brightness"]"#).unwrap_err(), "reward[0]");
    assert!(parse(r#"[{"name": "a"}, {"name": "b", "weight": 2}]"#).is_ok());

    let registry = RewardRegistry::builtin();
    let build = |spec: RewardSpec| registry.build(&spec).map(|r| r.name().to_string());
    assert_eq!(invalid_field(build(RewardSpec::Sum(vec![]))), "reward");
    assert_eq!(invalid_field(build(RewardSpec::Name("sharpness".into()))), "reward");
    assert_eq!(invalid_field(build(RewardSpec::Term(RewardTerm::named("sharpness")))), "reward.name");
    let nan_weight = RewardTerm { weight: Some(f64::NAN), ..RewardTerm::named("brightness") };
    assert_eq!(
        invalid_field(build(RewardSpec::Sum(vec![RewardTerm::named("brightness"), nan_weight]))),
        "reward[1].weight"
    );
    let unknown = RewardSpec::Sum(vec![RewardTerm::named("brightness"), RewardTerm::named("nope")]);
    let e = registry.build(&unknown).map(|r| r.name().to_string()).unwrap_err().to_string();
    assert!(e.contains("reward[1].name") && e.contains("nope") && e.contains("brightness"), "{e}");
    // Color needs a target (in range); others take none.
    assert_eq!(invalid_field(build(RewardSpec::Name("color".into()))), "reward.target");
    let far = RewardTerm { target: Some([2.0, 0.0, 0.0]), ..RewardTerm::named("color") };
    assert_eq!(invalid_field(build(RewardSpec::Sum(vec![RewardTerm::named("brightness"), far]))), "reward[1].target");
    let stray = RewardTerm { target: Some([1.0, 0.0, 0.0]), ..RewardTerm::named("brightness") };
    assert_eq!(invalid_field(build(RewardSpec::Term(stray))), "reward.target");
}

#[test]
fn registry_builds_specs() {
    let registry = RewardRegistry::builtin();
    assert_eq!(registry.names(), ["brightness", "color", "jpeg_compressibility", "jpeg_incompressibility"]);
    let single = registry.build(&RewardSpec::Name("brightness".into())).unwrap();
    assert_eq!(single.name(), "brightness");
    let weight_one = RewardSpec::Term(RewardTerm { weight: Some(1.0), ..RewardTerm::named("jpeg_compressibility") });
    assert_eq!(registry.build(&weight_one).unwrap().name(), "jpeg_compressibility");
    let scaled = RewardSpec::Term(RewardTerm { weight: Some(2.0), ..RewardTerm::named("brightness") });
    assert_eq!(registry.build(&scaled).unwrap().name(), "2*brightness");
    let spec: RewardSpec =
        serde_json::from_str(r#"[{"name": "brightness"}, {"name": "color", "weight": 0.5, "target": [0, 0, 1]}]"#)
            .unwrap();
    let reward = registry.build(&spec).unwrap();
    assert_eq!(reward.name(), "1*brightness+0.5*color");
    assert!(reward.differentiable());
    let blue = Tensor::new(&[0.0f32, 0.0, 1.0], &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap();
    let s = reward.score(&blue, "").unwrap();
    assert!(close(s[0], 1.0 / 3.0, 1e-6), "{s:?}");
    let info = registry.info("jpeg_incompressibility").unwrap();
    assert_eq!((info.kind.as_str(), info.differentiable), ("jpeg_incompressibility", false));
    assert!(registry.info("color").unwrap().differentiable);
    assert_eq!(registry.infos().len(), 4);
}

fn configs(toml_text: &str) -> BTreeMap<String, RewardConfig> {
    Config::from_toml(toml_text).unwrap().rewards
}

#[test]
fn registry_from_config() {
    let cfg = configs(
        r#"
        [rewards.scorer]
        kind = "http"
        url = "http://127.0.0.1:9/score"
        timeout_ms = 250

        [rewards.red]
        kind = "color"
        target = [1.0, 0.0, 0.0]

        [rewards.small]
        kind = "jpeg_compressibility"
        "#,
    );
    let registry = RewardRegistry::new(&cfg, &Device::Cpu).unwrap();
    assert_eq!(
        registry.names(),
        ["brightness", "color", "jpeg_compressibility", "jpeg_incompressibility", "red", "scorer", "small"]
    );
    let scorer = registry.info("scorer").unwrap();
    assert_eq!((scorer.kind.as_str(), scorer.differentiable), ("http", false));
    assert_eq!(registry.build(&RewardSpec::Name("scorer".into())).unwrap().name(), "scorer");
    assert_eq!(registry.build(&RewardSpec::Name("small".into())).unwrap().name(), "small");
    // The configured target is the default; a request's target overrides it.
    assert_eq!(registry.info("red").unwrap().target, Some([1.0, 0.0, 0.0]));
    let red = registry.build(&RewardSpec::Name("red".into())).unwrap();
    assert_eq!(red.name(), "red");
    let pixel = Tensor::new(&[1.0f32, 0.0, 0.0], &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap();
    assert_eq!(red.score(&pixel, "").unwrap(), [0.0]);
    let green = RewardSpec::Term(RewardTerm { target: Some([0.0, 1.0, 0.0]), ..RewardTerm::named("red") });
    assert!(close(registry.build(&green).unwrap().score(&pixel, "").unwrap()[0], -2.0, 1e-6));
}

#[test]
fn bad_reward_configs_name_the_key() {
    let err = |text: &str| {
        let cfg = configs(text);
        let from_registry = RewardRegistry::new(&cfg, &Device::Cpu).expect_err("registry refuses").to_string();
        let config = Config { rewards: cfg, ..Config::default() };
        let from_validate = config.validate().expect_err("validate refuses").to_string();
        assert_eq!(from_registry, from_validate);
        from_registry
    };
    let e =
        err("[rewards.ok]\nkind = \"http\"\nurl = \"http://localhost:1/\"\n[rewards.weird]\nkind = \"sharpness\"\n");
    assert!(e.contains("rewards.weird.kind") && e.contains("sharpness"), "{e}");
    let e = err("[rewards.s]\nkind = \"http\"\n");
    assert!(e.contains("rewards.s.url"), "{e}");
    let e = err("[rewards.s]\nkind = \"http\"\nurl = \"https://example.com/\"\n");
    assert!(e.contains("rewards.s.url") && e.contains("https"), "{e}");
    let e = err("[rewards.s]\nkind = \"http\"\nurl = \"http://a/\"\ntimeout_ms = 0\n");
    assert!(e.contains("rewards.s.timeout_ms"), "{e}");
    let e = err("[rewards.b]\nkind = \"brightness\"\nurl = \"http://a/\"\n");
    assert!(e.contains("rewards.b.url"), "{e}");
    let e = err("[rewards.c]\nkind = \"color\"\ntarget = [0, 0, 3]\n");
    assert!(e.contains("rewards.c.target"), "{e}");
    let e = err("[rewards.c]\nkind = \"clip_score\"\n");
    assert!(e.contains("rewards.c.path"), "{e}");
    let e = err("[rewards.\"a b\"]\nkind = \"brightness\"\n");
    assert!(e.contains("rewards.a b"), "{e}");
    // Unknown keys in a table are a parse error naming the key.
    let e = Config::from_toml("[rewards.s]\nkind = \"http\"\nurll = \"http://a/\"\n").unwrap_err();
    assert!(e.contains("urll"), "{e}");
}

#[test]
fn reward_configs_round_trip_through_toml() {
    let cfg = Config::from_toml("[rewards.red]\nkind = \"color\"\ntarget = [1.0, 0.0, 0.0]\n").unwrap();
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(Config::from_toml(&text).unwrap(), cfg);
    assert_eq!(cfg.rewards["red"], RewardConfig { target: Some([1.0, 0.0, 0.0]), ..RewardConfig::of_kind("color") });
}
