//! CLIP-based rewards: `clip_score` (image–prompt similarity) and `aesthetic` (LAION
//! aesthetic-predictor head over the CLIP image embedding).
//!
//! Both are differentiable. Preprocessing happens inside the reward with differentiable ops, as
//! ReNO does: bicubic resize of the short side to the tower's `image_size` (two matrix products
//! that reproduce `torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
//! antialias=False)`), center crop, CLIP mean/std normalisation. candle's own resize ops have no
//! backward pass, and a matrix product is exact and differentiable. Note that transformers'
//! `CLIPImageProcessor` resizes with PIL (antialiased), so scores of strongly downscaled images
//! differ slightly from a PIL-preprocessed evaluation.
//!
//! A model directory holds `config.json` (a `CLIPModel` config), `model.safetensors`, the
//! tokenizer files (`vocab.json` + `merges.txt` or `tokenizer.json`) and optionally
//! `preprocessor_config.json` (for `image_mean` / `image_std`). PickScore and other checkpoints in
//! the `CLIPModel` layout load the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::{image_dims, Reward, RewardConfig, RewardError, RewardResult};
use crate::error::{Result, TillerError};
use crate::models::clip_vision::ClipModel;
use crate::models::nn::Linear;
use crate::models::tokenizer::ClipTokenizer;

/// OpenAI CLIP's normalisation, used when the model has no `preprocessor_config.json`.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// File name of the aesthetic head looked up in the model directory when `head` is not set.
pub const DEFAULT_HEAD_FILE: &str = "aesthetic_head.safetensors";

/// At most this many prompt embeddings are kept; the cache is emptied when it is full.
const TEXT_CACHE_LIMIT: usize = 512;

/// torch's bicubic convolution coefficient.
const CUBIC_A: f64 = -0.75;

/// (out × in) row-major matrix `M` with `resize(x) = M·x` along one axis, for torch's bicubic
/// upsampling with `align_corners=False` and no antialiasing: source coordinate
/// `(i + 0.5)·in/out − 0.5` (not clamped), four taps with A = −0.75, taps outside the input
/// clamped to the border.
pub fn bicubic_matrix(input: usize, output: usize) -> Vec<f64> {
    bicubic_rows(input, output, 0..output)
}

/// Only the rows `rows` of [`bicubic_matrix`]: a center crop needs `size` rows of a resize whose
/// long side can be much longer.
fn bicubic_rows(input: usize, output: usize, rows: std::ops::Range<usize>) -> Vec<f64> {
    let cc1 = |x: f64| ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f64| ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A;
    let scale = input as f64 / output as f64;
    let mut m = vec![0.0; rows.len() * input];
    for (r, i) in rows.enumerate() {
        let real = scale * (i as f64 + 0.5) - 0.5;
        let base = real.floor();
        let t = real - base;
        let weights = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
        for (k, w) in weights.into_iter().enumerate() {
            let j = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[r * input + j] += w;
        }
    }
    m
}

