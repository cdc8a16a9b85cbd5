//! LoRA adapter costs on the medium random-weight SD model of `benches/models.rs` (UNet
//! 64/128/256, 2 layers per block, 32×32 latents, plus a 2-layer 768-wide random CLIP text
//! encoder) and the sd15-tiny fixture.
//!
//! For each model it writes random LoRAs into `target/bench-adapters/` (PEFT and kohya layouts of
//! the same factors, f16, rank 8 and 64) covering every attention projection, feed-forward,
//! proj_in/proj_out, the resnet convolutions (LoCon) and the text encoder's attention and MLP, then
//! times: `Adapter::load` (read + parse + validate), `resolve` against the model, building a merged
//! variant (cold) and an unmerged one, switching to a cached variant and back to the base model
//! through `VariantCache::get`, and UNet steps of the base, merged and unmerged models (batch 1
//! and 2, same latent, timestep and context). Medians of wall-clock repetitions with candle's
//! default thread count; ratios are against baselines measured in the same run.
//!
//! `cargo bench --bench adapters` prints markdown tables and writes
//! `target/bench-adapters/results.json`. `TILLER_BENCH_REPS` sets the repetitions of the medium
//! model's UNet steps (default 7); other timings use fixed counts. Arguments that are not flags
//! filter models by name (`cargo bench --bench adapters -- tiny`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tiller::adapters::apply::{delta, merge, resolve, unmerged, ResolvedLayer};
use tiller::adapters::registry::{MergePolicy, VariantCache};
use tiller::adapters::{file, lora};
use tiller::adapters::{Adapter, AdapterSet, Component};
use tiller::models::clip_text::{ClipTextConfig, ClipTextModel};
use tiller::models::random_init::{write_random_unet, write_random_vae};
use tiller::models::stable_diffusion::{LoadOptions, StableDiffusion};
use tiller::models::unet_2d::{PerBlock, UNet2DConditionModel, UNet2DConfig};
use tiller::models::weights::{load_component, read_config};
use tiller::models::DiffusionModel;
use tiller::models::{cpu_kernels, nn};
use tiller::sampling::SeededNoise;

const RANKS: [usize; 2] = [8, 64];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    root().join("target/bench-adapters")
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median wall time in ms of `reps` calls after one warm-up call.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let s = Instant::now();
                f();
                ms_since(s)
            })
            .collect(),
    )
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(SeededNoise::new(seed).sample_vec(n), shape, &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Models

/// The medium UNet + VAE of `benches/models.rs` (same configs and seeds; reused when present).
fn medium_models_dir() -> PathBuf {
    let dir = root().join("target/bench-models/medium");
    if !dir.join("unet/diffusion_pytorch_model.safetensors").is_file() {
        let unet = json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": 32, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [64, 128, 256], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 4, "norm_num_groups": 32,
            "use_linear_projection": false
        });
        let vae = json!({
            "_class_name": "AutoencoderKL",
            "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [64, 128, 256], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "sample_size": 128, "scaling_factor": 0.18215
        });
        write_random_unet(&dir.join("unet"), &unet, 1).unwrap();
        write_random_vae(&dir.join("vae"), &vae, 2).unwrap();
    }
    dir
}

/// Random CLIP text encoder weights (norms ≈ 1, small biases, N(0, 1/fan_in) elsewhere), saved
/// under transformers' `text_model.` names.
fn write_random_text_encoder(dir: &Path, config: &Value, seed: u64) {
    let cfg: ClipTextConfig = serde_json::from_value(config.clone()).unwrap();
    let vm = VarMap::new();
    ClipTextModel::load(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("text_model"), &cfg).unwrap();
    {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut noise = SeededNoise::new(seed);
        for name in names {
            let var = &data[name];
            let shape = var.shape().clone();
            let z = Tensor::from_vec(noise.sample_vec(shape.elem_count()), shape.clone(), &Device::Cpu).unwrap();
            let v = if name.ends_with("bias") {
                (z * 0.02).unwrap()
            } else if name.contains("norm") {
                ((z * 0.05).unwrap() + 1.0).unwrap()
            } else {
                let fan_in: usize = shape.dims()[1..].iter().product::<usize>().max(1);
                (z * (1.0 / (fan_in as f64).sqrt())).unwrap()
            };
            var.set(&v).unwrap();
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    vm.save(dir.join("model.safetensors")).unwrap();
}

fn link_or_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// A loadable pipeline directory around the medium UNet/VAE: tokenizer, scheduler and
/// model_index.json from sd15-tiny, and a random 768-wide text encoder (the UNet's
/// cross_attention_dim) with 2 layers.
fn medium_pipeline_dir() -> PathBuf {
    let dir = out_dir().join("medium-sd");
    let te_weights = dir.join("text_encoder/model.safetensors");
    let unet_weights = dir.join("unet/diffusion_pytorch_model.safetensors");
    if te_weights.is_file() && unet_weights.is_file() {
        return dir;
    }
    let models = medium_models_dir();
    let fixture = root().join("tests/fixtures/models/sd15-tiny");
    for comp in ["unet", "vae"] {
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            link_or_copy(&models.join(comp).join(f), &dir.join(comp).join(f));
        }
    }
    for f in ["model_index.json", "scheduler/scheduler_config.json"] {
        link_or_copy(&fixture.join(f), &dir.join(f));
    }
    for e in std::fs::read_dir(fixture.join("tokenizer")).unwrap() {
        let p = e.unwrap().path();
        link_or_copy(&p, &dir.join("tokenizer").join(p.file_name().unwrap()));
    }
    let tok: Value = read_config(&fixture.join("text_encoder/config.json")).unwrap();
    let te = json!({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": tok["vocab_size"], "bos_token_id": tok["bos_token_id"],
        "eos_token_id": tok["eos_token_id"], "pad_token_id": tok["pad_token_id"],
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 2, "num_attention_heads": 12,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    });
    write_random_text_encoder(&dir.join("text_encoder"), &te, 3);
    dir
}

fn load_model(name: &str, dir: &Path) -> StableDiffusion {
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, variant: None, clip_skip: 0 };
    StableDiffusion::load(name, dir, &opts).unwrap()
}

