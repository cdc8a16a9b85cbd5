//! CLIP BPE tokenizer, loaded from a diffusers `tokenizer/` folder.
//!
//! Either `tokenizer.json` is used as is, or (SD-1.x publishes only these) the same pipeline
//! transformers' `CLIPTokenizer` builds is assembled from `vocab.json` + `merges.txt`:
//! normalizer NFC → `\s+`→" " → lowercase; pre-split on CLIP's regex (pieces kept, the rest
//! removed), byte-level mapping; BPE with the `</w>` end-of-word suffix; the bos/eos/unk/pad
//! tokens registered as special tokens (so SD-2's pad token "!" encodes a literal "!" as its id).
//! Ids are `bos + ≤ max_len−2 tokens + eos`, padded to `max_len` with the pad token.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Result, TillerError};

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Token ids of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `max_len` ids: bos, up to `max_len − 2` tokens, eos, padding.
    pub ids: Vec<u32>,
    /// True when tokens were dropped to fit `max_len`.
    pub truncated: bool,
}

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_len", &self.max_len)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| TillerError::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| TillerError::file(path, format!("malformed JSON: {e}")))
}

/// A special-token entry of `tokenizer_config.json` / `special_tokens_map.json`: a string or an
/// `AddedToken` object with `content`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// Special tokens and max length from the optional config files.
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_len: usize,
}

impl SpecialTokens {
    fn load(dir: &Path) -> Result<Self> {
        let mut s = SpecialTokens {
            bos: "<|startoftext|>".into(),
            eos: "<|endoftext|>".into(),
            unk: "<|endoftext|>".into(),
            pad: "<|endoftext|>".into(),
            max_len: 77,
        };
        // special_tokens_map.json first, tokenizer_config.json wins (transformers merges both).
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let v = read_json(&path)?;
            let get = |k: &str| v.get(k).and_then(token_content);
            if let Some(t) = get("bos_token") {
                s.bos = t;
            }
            if let Some(t) = get("eos_token") {
                s.eos = t;
            }
            if let Some(t) = get("unk_token") {
                s.unk = t;
            }
            if let Some(t) = get("pad_token") {
                s.pad = t;
            }
            if let Some(m) = v.get("model_max_length").and_then(|m| m.as_f64()) {
                // transformers writes a huge sentinel when unset; CLIP's limit is 77.
                if (3.0..=1e6).contains(&m) {
                    s.max_len = m as usize;
                }
            }
        }
        Ok(s)
    }
}