/// Differentiable CLIP image preprocessing: images in [0, 1] (N, 3, H, W) → normalised pixel
/// values (N, 3, size, size).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    pub size: usize,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ClipPreprocess {
    /// OpenAI CLIP's mean and std.
    pub fn new(size: usize) -> Self {
        Self { size, mean: CLIP_MEAN, std: CLIP_STD }
    }

    /// Mean and std from `dir/preprocessor_config.json` when the file exists.
    pub fn from_dir(dir: &Path, size: usize) -> Result<Self> {
        let mut p = Self::new(size);
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(p);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| TillerError::file(&path, format!("cannot read: {e}")))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| TillerError::file(&path, format!("malformed JSON: {e}")))?;
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            let bad = || TillerError::file(&path, format!("`{key}` must be a number or a list of 3 numbers"));
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => Ok([n.as_f64().ok_or_else(bad)?; 3]),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(bad)?;
                    }
                    Ok(out)
                }
                Some(_) => Err(bad()),
            }
        };
        p.mean = triple("image_mean", CLIP_MEAN)?;
        p.std = triple("image_std", CLIP_STD)?;
        if p.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || p.mean.iter().any(|m| !m.is_finite()) {
            return Err(TillerError::file(&path, "`image_std` must be positive and `image_mean` finite"));
        }
        Ok(p)
    }

    /// (height, width) after resizing the short side to `size`; the long side is
    /// `floor(size · long / short)`, as transformers' and torchvision's resize compute it.
    pub fn resized_dims(&self, h: usize, w: usize) -> (usize, usize) {
        let s = self.size;
        if h <= w {
            (s, s * w / h)
        } else {
            (s * h / w, s)
        }
    }

    /// Resize, center crop (offset `floor((resized − size) / 2)`) and normalise; stays in the
    /// autograd graph of `images` and keeps their dtype.
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = images.dims4()?;
        if c != 3 || h == 0 || w == 0 {
            candle_core::bail!("CLIP preprocessing expects (N, 3, H, W) images, got {:?}", images.dims());
        }
        let s = self.size;
        let (rh, rw) = self.resized_dims(h, w);
        let (top, left) = ((rh - s) / 2, (rw - s) / 2);
        let dtype = images.dtype();
        let device = images.device();
        // Resize and crop in one product per axis: keep only the matrix rows of the crop. When an
        // axis keeps its length the resize is the identity and the crop a plain slice.
        let axis = |x: &Tensor, input: usize, resized: usize, offset: usize| -> candle_core::Result<Tensor> {
            if resized == input {
                return x.narrow(1, offset, s)?.contiguous();
            }
            let rows = bicubic_rows(input, resized, offset..offset + s);
            let mt = Tensor::from_vec(rows, (s, input), device)?.to_dtype(dtype)?.t()?.contiguous()?;
            x.matmul(&mt)
        };
        let x = axis(&images.contiguous()?.reshape((n * c * h, w))?, w, rw, left)?;
        let x = x.reshape((n * c, h, s))?.transpose(1, 2)?.contiguous()?.reshape((n * c * s, h))?;
        let x = axis(&x, h, rh, top)?;
        let x = x.reshape((n, c, s, s))?.transpose(2, 3)?.contiguous()?;
        let stat = |v: [f64; 3]| Tensor::from_slice(&v, (1, 3, 1, 1), device)?.to_dtype(dtype);
        x.broadcast_sub(&stat(self.mean)?)?.broadcast_div(&stat(self.std)?)
    }
}

/// A CLIP model with its tokenizer and preprocessing, shared by the CLIP rewards.
pub struct ClipRewardModel {
    clip: ClipModel,
    tokenizer: ClipTokenizer,
    preprocess: ClipPreprocess,
    dtype: DType,
    device: Device,
    text_cache: Mutex<HashMap<String, Tensor>>,
}

impl ClipRewardModel {
    /// Load a CLIP model directory (see the module docs) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let clip = ClipModel::load(dir, dtype, device)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let preprocess = ClipPreprocess::from_dir(dir, clip.config().vision.image_size)?;
        Ok(Self { clip, tokenizer, preprocess, dtype, device: device.clone(), text_cache: Mutex::new(HashMap::new()) })
    }

    pub fn clip(&self) -> &ClipModel {
        &self.clip
    }

    pub fn preprocessor(&self) -> &ClipPreprocess {
        &self.preprocess
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token ids of `prompt`, padded as the tokenizer pads and cut to the text tower's length
    /// (keeping an end-of-text token, where the pooled output is read).
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(prompt)?.ids;
        let max = self.clip.config().text.max_position_embeddings;
        if ids.len() > max {
            ids.truncate(max);
            let eos = self.tokenizer.eos_id();
            if !ids.contains(&eos) {
                if let Some(last) = ids.last_mut() {
                    *last = eos;
                }
            }
        }
        Ok(ids)
    }

    /// (1, P) projected text embedding of `prompt` (not normalised), computed once per prompt.
    pub fn text_embeds(&self, prompt: &str) -> Result<Tensor> {
        let mut cache = self.text_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(prompt) {
            return Ok(t.clone());
        }
        let ids = Tensor::new(self.token_ids(prompt)?.as_slice(), &self.device)?.unsqueeze(0)?;
        let embeds = self.clip.text_embeds(&ids)?;
        if cache.len() >= TEXT_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(prompt.to_string(), embeds.clone());
        Ok(embeds)
    }

    /// Images in [0, 1] (N, 3, H, W), any device and float dtype → normalised pixel values
    /// (N, 3, S, S) in the model's dtype on its device.
    pub fn pixel_values(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.preprocess.forward(&images.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// (N, P) projected image embeddings (not normalised) of images in [0, 1].
    pub fn image_embeds(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.clip.image_embeds(&self.pixel_values(images)?)
    }

    /// (N,) `logit_scale.exp() · cos(image, prompt)` in the model's dtype, differentiable in
    /// `images`.
    pub fn clip_score(&self, images: &Tensor, prompt: &str) -> RewardResult<Tensor> {
        let text = l2_normalize(&self.text_embeds(prompt).map_err(internal)?)?;
        let image = l2_normalize(&self.image_embeds(images)?)?;
        Ok((image.broadcast_mul(&text)?.sum(1)? * self.clip.logit_scale().exp())?)
    }
}

/// Rows scaled to unit L2 norm. The tiny epsilon only keeps an all-zero row from producing NaN
/// gradients; it is far below the squared norm of any real embedding.
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)
}