// ---------------------------------------------------------------------------------------------
// LoRA files

/// A module that takes a LoRA: component, module path, weight shape.
struct Target {
    component: Component,
    module: String,
    shape: Vec<usize>,
}

fn takes_lora(c: Component, module: &str) -> bool {
    const ATTN: [&str; 12] = [
        ".attn1.to_q",
        ".attn1.to_k",
        ".attn1.to_v",
        ".attn1.to_out.0",
        ".attn2.to_q",
        ".attn2.to_k",
        ".attn2.to_v",
        ".attn2.to_out.0",
        ".ff.net.0.proj",
        ".ff.net.2",
        ".proj_in",
        ".proj_out",
    ];
    const RESNET: [&str; 3] = [".conv1", ".conv2", ".conv_shortcut"];
    const TEXT: [&str; 6] =
        [".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj", ".mlp.fc1", ".mlp.fc2"];
    let any = |set: &[&str]| set.iter().any(|s| module.ends_with(s));
    match c {
        Component::Unet => {
            (module.contains(".attentions.") && any(&ATTN)) || (module.contains(".resnets.") && any(&RESNET))
        }
        _ => module.contains(".layers.") && any(&TEXT),
    }
}

/// Every LoRA target of the model's UNet and text encoder, from the weight files' headers.
fn targets(model_dir: &Path) -> Vec<Target> {
    let mut out = Vec::new();
    for (c, file) in [
        (Component::Unet, "unet/diffusion_pytorch_model.safetensors"),
        (Component::TextEncoder, "text_encoder/model.safetensors"),
    ] {
        let bytes = std::fs::read(model_dir.join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut found: Vec<Target> = st
            .tensors()
            .into_iter()
            .filter_map(|(k, v)| {
                let module = k.strip_suffix(".weight")?;
                let ok = matches!(v.shape().len(), 2 | 4) && takes_lora(c, module);
                ok.then(|| Target { component: c, module: module.to_string(), shape: v.shape().to_vec() })
            })
            .collect();
        found.sort_by(|a, b| a.module.cmp(&b.module));
        out.extend(found);
    }
    out
}

fn f16_bytes(t: &Tensor) -> Vec<u8> {
    let v = t.to_dtype(DType::F16).unwrap().flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], metadata: HashMap<String, String>) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, dt, shape, data)| (k.clone(), TensorView::new(*dt, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize(views, Some(metadata)).unwrap()
}

/// Write the PEFT (diffusers `save_lora_weights`) and kohya files of one random LoRA with the
/// same factors (f16) and alpha = rank / 2; returns their paths.
fn write_lora(targets: &[Target], stem: &str, rank: usize, seed: u64) -> (PathBuf, PathBuf) {
    let alpha = rank as f64 / 2.0;
    let mut noise = SeededNoise::new(seed);
    let mut peft = Vec::new();
    let mut kohya = Vec::new();
    for t in targets {
        let (out, inp) = (t.shape[0], t.shape[1]);
        let mut down_shape = vec![rank, inp];
        let mut up_shape = vec![out, rank];
        if t.shape.len() == 4 {
            down_shape.extend_from_slice(&t.shape[2..]);
            up_shape.extend_from_slice(&[1, 1]);
        }
        let fan_in: usize = down_shape[1..].iter().product();
        let mut draw = |shape: &[usize], std: f64| {
            let n = shape.iter().product();
            let z = Tensor::from_vec(noise.sample_vec(n), shape, &Device::Cpu).unwrap();
            f16_bytes(&(z * std).unwrap())
        };
        let down = draw(&down_shape, 1.0 / (fan_in as f64).sqrt());
        let up = draw(&up_shape, 0.1 / (rank as f64).sqrt());
        let (peft_prefix, kohya_prefix) = match t.component {
            Component::Unet => ("unet", "lora_unet"),
            _ => ("text_encoder", "lora_te"),
        };
        let p = format!("{peft_prefix}.{}", t.module);
        peft.push((format!("{p}.lora_A.weight"), Dtype::F16, down_shape.clone(), down.clone()));
        peft.push((format!("{p}.lora_B.weight"), Dtype::F16, up_shape.clone(), up.clone()));
        let k = format!("{kohya_prefix}_{}", t.module.replace('.', "_"));
        kohya.push((format!("{k}.lora_down.weight"), Dtype::F16, down_shape, down));
        kohya.push((format!("{k}.lora_up.weight"), Dtype::F16, up_shape, up));
        kohya.push((format!("{k}.alpha"), Dtype::F32, vec![], (alpha as f32).to_le_bytes().to_vec()));
    }
    let peft_meta = json!({
        "unet.r": rank, "unet.lora_alpha": alpha, "text_encoder.r": rank, "text_encoder.lora_alpha": alpha
    });
    let peft_meta = HashMap::from([("lora_adapter_metadata".to_string(), peft_meta.to_string())]);
    let kohya_meta = HashMap::from([
        ("ss_network_dim".to_string(), rank.to_string()),
        ("ss_network_alpha".to_string(), alpha.to_string()),
        ("ss_network_module".to_string(), "networks.lora".to_string()),
    ]);
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (pp, kp) = (dir.join(format!("{stem}-peft.safetensors")), dir.join(format!("{stem}-kohya.safetensors")));
    std::fs::write(&pp, serialize(&peft, peft_meta)).unwrap();
    std::fs::write(&kp, serialize(&kohya, kohya_meta)).unwrap();
    (pp, kp)
}

// ---------------------------------------------------------------------------------------------
// Measurements

struct Case {
    name: &'static str,
    dir: PathBuf,
    /// Repetitions of UNet steps (each rep runs every variant once, interleaved).
    step_reps: usize,
    /// Repetitions of loads and builds.
    build_reps: usize,
}

/// One rank's adapter on one model.
struct Prepared {
    rank: usize,
    adapter: Arc<Adapter>,
    layers: Vec<ResolvedLayer>,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Interleaved step timings: each repetition runs every UNet once, so drift from other load on
/// the machine hits all of them alike. Returns the median and the minimum per UNet.
fn step_times(unets: &[&UNet2DConditionModel], x: &Tensor, ctx: &Tensor, reps: usize) -> Vec<(f64, f64)> {
    let mut times = vec![Vec::with_capacity(reps); unets.len()];
    for u in unets {
        u.forward(x, &tiller::models::timesteps(500.0, x.dim(0).unwrap(), x.device()).unwrap(), ctx, None).unwrap();
    }
    for _ in 0..reps {
        for (i, u) in unets.iter().enumerate() {
            let s = Instant::now();
            u.forward(x, &tiller::models::timesteps(500.0, x.dim(0).unwrap(), x.device()).unwrap(), ctx, None).unwrap();
            times[i].push(ms_since(s));
        }
    }
    times.into_iter().map(|t| (median(t.clone()), t.iter().cloned().fold(f64::INFINITY, f64::min))).collect()
}

fn only(layers: &[ResolvedLayer], keep: impl Fn(&ResolvedLayer) -> bool) -> Vec<ResolvedLayer> {
    layers.iter().filter(|l| keep(l)).cloned().collect()
}

/// Where `Adapter::load` spends its time: reading the bytes, `file::parse_safetensors` (header
/// checks, tensors built, every value checked finite), of which the finiteness check alone (as
/// file.rs does it: to f64, to a Vec), and `lora::parse` (pairing, f32, scales).
fn load_breakdown(path: &Path, reps: usize) -> Value {
    let mut bytes = Vec::new();
    let read = median_ms(reps, || bytes = file::read_limited(path, file::MAX_FILE_BYTES).unwrap());
    let mut parsed = (HashMap::new(), HashMap::new());
    let validate = median_ms(reps, || parsed = file::parse_safetensors(&bytes).unwrap());
    let finite = median_ms(reps, || {
        for t in parsed.0.values() {
            let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
    });
    let normalise = median_ms(reps, || {
        lora::parse(parsed.0.clone(), &parsed.1, &lora::ScalingSources::default()).unwrap();
    });
    json!({"read": read, "parse_safetensors": validate, "of_which_finite_check": finite, "lora_parse": normalise})
}

/// Side of the feature map a UNet module works on (its output for down/upsamplers).
fn module_side(module: &str, side: usize, blocks: usize) -> usize {
    let index = |prefix: &str| -> Option<usize> { module.strip_prefix(prefix)?.split('.').next()?.parse().ok() };
    if let Some(i) = index("down_blocks.") {
        side >> (i + usize::from(module.contains(".downsamplers.")))
    } else if module.starts_with("mid_block.") {
        side >> (blocks - 1)
    } else if let Some(i) = index("up_blocks.") {
        side >> (blocks - 1 - i - usize::from(module.contains(".upsamplers.")))
    } else {
        side
    }
}

/// Rows a linear/conv layer of the UNet processes per image.
fn module_tokens(module: &str, side: usize, blocks: usize, ctx_len: usize) -> usize {
    if module.ends_with("attn2.to_k") || module.ends_with("attn2.to_v") {
        ctx_len
    } else if module.contains("time_emb") {
        1
    } else {
        module_side(module, side, blocks).pow(2)
    }
}

/// Multiply-add FLOPs per image of one UNet step: every linear and conv weight plus the attention
/// score and value products (norms, softmax and elementwise ops are not counted).
fn unet_flops(weights: &HashMap<String, Tensor>, side: usize, blocks: usize, ctx_len: usize) -> f64 {
    let mut total = 0.0;
    for (k, t) in weights {
        let Some(module) = k.strip_suffix(".weight") else { continue };
        if !matches!(t.rank(), 2 | 4) {
            continue;
        }
        let n = module_tokens(module, side, blocks, ctx_len) as f64;
        total += 2.0 * n * t.elem_count() as f64;
        let c = t.dims()[0] as f64;
        let pixels = module_side(module, side, blocks).pow(2) as f64;
        if module.ends_with("attn1.to_q") {
            total += 4.0 * pixels * pixels * c;
        } else if module.ends_with("attn2.to_q") {
            total += 4.0 * pixels * ctx_len as f64 * c;
        }
    }
    total
}

/// Extra FLOPs per image of the unmerged path: x·Aᵀ then ·Bᵀ for every UNet layer.
fn lora_flops(layers: &[ResolvedLayer], side: usize, blocks: usize, ctx_len: usize) -> f64 {
    layers
        .iter()
        .filter(|l| l.component == Component::Unet)
        .map(|l| {
            let n = module_tokens(&l.module, side, blocks, ctx_len) as f64;
            2.0 * n * (l.down.elem_count() + l.up.elem_count()) as f64
        })
        .sum()
}

/// One adapted UNet layer alone at batch 1: the base layer, the layer with each rank's unmerged
/// LoRA, and for convolutions the LoRA's k×k down-projection alone (`cpu_kernels::conv2d` builds
/// the same im2col patch matrix for it as for the base kernel, whatever the rank).
fn layer_bench(
    module: &str,
    weights: &HashMap<String, Tensor>,
    prepared: &[Prepared],
    side: usize,
    blocks: usize,
) -> Value {
    let w = &weights[&format!("{module}.weight")];
    let bias = weights.get(&format!("{module}.bias"));
    let (out, inp) = (w.dims()[0], w.dims()[1]);
    let conv = w.rank() == 4;
    let s = module_side(module, side, blocks);
    let x = if conv { randn(&[1, inp, s, s], 7) } else { randn(&[1, s * s, inp], 7) };
    let layer = |lora: Option<&ResolvedLayer>| -> Box<dyn Module> {
        let mut m = HashMap::from([("weight".to_string(), w.clone())]);
        if let Some(b) = bias {
            m.insert("bias".into(), b.clone());
        }
        if let Some(l) = lora {
            m.insert("lora.0.down".into(), l.down.clone());
            m.insert("lora.0.up".into(), l.up.clone());
            m.insert("lora.0.scale".into(), Tensor::new(&[l.scale as f32], &Device::Cpu).unwrap());
        }
        let vb = VarBuilder::from_tensors(m, DType::F32, &Device::Cpu);
        if conv {
            let k = w.dims()[2];
            Box::new(nn::Conv2d::load(vb, inp, out, k, 1, k / 2).unwrap())
        } else {
            Box::new(nn::Linear::load(vb, inp, out, bias.is_some()).unwrap())
        }
    };
    // Interleaved: each repetition runs every variant once.
    let mut names = vec!["base_ms".to_string()];
    let mut runs: Vec<Box<dyn Fn()>> = Vec::new();
    let base = layer(None);
    let xb = x.clone();
    runs.push(Box::new(move || drop(base.forward(&xb).unwrap())));
    for p in prepared {
        let l = p.layers.iter().find(|l| l.module == module).unwrap();
        let m = layer(Some(l));
        let xl = x.clone();
        names.push(format!("r{}_ms", p.rank));
        runs.push(Box::new(move || drop(m.forward(&xl).unwrap())));
        if conv {
            let (xd, down, pad) = (x.clone(), l.down.clone(), w.dims()[2] / 2);
            names.push(format!("r{}_down_conv_ms", p.rank));
            runs.push(Box::new(move || drop(cpu_kernels::conv2d(&xd, &down, None, 1, pad).unwrap().unwrap())));
        }
    }
    let mut times = vec![Vec::new(); runs.len()];
    for f in &runs {
        f();
    }
    for _ in 0..40 {
        for (i, f) in runs.iter().enumerate() {
            let t = Instant::now();
            f();
            times[i].push(ms_since(t));
        }
    }
    let mut r = serde_json::Map::new();
    r.insert("module".into(), json!(module));
    r.insert("weight_shape".into(), json!(w.dims()));
    r.insert("rows".into(), json!(s * s));
    for (name, t) in names.into_iter().zip(times) {
        let min = t.iter().cloned().fold(f64::INFINITY, f64::min);
        r.insert(name, json!({"median": median(t), "min": min}));
    }
    Value::Object(r)
}

fn bench_case(c: &Case) -> Value {
    let mut out = serde_json::Map::new();
    let t = Instant::now();
    let base = Arc::new(load_model(c.name, &c.dir));
    out.insert("model_load_ms".into(), json!(ms_since(t)));
    let targets = targets(&c.dir);
    let count = |comp: Component| targets.iter().filter(|t| t.component == comp).count();
    out.insert(
        "modules".into(),
        json!({"unet": count(Component::Unet), "text_encoder": count(Component::TextEncoder)}),
    );

    // Base weights again, for the breakdown of builds and the memory figures.
    let unet_w =
        load_component(&c.dir.join("unet"), "diffusion_pytorch_model", None, DType::F32, &Device::Cpu).unwrap();
    let te_w = load_component(&c.dir.join("text_encoder"), "model", None, DType::F32, &Device::Cpu).unwrap();
    let ucfg: UNet2DConfig = read_config(&c.dir.join("unet/config.json")).unwrap();
    let tcfg: ClipTextConfig = read_config(&c.dir.join("text_encoder/config.json")).unwrap();
    let unet_bytes: usize = unet_w.tensors.values().map(tensor_bytes).sum();
    let te_bytes: usize = te_w.tensors.values().map(tensor_bytes).sum();
    out.insert("base_unet_bytes".into(), json!(unet_bytes));
    out.insert("base_text_encoder_bytes".into(), json!(te_bytes));

    let mut prepared = Vec::new();
    let mut per_rank = serde_json::Map::new();
    for (i, &rank) in RANKS.iter().enumerate() {
        let mut r = serde_json::Map::new();
        let stem = format!("{}-r{rank}", c.name);
        let (peft_path, kohya_path) = write_lora(&targets, &stem, rank, 100 + i as u64);
        r.insert("peft_file_bytes".into(), json!(std::fs::metadata(&peft_path).unwrap().len()));
        r.insert("kohya_file_bytes".into(), json!(std::fs::metadata(&kohya_path).unwrap().len()));

        // (a) load from disk: read + validate + parse.
        let load_peft = median_ms(c.build_reps, || {
            Adapter::load(&stem, &peft_path).unwrap();
        });
        let load_kohya = median_ms(c.build_reps, || {
            Adapter::load(&stem, &kohya_path).unwrap();
        });
        r.insert("load_peft_ms".into(), json!(load_peft));
        r.insert("load_kohya_ms".into(), json!(load_kohya));
        r.insert("load_peft_breakdown_ms".into(), load_breakdown(&peft_path, c.build_reps));
        let adapter = Adapter::load(&stem, &peft_path).unwrap();
        let kohya = Adapter::load(&stem, &kohya_path).unwrap();
        assert_eq!(adapter.file.layers.len(), targets.len());
        assert_eq!(kohya.file.layers.len(), targets.len());

        // (b) resolve against the model.
        let index = base.adapter_targets().unwrap();
        let resolve_ms = median_ms(c.build_reps, || {
            resolve(&adapter.file.layers, index, false).unwrap();
        });
        let resolve_kohya_ms = median_ms(c.build_reps, || {
            resolve(&kohya.file.layers, index, false).unwrap();
        });
        let (layers, warnings) = resolve(&adapter.file.layers, index, false).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(layers.len(), targets.len());
        r.insert("resolve_ms".into(), json!(resolve_ms));
        r.insert("resolve_kohya_ms".into(), json!(resolve_kohya_ms));

        // (c), (d) variant builds (trait call, as the variant cache makes it).
        let set = [(1.0, layers.as_slice())];
        let merged_ms = median_ms(c.build_reps, || {
            DiffusionModel::with_adapters(base.as_ref(), &set, true).unwrap();
        });
        let unmerged_ms = median_ms(c.build_reps, || {
            DiffusionModel::with_adapters(base.as_ref(), &set, false).unwrap();
        });
        r.insert("merged_build_ms".into(), json!(merged_ms));
        r.insert("unmerged_build_ms".into(), json!(unmerged_ms));

        // Where a merged build's time goes.
        let mut merged_unet = HashMap::new();
        let mut merged_te = HashMap::new();
        let merge_unet_ms = median_ms(c.build_reps, || {
            merged_unet = merge(&unet_w.tensors, Component::Unet, &set).unwrap();
        });
        let merge_te_ms = median_ms(c.build_reps, || {
            merged_te = merge(&te_w.tensors, Component::TextEncoder, &set).unwrap();
        });
        let load_unet_ms = median_ms(c.build_reps, || {
            let vb = VarBuilder::from_tensors(merged_unet.clone(), DType::F32, &Device::Cpu);
            UNet2DConditionModel::load(vb, &ucfg).unwrap();
        });
        let load_te_ms = median_ms(c.build_reps, || {
            let vb = VarBuilder::from_tensors(merged_te.clone(), DType::F32, &Device::Cpu);
            ClipTextModel::load(vb, &tcfg).unwrap();
        });
        let unet_layers = only(&layers, |l| l.component == Component::Unet);
        let delta_unet_ms = median_ms(c.build_reps, || {
            for l in &unet_layers {
                delta(l).unwrap();
            }
        });
        let unmerged_unet_ms = median_ms(c.build_reps, || {
            unmerged(&unet_w.tensors, Component::Unet, &set).unwrap();
        });
        r.insert(
            "merged_build_breakdown_ms".into(),
            json!({
                "merge_unet": merge_unet_ms, "merge_text_encoder": merge_te_ms, "deltas_unet": delta_unet_ms,
                "build_unet": load_unet_ms, "build_text_encoder": load_te_ms,
                "unmerged_unet_maps": unmerged_unet_ms
            }),
        );

        // (g) memory: new tensors of a merged variant (one per adapted weight) vs the base.
        let mut new_bytes: BTreeMap<&str, usize> = BTreeMap::new();
        for (comp, base_map, merged_map) in
            [(Component::Unet, &unet_w.tensors, &merged_unet), (Component::TextEncoder, &te_w.tensors, &merged_te)]
        {
            let fresh: usize = merged_map
                .iter()
                .filter(|(k, t)| base_map[k.as_str()].id() != t.id())
                .map(|(_, t)| tensor_bytes(t))
                .sum();
            new_bytes.insert(comp.name(), fresh);
        }
        let factor_bytes: usize = layers.iter().map(|l| tensor_bytes(&l.down) + tensor_bytes(&l.up)).sum();
        r.insert(
            "memory".into(),
            json!({
                "merged_new_unet_bytes": new_bytes["unet"],
                "merged_new_text_encoder_bytes": new_bytes["text_encoder"],
                "merged_new_unet_fraction": new_bytes["unet"] as f64 / unet_bytes as f64,
                "unmerged_factor_bytes": factor_bytes,
            }),
        );
        per_rank.insert(format!("r{rank}"), Value::Object(r));
        prepared.push(Prepared { rank, adapter: Arc::new(adapter), layers });
    }

    // (e) switching through the variant cache (policy Always): cold build, then cached switches
    // alternating between the two ranks' variants, and back to the base model.
    let base_dyn: Arc<dyn DiffusionModel> = base.clone();
    let mut cache = VariantCache::new(usize::MAX, MergePolicy::Always, false);
    let sets: Vec<AdapterSet> = prepared.iter().map(|p| AdapterSet { items: vec![(p.adapter.clone(), 1.0)] }).collect();
    for (p, set) in prepared.iter().zip(&sets) {
        let t = Instant::now();
        let (_, info) = cache.get(c.name, &base_dyn, set).unwrap();
        let cold = ms_since(t);
        let info = info.unwrap();
        assert!(info.merged && !info.cached);
        let r = per_rank[&format!("r{}", p.rank)].as_object_mut().unwrap();
        r.insert("cache_cold_ms".into(), json!(cold));
    }
    let cache_bytes = cache.bytes();
    let empty = AdapterSet::default();
    let (mut switch, mut back) = (vec![Vec::new(); sets.len()], Vec::new());
    for _ in 0..200 {
        for (i, set) in sets.iter().enumerate() {
            let t = Instant::now();
            let (_, info) = cache.get(c.name, &base_dyn, set).unwrap();
            switch[i].push(ms_since(t));
            assert!(info.unwrap().cached);
        }
        let t = Instant::now();
        let (m, info) = cache.get(c.name, &base_dyn, &empty).unwrap();
        back.push(ms_since(t));
        assert!(info.is_none() && Arc::ptr_eq(&m, &base_dyn));
    }
    for (p, times) in prepared.iter().zip(switch) {
        let r = per_rank[&format!("r{}", p.rank)].as_object_mut().unwrap();
        r.insert("cached_switch_ms".into(), json!(median(times.clone())));
        r.insert("cached_switch_max_ms".into(), json!(times.iter().cloned().fold(0.0, f64::max)));
    }
    out.insert("switch_to_base_ms".into(), json!(median(back)));
    out.insert("cache_bytes".into(), json!(cache_bytes));
    drop(cache);

    // (f) UNet steps: base, merged and unmerged per rank; at batch 1 also unmerged with only the
    // attention layers or only the resnet convolutions adapted, to see where time goes.
    let mut names: Vec<String> = vec!["base".into()];
    let mut models: Vec<StableDiffusion> = Vec::new();
    for p in &prepared {
        let set = [(1.0, p.layers.as_slice())];
        names.push(format!("merged_r{}", p.rank));
        models.push(base.with_adapters(&set, true).unwrap());
        names.push(format!("unmerged_r{}", p.rank));
        models.push(base.with_adapters(&set, false).unwrap());
    }
    for p in &prepared {
        for label in ["attentions", "resnets"] {
            let ls = only(&p.layers, |l| l.module.contains(&format!(".{label}.")));
            names.push(format!("unmerged_r{}_{label}_only", p.rank));
            models.push(base.with_adapters(&[(1.0, ls.as_slice())], false).unwrap());
        }
    }
    let side = ucfg.sample_size.unwrap_or(8);
    let ctx_dim = match &ucfg.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(v) => v[0],
    };
    let blocks = ucfg.block_out_channels.len();
    let base_flops = unet_flops(&unet_w.tensors, side, blocks, 77);
    let mut flops = serde_json::Map::new();
    flops.insert("base_unet_gflop_per_image".into(), json!(base_flops / 1e9));
    for p in &prepared {
        let part =
            |keep: &dyn Fn(&ResolvedLayer) -> bool| lora_flops(&only(&p.layers, keep), side, blocks, 77) / base_flops;
        flops.insert(
            format!("r{}_extra_fraction", p.rank),
            json!({
                "all": part(&|_| true),
                "attentions": part(&|l| l.module.contains(".attentions.")),
                "resnets": part(&|l| l.module.contains(".resnets.")),
            }),
        );
    }
    out.insert("flop_model".into(), Value::Object(flops));
    let probes = [
        "down_blocks.0.resnets.0.conv1",
        "up_blocks.0.resnets.0.conv1",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    ];
    let layer_results: Vec<Value> =
        probes.iter().map(|m| layer_bench(m, &unet_w.tensors, &prepared, side, blocks)).collect();
    out.insert("layers_b1".into(), json!(layer_results));
    let mut steps = serde_json::Map::new();
    for batch in [1usize, 2] {
        let x = randn(&[batch, ucfg.in_channels, side, side], 3);
        let ctx = randn(&[batch, 77, ctx_dim], 4);
        let mut unets: Vec<&UNet2DConditionModel> = vec![base.unet()];
        unets.extend(models.iter().map(|m| m.unet()));
        // The per-layer breakdown only at batch 1.
        let n = if batch == 1 { unets.len() } else { unets.len() - 2 * prepared.len() };
        let t = step_times(&unets[..n], &x, &ctx, c.step_reps);
        let (mut med, mut min) = (serde_json::Map::new(), serde_json::Map::new());
        for (name, (m, lo)) in names.iter().zip(t) {
            med.insert(name.clone(), json!(m));
            min.insert(name.clone(), json!(lo));
        }
        steps.insert(format!("b{batch}"), Value::Object(med));
        steps.insert(format!("b{batch}_min"), Value::Object(min));
    }
    out.insert("step_ms".into(), Value::Object(steps));
    out.insert("latent_side".into(), json!(side));
    out.insert("ranks".into(), Value::Object(per_rank));
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// Report

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn fmt_ms(ms: f64) -> String {
    if ms < 0.1 {
        format!("{:.1} µs", ms * 1e3)
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn fmt_bytes(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

fn print_tables(results: &BTreeMap<String, Value>) {
    println!("\n| model | rank | modules (UNet + TE) | file PEFT / kohya | load PEFT / kohya | resolve | merged build (cold) | unmerged build | cached switch | back to base |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, r) in results {
        for rank in RANKS {
            let x = &r["ranks"][format!("r{rank}")];
            println!(
                "| {name} | {rank} | {} + {} | {} / {} | {} / {} | {} | {} | {} | {} | {} |",
                r["modules"]["unet"],
                r["modules"]["text_encoder"],
                fmt_bytes(f(&x["peft_file_bytes"])),
                fmt_bytes(f(&x["kohya_file_bytes"])),
                fmt_ms(f(&x["load_peft_ms"])),
                fmt_ms(f(&x["load_kohya_ms"])),
                fmt_ms(f(&x["resolve_ms"])),
                fmt_ms(f(&x["merged_build_ms"])),
                fmt_ms(f(&x["unmerged_build_ms"])),
                fmt_ms(f(&x["cached_switch_ms"])),
                fmt_ms(f(&r["switch_to_base_ms"])),
            );
        }
    }
    println!("\nUNet step (median; ratios against the same run's base / merged step):\n");
    println!("| model | batch | base | merged r8 (/base) | unmerged r8 (/merged) | merged r64 (/base) | unmerged r64 (/merged) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in results {
        for b in ["b1", "b2"] {
            let s = &r["step_ms"][b];
            let base = f(&s["base"]);
            let mut row = format!("| {name} | {} | {} |", &b[1..], fmt_ms(base));
            for rank in RANKS {
                let m = f(&s[format!("merged_r{rank}")]);
                let u = f(&s[format!("unmerged_r{rank}")]);
                row += &format!(" {} ({:.2}×) | {} ({:.2}×) |", fmt_ms(m), m / base, fmt_ms(u), u / m);
            }
            println!("{row}");
        }
    }
    println!("\nUnmerged overhead (step time over the merged variant's, same run) vs the FLOP model (extra multiply-adds over the base UNet's linear, conv and attention products):\n");
    println!("| model | rank | FLOP model: attentions / resnets / all | measured b1: attentions only / resnets only / all | b1 by min | b2: all | b2 by min |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in results {
        for rank in RANKS {
            let fm = &r["flop_model"][format!("r{rank}_extra_fraction")];
            let pct = |v: f64| format!("+{:.0}%", v * 100.0);
            let over = |b: &str, k: &str| {
                let s = &r["step_ms"][b];
                match s.get(k) {
                    Some(u) => pct(f(u) / f(&s[format!("merged_r{rank}")]) - 1.0),
                    None => "—".into(),
                }
            };
            let all = format!("unmerged_r{rank}");
            println!(
                "| {name} | {rank} | {} / {} / {} | {} / {} / {} | {} | {} | {} |",
                pct(f(&fm["attentions"])),
                pct(f(&fm["resnets"])),
                pct(f(&fm["all"])),
                over("b1", &format!("unmerged_r{rank}_attentions_only")),
                over("b1", &format!("unmerged_r{rank}_resnets_only")),
                over("b1", &all),
                over("b1_min", &all),
                over("b2", &all),
                over("b2_min", &all),
            );
        }
    }
    println!("\nSingle layers at batch 1, 40 interleaved runs, median / min (min ≈ the cost without other load): base, with the unmerged LoRA (extra over base), and the LoRA's k×k down-conv alone:\n");
    println!("| model | layer | weight | rows | base | + r8 LoRA | r8 down conv | + r64 LoRA | r64 down conv |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let pair = |v: &Value| format!("{} / {}", fmt_ms(f(&v["median"])), fmt_ms(f(&v["min"])));
    for (name, r) in results {
        for l in r["layers_b1"].as_array().into_iter().flatten() {
            let module = l["module"].as_str().unwrap_or("");
            let short = module.replace("transformer_blocks.0.", "").replace("attentions.0.", "attn.");
            let base = &l["base_ms"];
            let mut row = format!("| {name} | {short} | {} | {} | {} |", l["weight_shape"], l["rows"], pair(base));
            for rank in RANKS {
                let with = &l[format!("r{rank}_ms")];
                let extra = |k: &str| (f(&with[k]) / f(&base[k]) - 1.0) * 100.0;
                let down = l.get(format!("r{rank}_down_conv_ms")).map(pair).unwrap_or_else(|| "—".into());
                row += &format!(" {} (+{:.0}% / +{:.0}%) | {down} |", pair(with), extra("median"), extra("min"));
            }
            println!("{row}");
        }
    }
    println!("\nBreakdowns (PEFT load; merged build) and memory:\n");
    println!("| model | rank | load: read / parse_safetensors (finite check) / lora::parse | merge UNet (ΔW products) / TE | rebuild UNet / TE | base UNet | merged variant's new tensors (UNet + TE) | unmerged factors |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in results {
        for rank in RANKS {
            let x = &r["ranks"][format!("r{rank}")];
            let b = &x["merged_build_breakdown_ms"];
            let m = &x["memory"];
            let l = &x["load_peft_breakdown_ms"];
            println!(
                "| {name} | {rank} | {} / {} ({}) / {} | {} ({}) / {} | {} / {} | {} | {} ({:.0}%) + {} | {} |",
                fmt_ms(f(&l["read"])),
                fmt_ms(f(&l["parse_safetensors"])),
                fmt_ms(f(&l["of_which_finite_check"])),
                fmt_ms(f(&l["lora_parse"])),
                fmt_ms(f(&b["merge_unet"])),
                fmt_ms(f(&b["deltas_unet"])),
                fmt_ms(f(&b["merge_text_encoder"])),
                fmt_ms(f(&b["build_unet"])),
                fmt_ms(f(&b["build_text_encoder"])),
                fmt_bytes(f(&r["base_unet_bytes"])),
                fmt_bytes(f(&m["merged_new_unet_bytes"])),
                f(&m["merged_new_unet_fraction"]) * 100.0,
                fmt_bytes(f(&m["merged_new_text_encoder_bytes"])),
                fmt_bytes(f(&m["unmerged_factor_bytes"])),
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; anything else that is not a flag filters cases by name.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |n: &str| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str()));
    let reps: usize = std::env::var("TILLER_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let start = Instant::now();
    let mut cases = Vec::new();
    if wanted("sd15-tiny") {
        let dir = root().join("tests/fixtures/models/sd15-tiny");
        cases.push(Case { name: "sd15-tiny", dir, step_reps: 30, build_reps: 20 });
    }
    if wanted("medium") {
        cases.push(Case { name: "medium", dir: medium_pipeline_dir(), step_reps: reps, build_reps: 7 });
    }
    let threads = candle_core::utils::get_num_threads();
    eprintln!("threads: {threads}");
    let mut results = BTreeMap::new();
    for c in &cases {
        let t = Instant::now();
        let r = bench_case(c);
        eprintln!("{}: {:.1} s", c.name, t.elapsed().as_secs_f64());
        results.insert(c.name.to_string(), r);
    }
    print_tables(&results);
    let total = start.elapsed().as_secs_f64();
    println!("\nthreads: {threads}, total {total:.0} s");
    let mut json = serde_json::Map::new();
    json.insert("threads".into(), json!(threads));
    json.insert("total_s".into(), json!(total));
    json.insert("models".into(), json!(results));
    let out = out_dir().join("results.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(json)).unwrap()).unwrap();
    println!("wrote {}", out.display());
}