/// The `tokenizer.json` transformers' `CLIPTokenizer` would build from vocab + merges.
fn clip_tokenizer_json(vocab: Value, merges: Vec<String>, sp: &SpecialTokens) -> Result<Value> {
    let id = |t: &str| vocab.get(t).and_then(|v| v.as_u64());
    let mut added = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (tok, normalized) in [(&sp.bos, true), (&sp.eos, true), (&sp.unk, true), (&sp.pad, false)] {
        if !seen.insert(tok.clone()) {
            continue;
        }
        if let Some(i) = id(tok) {
            added.push(json!({
                "id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": normalized, "special": true
            }));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": sp.unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

impl ClipTokenizer {
    /// Load from a diffusers `tokenizer/` folder (`tokenizer.json`, or `vocab.json` + `merges.txt`,
    /// plus the optional `tokenizer_config.json` / `special_tokens_map.json`).
    /// Token ids (B, L) of a batch of prompts on `device`, and which prompts were truncated.
    pub fn encode_batch(
        &self,
        prompts: &[String],
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, Vec<usize>)> {
        let mut ids = Vec::new();
        let mut truncated = Vec::new();
        let mut len = 0;
        for (i, p) in prompts.iter().enumerate() {
            let enc = self.encode(p).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            if enc.truncated {
                truncated.push(i);
            }
            len = enc.ids.len();
            ids.extend(enc.ids);
        }
        Ok((candle_core::Tensor::from_vec(ids, (prompts.len(), len), device)?, truncated))
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(TillerError::file(dir, "tokenizer folder is missing"));
        }
        let sp = SpecialTokens::load(dir)?;
        let tj = dir.join("tokenizer.json");
        let inner = if tj.exists() {
            read_json(&tj)?; // names the file on malformed JSON
            let mut t = tokenizers::Tokenizer::from_file(&tj)
                .map_err(|e| TillerError::file(&tj, format!("invalid tokenizer: {e}")))?;
            // transformers saves its padding and truncation settings into tokenizer.json; `wrap`
            // does both itself, and a padded encoding would count as a truncated prompt.
            t.with_padding(None);
            t.with_truncation(None).map_err(|e| TillerError::file(&tj, format!("invalid tokenizer: {e}")))?;
            t
        } else {
            let vp = dir.join("vocab.json");
            let mp = dir.join("merges.txt");
            if !vp.exists() {
                return Err(TillerError::file(&vp, "missing (and no tokenizer.json)"));
            }
            if !mp.exists() {
                return Err(TillerError::file(&mp, "missing (and no tokenizer.json)"));
            }
            let vocab = read_json(&vp)?;
            if !vocab.as_object().is_some_and(|o| o.values().all(|v| v.is_u64())) {
                return Err(TillerError::file(&vp, "expected an object of token → id"));
            }
            let text = std::fs::read_to_string(&mp).map_err(|e| TillerError::file(&mp, format!("cannot read: {e}")))?;
            let mut merges = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.starts_with("#version") || line.trim().is_empty() {
                    continue;
                }
                if line.split(' ').count() != 2 {
                    return Err(TillerError::file(&mp, format!("line {}: expected two symbols, got `{line}`", n + 1)));
                }
                merges.push(line.to_string());
            }
            let spec = clip_tokenizer_json(vocab, merges, &sp)?;
            spec.to_string()
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| TillerError::file(&vp, format!("cannot build BPE from vocab.json + merges.txt: {e}")))?
        };
        let lookup = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| TillerError::file(dir, format!("special token `{t}` is not in the vocabulary")))
        };
        let (bos_id, eos_id, pad_id) = (lookup(&sp.bos)?, lookup(&sp.eos)?, lookup(&sp.pad)?);
        Ok(Self { inner, max_len: sp.max_len, bos_id, eos_id, pad_id })
    }

    /// Token ids of `text` without bos/eos, untruncated.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| TillerError::Other(anyhow::anyhow!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `bos + tokens + eos`, truncated to and padded to `max_len` (a warning is logged on
    /// truncation).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let toks = self.tokenize(text)?;
        let e = self.wrap(&toks);
        if e.truncated {
            tracing::warn!(tokens = toks.len(), kept = self.max_len - 2, "prompt truncated to {} tokens", self.max_len);
        }
        Ok(e)
    }

    fn wrap(&self, toks: &[u32]) -> Encoded {
        let room = self.max_len - 2;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&toks[..toks.len().min(room)]);
        ids.push(self.eos_id);
        ids.resize(self.max_len, self.pad_id);
        Encoded { ids, truncated: toks.len() > room }
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
}

/// T5's SentencePiece tokenizer from the published `tokenizer.json` (`T5TokenizerFast`): the
/// tokens, then `</s>`, padded with `<pad>` to the pipeline's `max_sequence_length`.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer").field("eos_id", &self.eos_id).field("pad_id", &self.pad_id).finish()
    }
}