/// A failure that is neither the request's nor an upstream's fault (e.g. the tokenizer).
fn internal(e: TillerError) -> RewardError {
    match e {
        TillerError::Candle(c) => RewardError::Candle(c),
        other => RewardError::Candle(candle_core::Error::Msg(other.to_string())),
    }
}

/// Tensor shapes of one head layer, as found in the file.
#[derive(Default)]
struct LayerShapes {
    weight: Option<Vec<usize>>,
    bias: Option<Vec<usize>>,
}

/// The LAION aesthetic-predictor MLP: `layers.{i}.weight` / `layers.{i}.bias` Linear layers applied
/// in index order without activations (the published v2 model; its dropouts are identity at
/// inference). Sizes come from the tensors.
pub struct AestheticHead {
    layers: Vec<Linear>,
    input_dim: usize,
}

impl AestheticHead {
    /// Load a safetensors file; errors name the file.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(TillerError::file(path, "aesthetic head file is missing"));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "pth" | "pt" | "bin" | "ckpt") {
            return Err(TillerError::file(
                path,
                "PyTorch pickle weights are not loaded (unsafe to unpickle); convert them to safetensors",
            ));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| TillerError::file(path, format!("not a valid safetensors file: {e}")))?;
        Self::from_tensors(tensors, dtype, device).map_err(|e| TillerError::file(path, e))
    }

    /// Build from tensors named `layers.{i}.{weight,bias}`.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        let layout = "expected LAION aesthetic-predictor tensors `layers.N.weight` / `layers.N.bias`";
        let mut shapes: BTreeMap<usize, LayerShapes> = BTreeMap::new();
        for (name, t) in &tensors {
            let parsed = name.strip_prefix("layers.").and_then(|rest| rest.split_once('.')).and_then(|(i, kind)| {
                let i = i.parse::<usize>().ok()?;
                matches!(kind, "weight" | "bias").then_some((i, kind))
            });
            let Some((i, kind)) = parsed else {
                return Err(format!("unexpected tensor `{name}`; {layout}"));
            };
            let entry = shapes.entry(i).or_default();
            let dims = Some(t.dims().to_vec());
            if kind == "weight" {
                entry.weight = dims;
            } else {
                entry.bias = dims;
            }
        }
        if shapes.is_empty() {
            return Err(format!("no tensors; {layout}"));
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let mut layers = Vec::with_capacity(shapes.len());
        let mut width: Option<usize> = None;
        let mut input_dim = 0;
        for (i, LayerShapes { weight, bias }) in &shapes {
            let Some([out_dim, in_dim]) = weight.as_deref().and_then(|d| <[usize; 2]>::try_from(d).ok()) else {
                return Err(format!("`layers.{i}.weight` must exist and be 2-D (out, in), got {weight:?}"));
            };
            if let Some(b) = bias {
                if b.as_slice() != [out_dim] {
                    return Err(format!("`layers.{i}.bias` has shape {b:?}, expected [{out_dim}]"));
                }
            }
            match width {
                None => input_dim = in_dim,
                Some(w) if w != in_dim => {
                    return Err(format!("`layers.{i}.weight` takes {in_dim} inputs but the previous layer gives {w}"));
                }
                Some(_) => {}
            }
            width = Some(out_dim);
            let layer = Linear::load(vb.pp(format!("layers.{i}")), in_dim, out_dim, bias.is_some())
                .map_err(|e| format!("layers.{i}: {e}"))?;
            layers.push(layer);
        }
        if width != Some(1) {
            return Err(format!("the last layer must give one score, it gives {}", width.unwrap_or(0)));
        }
        Ok(Self { layers, input_dim })
    }

    /// Size of the image embedding the head expects.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// (N, D) L2-normalised image embeddings → (N,) scores.
    pub fn forward(&self, embeds: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = embeds.clone();
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        x.squeeze(1)
    }
}

