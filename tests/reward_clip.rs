//! CLIP rewards against transformers: preprocessing, embeddings, scores, the aesthetic head and
//! gradients with respect to the images, on the tiny random-weight fixture
//! (`scripts/fixtures/make_clip_fixtures.py`; references computed in float64).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use tiller::reward::clip::{
    bicubic_matrix, load_clip_reward, AestheticHead, AestheticReward, ClipRewardModel, ClipScoreReward,
};
use tiller::reward::{Reward, RewardConfig};

const TOL: f64 = 1e-4;
const SETS: [&str; 3] = ["a", "b", "c"];

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/clip-tiny")
}

fn refs() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refs/clip_tiny.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference tensors load")
}

fn prompts() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refs/clip_tiny.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

fn load(dtype: DType) -> Arc<ClipRewardModel> {
    Arc::new(ClipRewardModel::load(&model_dir(), dtype, &Device::Cpu).expect("fixture CLIP model loads"))
}

fn head(dtype: DType) -> AestheticHead {
    AestheticHead::load(&model_dir().join("aesthetic_head.safetensors"), dtype, &Device::Cpu).expect("head loads")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    let e = rel_err(got, want);
    eprintln!("{what}: rel err {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    e
}

#[test]
fn bicubic_matrix_rows_sum_to_one_and_identity_is_exact() {
    for (i, o) in [(40, 32), (20, 38), (7, 3), (3, 11)] {
        let m = bicubic_matrix(i, o);
        for r in 0..o {
            let s: f64 = m[r * i..(r + 1) * i].iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "{i}->{o} row {r} sums to {s}");
        }
    }
    let id = bicubic_matrix(5, 5);
    for r in 0..5 {
        for c in 0..5 {
            assert_eq!(id[r * 5 + c], if r == c { 1.0 } else { 0.0 });
        }
    }
}

