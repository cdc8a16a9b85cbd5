//! Arbitrary bytes through the LoRA file pipeline: the strict safetensors reader, the LoRA
//! layout parser (kohya, PEFT, old diffusers), and, for files that parse, matching against a
//! small fixed model and building each layer's delta. Any panic is a bug: the reader and the
//! parser must answer every input with `Ok` or `AdapterError`.

#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;
use tiller::adapters::{apply, file, lora, Component, TargetIndex};

/// A miniature SD-style model: linear and convolution weights of the UNet and a text encoder.
fn index() -> &'static TargetIndex {
    static INDEX: OnceLock<TargetIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let t = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        let unet: HashMap<String, Tensor> = [
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", vec![16, 16]),
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", vec![16, 8]),
            ("down_blocks.0.attentions.0.proj_in.weight", vec![16, 16, 1, 1]),
            ("down_blocks.0.resnets.0.conv1.weight", vec![8, 8, 3, 3]),
            ("down_blocks.0.resnets.0.time_emb_proj.weight", vec![8, 32]),
            ("down_blocks.0.downsamplers.0.conv.weight", vec![8, 8, 3, 3]),
            ("mid_block.attentions.0.proj_out.weight", vec![16, 16]),
            ("up_blocks.0.upsamplers.0.conv.weight", vec![8, 8, 3, 3]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), t(&s)))
        .collect();
        let te: HashMap<String, Tensor> = [
            ("text_model.encoder.layers.0.self_attn.q_proj.weight", vec![8, 8]),
            ("text_model.encoder.layers.0.mlp.fc1.weight", vec![12, 8]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), t(&s)))
        .collect();
        TargetIndex::new(&[(Component::Unet, &unet), (Component::TextEncoder, &te)], 2)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok((tensors, metadata)) = file::parse_safetensors(data) else { return };
    // Let the input also supply a PEFT adapter_config.json (through its own metadata).
    let adapter_config = metadata.get("adapter_config").and_then(|s| serde_json::from_str(s).ok());
    let Ok(parsed) = lora::parse(tensors, &metadata, &lora::ScalingSources { adapter_config }) else { return };
    let _ = parsed.rank();
    for lenient in [false, true] {
        if let Ok((layers, _warnings)) = apply::resolve(&parsed.layers, index(), lenient) {
            for l in &layers {
                let _ = apply::delta(l);
            }
        }
    }
});