/// `clip_score`: `logit_scale.exp() · cos(image embedding, prompt embedding)`.
pub struct ClipScoreReward {
    name: String,
    model: Arc<ClipRewardModel>,
}

impl ClipScoreReward {
    pub fn new(model: Arc<ClipRewardModel>) -> Self {
        Self { name: "clip_score".into(), model }
    }

    /// The same reward under a configured name.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self { name: name.into(), ..self }
    }

    pub fn model(&self) -> &Arc<ClipRewardModel> {
        &self.model
    }
}

impl Reward for ClipScoreReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn differentiable(&self) -> bool {
        true
    }

    fn score_tensor(&self, images: &Tensor, prompt: &str) -> RewardResult<Tensor> {
        image_dims(images)?;
        Ok(self.model.clip_score(images, prompt)?.to_dtype(DType::F32)?)
    }
}

/// `aesthetic`: the LAION aesthetic predictor on the L2-normalised CLIP image embedding.
pub struct AestheticReward {
    name: String,
    model: Arc<ClipRewardModel>,
    head: AestheticHead,
}

impl AestheticReward {
    /// Fails when the head does not take the model's embedding size.
    pub fn new(model: Arc<ClipRewardModel>, head: AestheticHead) -> std::result::Result<Self, String> {
        let dim = model.clip().config().projection_dim;
        if head.input_dim() != dim {
            return Err(format!("the head takes {}-dim embeddings but the CLIP model gives {dim}", head.input_dim()));
        }
        Ok(Self { name: "aesthetic".into(), model, head })
    }

    /// The same reward under a configured name.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self { name: name.into(), ..self }
    }

    /// (N,) scores in the model's dtype, differentiable in `images`.
    pub fn aesthetic(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&l2_normalize(&self.model.image_embeds(images)?)?)
    }
}

impl Reward for AestheticReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn differentiable(&self) -> bool {
        true
    }

    fn score_tensor(&self, images: &Tensor, _prompt: &str) -> RewardResult<Tensor> {
        image_dims(images)?;
        Ok(self.aesthetic(images)?.to_dtype(DType::F32)?)
    }
}

/// Load a CLIP-based reward of `kind` (`clip_score` or `aesthetic`) from the model directory
/// `cfg.path` (and the head `cfg.head` for `aesthetic`, by default `DEFAULT_HEAD_FILE` in the model
/// directory) onto `device`, in f32.
pub fn load_clip_reward(kind: &str, cfg: &RewardConfig, device: &Device) -> Result<Arc<dyn Reward>> {
    if !matches!(kind, "clip_score" | "aesthetic") {
        return Err(TillerError::field("kind", format!("`{kind}` is not a CLIP reward (clip_score, aesthetic)")));
    }
    let dir =
        cfg.path.as_deref().ok_or_else(|| TillerError::field("path", "a CLIP reward needs the model directory"))?;
    let head_path: Option<PathBuf> = match (kind, &cfg.head) {
        ("aesthetic", Some(p)) => Some(p.clone()),
        ("aesthetic", None) => {
            let p = dir.join(DEFAULT_HEAD_FILE);
            if !p.is_file() {
                return Err(TillerError::file(
                    &p,
                    "missing: an aesthetic reward needs `head` (the aesthetic MLP safetensors file)",
                ));
            }
            Some(p)
        }
        _ => None,
    };
    // Read the head first: it is small, and a bad file should not wait for the CLIP weights.
    let head = match &head_path {
        Some(p) => Some(AestheticHead::load(p, DType::F32, device)?),
        None => None,
    };
    let model = Arc::new(ClipRewardModel::load(dir, DType::F32, device)?);
    Ok(match head {
        None => Arc::new(ClipScoreReward::new(model)),
        Some(head) => {
            let path = head_path.unwrap_or_default();
            Arc::new(AestheticReward::new(model, head).map_err(|e| TillerError::file(path, e))?)
        }
    })
}
