//! Exact token ids against transformers' `CLIPTokenizer` for every fixture model
//! (`tests/fixtures/refs/tokenizer_<model>.json`, cases `{text, ids, untruncated_len}`).

use std::path::PathBuf;

use tiller::models::tokenizer::ClipTokenizer;

#[test]
fn ids_match_transformers_for_every_fixture_model() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let Ok(entries) = std::fs::read_dir(root.join("refs")) else {
        eprintln!("no fixtures; skipping");
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("tokenizer_") && n.ends_with(".json")
        })
        .collect();
    files.sort();
    let mut cases = 0;
    for f in &files {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let model = v["model"].as_str().unwrap();
        let tok = ClipTokenizer::from_dir(&root.join("models").join(model).join("tokenizer")).unwrap();
        assert_eq!(tok.max_len() as u64, v["max_length"].as_u64().unwrap(), "{model}");
        assert_eq!(tok.pad_id() as u64, v["pad_token_id"].as_u64().unwrap(), "{model}");
        assert_eq!(tok.eos_id() as u64, v["eos_token_id"].as_u64().unwrap(), "{model}");
        for c in v["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
            let enc = tok.encode(text).unwrap();
            assert_eq!(enc.ids, want, "{model}: {text:?}");
            let untruncated = c["untruncated_len"].as_u64().unwrap() as usize;
            assert_eq!(enc.truncated, untruncated > tok.max_len(), "{model}: {text:?}");
            cases += 1;
        }
    }
    eprintln!("{} models, {cases} cases", files.len());
    assert!(files.is_empty() || cases > 0);
}