impl T5Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(TillerError::file(
                &tj,
                "missing: tiller reads T5 tokenizers from tokenizer.json (spiece.model alone is not supported)",
            ));
        }
        read_json(&tj)?;
        let mut inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| TillerError::file(&tj, format!("invalid tokenizer: {e}")))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| TillerError::file(&tj, format!("invalid tokenizer: {e}")))?;
        let (mut eos, mut pad) = ("</s>".to_string(), "<pad>".to_string());
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if path.exists() {
                let v = read_json(&path)?;
                if let Some(t) = v.get("eos_token").and_then(token_content) {
                    eos = t;
                }
                if let Some(t) = v.get("pad_token").and_then(token_content) {
                    pad = t;
                }
            }
        }
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| TillerError::file(&tj, format!("special token `{t}` is not in the vocabulary")))
        };
        Ok(Self { eos_id: id(&eos)?, pad_id: id(&pad)?, inner })
    }

    /// Tokens then `</s>`, truncated to and padded to `max_len`.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| TillerError::Other(anyhow::anyhow!("tokenizer: {e}")))?;
        let toks = enc.get_ids();
        let room = max_len.saturating_sub(1);
        let mut ids: Vec<u32> = toks[..toks.len().min(room)].to_vec();
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        Ok(Encoded { ids, truncated: toks.len() > room })
    }

    /// Token ids (B, `max_len`) of a batch of prompts, and which were truncated.
    pub fn encode_batch(
        &self,
        prompts: &[String],
        max_len: usize,
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, Vec<usize>)> {
        let mut ids = Vec::with_capacity(prompts.len() * max_len);
        let mut truncated = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let e = self.encode(p, max_len).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            if e.truncated {
                truncated.push(i);
            }
            ids.extend(e.ids);
        }
        candle_core::Tensor::from_vec(ids, (prompts.len(), max_len), device).map(|t| (t, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny CLIP-style vocabulary: the 256 byte-level symbols, their `</w>` forms, a few merges.
    fn write_small_vocab(dir: &Path, pad: &str) {
        // GPT-2 byte → unicode table
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut syms: Vec<String> = cs.iter().map(|&c| char::from_u32(c).unwrap().to_string()).collect();
        let words: Vec<String> = syms.iter().map(|s| format!("{s}</w>")).collect();
        syms.extend(words);
        let merges = ["r e", "re d</w>", "c a", "ca t</w>"];
        for m in merges {
            syms.push(m.replace(' ', ""));
        }
        syms.push("<|startoftext|>".into());
        syms.push("<|endoftext|>".into());
        let vocab: serde_json::Map<String, Value> =
            syms.iter().enumerate().map(|(i, s)| (s.clone(), Value::from(i as u64))).collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(vocab).to_string()).unwrap();
        std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"model_max_length": 8, "pad_token": pad, "bos_token": {"content": "<|startoftext|>"}}).to_string(),
        )
        .unwrap();
    }

    fn id(t: &ClipTokenizer, s: &str) -> u32 {
        t.inner.token_to_id(s).unwrap()
    }

    #[test]
    fn small_vocab_encodes_like_clip() {
        let dir = tempfile::tempdir().unwrap();
        write_small_vocab(dir.path(), "<|endoftext|>");
        let t = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.max_len(), 8);
        assert_eq!(t.pad_id(), t.eos_id());
        let e = t.encode("  RED\tCat!").unwrap();
        let want = [t.bos_id(), id(&t, "red</w>"), id(&t, "cat</w>"), id(&t, "!</w>"), t.eos_id()];
        assert_eq!(&e.ids[..5], &want[..]);
        assert_eq!(&e.ids[5..], &[t.pad_id(); 3]);
        assert!(!e.truncated);
        // "re" merges but "d" alone ends the word: re + d</w> → red</w>; "rex" → re, x</w>
        let e = t.encode("rex").unwrap();
        assert_eq!(&e.ids[1..3], &[id(&t, "re"), id(&t, "x</w>")]);
        let long = t.encode("a b c d e f g").unwrap();
        assert!(long.truncated);
        assert_eq!(long.ids.len(), 8);
        assert_eq!(long.ids[7], t.eos_id());
        assert_eq!(long.ids[6], id(&t, "f</w>"));
    }

    #[test]
    fn pad_token_is_special() {
        let dir = tempfile::tempdir().unwrap();
        write_small_vocab(dir.path(), "!");
        let t = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.pad_id(), id(&t, "!"));
        let e = t.encode("cat!").unwrap();
        assert_eq!(&e.ids[..4], &[t.bos_id(), id(&t, "cat</w>"), id(&t, "!"), t.eos_id()]);
        assert_eq!(e.ids[4], id(&t, "!"));
    }

    /// transformers writes its padding and truncation into tokenizer.json; they must not leak
    /// into the token count (a padded encoding once read as a truncated prompt).
    #[test]
    fn tokenizer_json_with_padding_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        write_small_vocab(dir.path(), "<|endoftext|>");
        let plain = ClipTokenizer::from_dir(dir.path()).unwrap();
        let mut inner = plain.inner.clone();
        inner.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(8),
            pad_id: plain.pad_id(),
            pad_token: "<|endoftext|>".into(),
            ..Default::default()
        }));
        inner.with_truncation(Some(tokenizers::TruncationParams { max_length: 8, ..Default::default() })).unwrap();
        let json_dir = tempfile::tempdir().unwrap();
        inner.save(json_dir.path().join("tokenizer.json"), false).unwrap();
        std::fs::copy(dir.path().join("tokenizer_config.json"), json_dir.path().join("tokenizer_config.json")).unwrap();
        let t = ClipTokenizer::from_dir(json_dir.path()).unwrap();
        let e = t.encode("red cat").unwrap();
        assert!(!e.truncated);
        assert_eq!(e, plain.encode("red cat").unwrap());
        assert_eq!(t.tokenize("a b c d e f g h i j").unwrap().len(), 10);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vocab.json") && err.contains("missing"), "{err}");
        write_small_vocab(dir.path(), "!");
        std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("malformed"), "{err}");
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("merges.txt"), "{err}");
    }
}