#[test]
fn preprocessing_embeddings_and_scores_match_transformers() {
    let r = refs();
    let model = load(DType::F32);
    let prompts = prompts();
    let clip_reward = ClipScoreReward::new(model.clone());
    let aesthetic = AestheticReward::new(model.clone(), head(DType::F32)).unwrap();

    // Tokens and text embeddings.
    let ids = r["input_ids"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    for (p, want) in prompts.iter().zip(&ids) {
        let got: Vec<i64> = model.token_ids(p).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(&got, want, "token ids of {p:?}");
    }
    let text = Tensor::cat(&prompts.iter().map(|p| model.text_embeds(p).unwrap()).collect::<Vec<_>>(), 0).unwrap();
    let mut worst = check("text_embeds", &text, &r["text_embeds"], TOL);
    assert!((model.clip().logit_scale() - r["logit_scale"].to_scalar::<f32>().unwrap() as f64).abs() < 1e-6);

    for set in SETS {
        let images = &r[&format!("images_{set}")];
        let pixels = model.pixel_values(images).unwrap();
        worst = worst.max(check(&format!("pixels_{set}"), &pixels, &r[&format!("pixels_{set}")], TOL));
        let embeds = model.image_embeds(images).unwrap();
        worst = worst.max(check(&format!("image_embeds_{set}"), &embeds, &r[&format!("image_embeds_{set}")], TOL));

        let want = &r[&format!("clip_score_{set}")];
        for (j, p) in prompts.iter().enumerate() {
            let col = want.narrow(1, j, 1).unwrap().squeeze(1).unwrap();
            let fast = Tensor::new(clip_reward.score(images, p).unwrap(), &Device::Cpu).unwrap();
            let graph = clip_reward.score_tensor(images, p).unwrap();
            worst = worst.max(check(&format!("clip_score_{set}[{j}] (score)"), &fast, &col, TOL));
            worst = worst.max(check(&format!("clip_score_{set}[{j}] (score_tensor)"), &graph, &col, TOL));
        }
        let want = &r[&format!("aesthetic_{set}")];
        let fast = Tensor::new(aesthetic.score(images, "").unwrap(), &Device::Cpu).unwrap();
        worst = worst.max(check(&format!("aesthetic_{set}"), &fast, want, TOL));
    }
    eprintln!("worst forward relative error: {worst:.2e}");
}

#[test]
fn gradients_match_torch() {
    let r = refs();
    let model = load(DType::F32);
    let prompt = &prompts()[0];
    let rewards: [(&str, Box<dyn Reward>); 2] = [
        ("clip", Box::new(ClipScoreReward::new(model.clone()))),
        ("aesthetic", Box::new(AestheticReward::new(model.clone(), head(DType::F32)).unwrap())),
    ];
    let mut worst = 0f64;
    for (kind, reward) in &rewards {
        assert!(reward.differentiable());
        for set in SETS {
            let var = Var::from_tensor(&r[&format!("images_{set}")]).unwrap();
            let scores = reward.score_tensor(var.as_tensor(), prompt).unwrap();
            assert_eq!(scores.dtype(), DType::F32);
            let grads = scores.sum_all().unwrap().backward().unwrap();
            let g = grads.get(var.as_tensor()).expect("gradient reaches the images");
            worst = worst.max(check(&format!("grad_{kind}_{set}"), g, &r[&format!("grad_{kind}_{set}")], TOL));
        }
    }
    eprintln!("worst gradient relative error: {worst:.2e}");
}

/// Central differences of Σ_i w_i·score_i in f64 against autograd, at a few pixels.
fn fd_check(name: &str, f: impl Fn(&Tensor) -> Tensor, x0: &Tensor) -> f64 {
    let (n, c, h, w) = x0.dims4().unwrap();
    let weights: Vec<f64> = (0..n).map(|i| 1.0 - 0.7 * i as f64).collect();
    let weights = Tensor::new(weights, &Device::Cpu).unwrap();
    let objective = |x: &Tensor| (f(x) * &weights).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let var = Var::from_tensor(x0).unwrap();
    let grads = (f(var.as_tensor()) * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let g = values(grads.get(var.as_tensor()).expect("gradient reaches the images"));
    let base = values(x0);
    let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let len = base.len();
    let mut worst = 0f64;
    let eps = 1e-5;
    for idx in [0, 1, w + 3, len / 3, len / 2 + 7, len - 1] {
        let shifted = |d: f64| {
            let mut v = base.clone();
            v[idx] += d;
            objective(&Tensor::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap())
        };
        let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
        let err = (fd - g[idx]).abs() / gmax;
        worst = worst.max(err);
        assert!(err < 1e-6, "{name} idx {idx}: fd {fd:.9} autograd {:.9} (max |g| {gmax:.3e})", g[idx]);
    }
    eprintln!("{name}: worst fd error {worst:.2e} (relative to max |grad|)");
    worst
}

#[test]
fn differentiable_scores_match_finite_differences() {
    let r = refs();
    let model = load(DType::F64);
    let aesthetic = AestheticReward::new(model.clone(), head(DType::F64)).unwrap();
    let prompt = prompts()[1].clone();
    for set in ["a", "c"] {
        let x0 = r[&format!("images_{set}")].to_dtype(DType::F64).unwrap();
        fd_check(&format!("clip_score f64 {set}"), |x| model.clip_score(x, &prompt).unwrap(), &x0);
        fd_check(&format!("aesthetic f64 {set}"), |x| aesthetic.aesthetic(x).unwrap(), &x0);
    }
}

fn copy_fixture(to: &Path) {
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn load_err(kind: &str, path: &Path, head: Option<PathBuf>) -> String {
    let cfg = RewardConfig { path: Some(path.to_path_buf()), head, ..RewardConfig::of_kind(kind) };
    match load_clip_reward(kind, &cfg, &Device::Cpu) {
        Ok(_) => panic!("{kind} at {} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` should mention `{p}`");
    }
}

#[test]
fn missing_or_malformed_model_dirs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    assert_mentions(&load_err("clip_score", &missing, None), &["nope", "CLIP model directory is missing"]);

    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["config.json", "cannot read"]);

    copy_fixture(&dir);
    let good = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["config.json", "malformed"]);
    std::fs::write(dir.join("config.json"), r#"{"text_config": {}}"#).unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["config.json", "vision_config"]);
    std::fs::write(dir.join("config.json"), good.replace("\"patch_size\": 4", "\"patch_size\": 8")).unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["weights do not match config.json", "patch_embedding"]);
    std::fs::write(dir.join("config.json"), &good).unwrap();

    std::fs::rename(dir.join("model.safetensors"), dir.join("weights.bak")).unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["no weight file", "model.safetensors"]);
    std::fs::write(dir.join("model.safetensors"), b"garbage").unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["model.safetensors", "not a valid safetensors file"]);
    std::fs::rename(dir.join("weights.bak"), dir.join("model.safetensors")).unwrap();

    std::fs::rename(dir.join("vocab.json"), dir.join("vocab.bak")).unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["vocab.json", "missing"]);
    std::fs::rename(dir.join("vocab.bak"), dir.join("vocab.json")).unwrap();

    std::fs::write(dir.join("preprocessor_config.json"), r#"{"image_mean": [0.5, 0.5]}"#).unwrap();
    assert_mentions(&load_err("clip_score", &dir, None), &["preprocessor_config.json", "image_mean"]);
    std::fs::copy(model_dir().join("preprocessor_config.json"), dir.join("preprocessor_config.json")).unwrap();

    // Aesthetic head: missing, pickle, wrong layout, wrong input size.
    std::fs::remove_file(dir.join("aesthetic_head.safetensors")).unwrap();
    assert_mentions(&load_err("aesthetic", &dir, None), &["aesthetic_head.safetensors", "needs `head`"]);
    assert_mentions(&load_err("aesthetic", &dir, Some(dir.join("h.safetensors"))), &["h.safetensors", "missing"]);
    std::fs::write(dir.join("h.pth"), b"x").unwrap();
    assert_mentions(&load_err("aesthetic", &dir, Some(dir.join("h.pth"))), &["h.pth", "safetensors"]);
    let t = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let bad_layout: HashMap<String, Tensor> = [("mlp.0.weight".to_string(), t((1, 16)))].into();
    candle_core::safetensors::save(&bad_layout, dir.join("h1.safetensors")).unwrap();
    assert_mentions(&load_err("aesthetic", &dir, Some(dir.join("h1.safetensors"))), &["h1.safetensors", "layers.N"]);
    let wrong_dim: HashMap<String, Tensor> =
        [("layers.0.weight".to_string(), t((4, 8))), ("layers.1.weight".to_string(), t((1, 4)))].into();
    candle_core::safetensors::save(&wrong_dim, dir.join("h2.safetensors")).unwrap();
    assert_mentions(&load_err("aesthetic", &dir, Some(dir.join("h2.safetensors"))), &["h2.safetensors", "8-dim", "16"]);

    // A correct copy loads, and reads its normalisation from preprocessor_config.json.
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "size": {"shortest_edge": 32}}"#,
    )
    .unwrap();
    let model = ClipRewardModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let p = model.preprocessor();
    assert_eq!((p.size, p.mean, p.std), (32, [0.5; 3], [0.25, 0.5, 1.0]));
    let cfg = RewardConfig { path: Some(dir.clone()), ..RewardConfig::of_kind("clip_score") };
    let reward = load_clip_reward("clip_score", &cfg, &Device::Cpu).unwrap();
    assert!(reward.differentiable());
    let images = Tensor::full(0.5f32, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let pixels = values(&model.pixel_values(&images).unwrap());
    assert!(pixels.iter().all(|v| v.abs() < 1e-6), "0.5 - mean 0.5 must normalise to 0");
}
