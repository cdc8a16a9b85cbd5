//! LoRA files built in the tests: a writer for safetensors bytes, a small valid kohya adapter
//! for the sd15-tiny fixture, and one malformed variant per rule of the strict reader.
#![allow(dead_code)]

/// kohya name of the sd15-tiny UNet's first self-attention query projection (16 × 16).
pub const SD15_TO_Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
/// A module only SDXL has (the second text encoder).
pub const SDXL_TE2_Q: &str = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";

/// Little-endian f32 bytes.
pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file from raw header text and data (the header length is the text's).
pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A well-formed safetensors file: tensors laid out back to back in the given order, header
/// padded with spaces to a multiple of 8.
pub fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
        header.insert("__metadata__".into(), m.into());
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    raw(&text, &data)
}

/// Deterministic values in about [-amp, amp].
pub fn noise(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// A kohya LoRA with one layer `stem` of rank `rank` for a (out, inp) linear weight, alpha =
/// rank (scale 1), random factors.
pub fn kohya_lora(stem: &str, rank: usize, out: usize, inp: usize, seed: u64) -> Vec<u8> {
    let down = format!("{stem}.lora_down.weight");
    let up = format!("{stem}.lora_up.weight");
    let alpha = format!("{stem}.alpha");
    safetensors(
        &[
            (&alpha, "F32", vec![], f32s(&[rank as f32])),
            (&down, "F32", vec![rank, inp], f32s(&noise(rank * inp, seed, 0.8))),
            (&up, "F32", vec![out, rank], f32s(&noise(out * rank, seed + 1, 0.8))),
        ],
        &[("ss_network_module", "networks.lora")],
    )
}

/// The valid rank-2 adapter for sd15-tiny.
pub fn sd15_lora() -> Vec<u8> {
    kohya_lora(SD15_TO_Q, 2, 16, 16, 7)
}

/// A kohya pair for sd15-tiny whose down matrix holds `v` once.
fn with_value(v: f32) -> Vec<u8> {
    let mut down = noise(2 * 16, 3, 0.5);
    down[5] = v;
    safetensors(
        &[
            (&format!("{SD15_TO_Q}.lora_down.weight"), "F32", vec![2, 16], f32s(&down)),
            (&format!("{SD15_TO_Q}.lora_up.weight"), "F32", vec![16, 2], f32s(&noise(32, 4, 0.5))),
        ],
        &[],
    )
}

/// One malformed file per rule of the reader: (case, bytes, words the error message contains).
pub fn malformed_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let valid = sd15_lora();
    let len = valid.len();
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let with_len = |n: u64| {
        let mut b = valid.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        b
    };
    let two = |a: [u64; 2], b: [u64; 2], data: usize| {
        raw(
            &format!(
                r#"{{"a":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}}}"#,
                a[0], a[1], b[0], b[1]
            ),
            &vec![0u8; data],
        )
    };
    let one = |entry: &str, data: usize| raw(&format!(r#"{{"t":{entry}}}"#), &vec![0u8; data]);
    let mut f16_inf = safetensors(&[("t", "F16", vec![2], vec![0, 0, 0, 0])], &[]);
    let n = f16_inf.len();
    f16_inf[n - 2..].copy_from_slice(&half_inf());
    vec![
        ("empty file", vec![], "too short"),
        ("truncated to 5 bytes", valid[..5].to_vec(), "too short"),
        ("truncated inside the header", valid[..8 + header_len / 2].to_vec(), "runs past the end"),
        ("truncated inside the data", valid[..len - 3].to_vec(), "outside"),
        ("header length beyond the file", with_len(len as u64), "runs past the end"),
        ("header length over 100 MB", with_len(100_000_001), "over the 100000000-byte limit"),
        ("header length u64::MAX", with_len(u64::MAX), "over the 100000000-byte limit"),
        ("offsets overlapping", two([0, 8], [4, 12], 12), "overlap"),
        ("offsets outside the data", two([0, 8], [8, 16], 12), "outside"),
        ("offsets reversed", one(r#"{"dtype":"F32","shape":[2],"data_offsets":[8,0]}"#, 8), "outside"),
        (
            "dtype/shape not matching the byte range",
            one(r#"{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}"#, 8),
            "needs 16 bytes but data_offsets give 8",
        ),
        ("F16 shape with F32 bytes", one(r#"{"dtype":"F16","shape":[2],"data_offsets":[0,8]}"#, 8), "needs 4 bytes"),
        (
            "shape overflowing 64 bits",
            one(r#"{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}"#, 8),
            "more than 2^64",
        ),
        ("hole between tensors", two([0, 8], [12, 20], 20), "belong to no tensor"),
        ("trailing bytes after the tensors", two([0, 8], [8, 16], 20), "belong to no tensor"),
        ("NaN value", with_value(f32::NAN), "NaN or infinite"),
        ("+inf value", with_value(f32::INFINITY), "NaN or infinite"),
        ("-inf value", with_value(f32::NEG_INFINITY), "NaN or infinite"),
        ("F16 inf value", f16_inf, "NaN or infinite"),
        ("invalid JSON header", raw("{\"a\": [1, 2", &[]), "not valid JSON"),
        ("non-object header", raw("[1, 2, 3]", &[]), "must be a JSON object"),
        ("non-UTF-8 header", [&2u64.to_le_bytes()[..], &[0xff, 0xfe]].concat(), "not UTF-8"),
        ("unknown dtype", one(r#"{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}"#, 8), "dtype `Q4_K`"),
        ("integer dtype", one(r#"{"dtype":"I64","shape":[1],"data_offsets":[0,8]}"#, 8), "dtype `I64`"),
        ("entry not an object", one("[1, 2]", 0), "entry must be an object"),
        ("negative dimension", one(r#"{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}"#, 4), "non-negative integers"),
        ("data_offsets missing", one(r#"{"dtype":"F32","shape":[1]}"#, 4), "`data_offsets` must be [begin, end]"),
        ("metadata value not a string", raw(r#"{"__metadata__":{"a":1}}"#, &[]), "must be a string"),
        ("no tensors", raw("{}", &[]), "holds no tensors"),
    ]
}

fn half_inf() -> [u8; 2] {
    0x7c00u16.to_le_bytes()
}
