//! The strict safetensors reader and the LoRA parser on malformed input: every rule has a case
//! that must fail with `AdapterError::Invalid` and a message naming the problem, never a panic.
//! Also `tiller generate --lora` end to end on the sd15-tiny fixture.

mod adapters_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use adapters_support::*;
use tiller::adapters::file::parse_safetensors;
use tiller::adapters::lora::{self, ScalingSources};
use tiller::adapters::{Adapter, AdapterError, Component, LoraFormat};

fn invalid_message(r: Result<impl std::fmt::Debug, AdapterError>, case: &str) -> String {
    match r {
        Err(AdapterError::Invalid(m)) => m,
        other => panic!("{case}: expected AdapterError::Invalid, got {other:?}"),
    }
}

/// parse_safetensors, then (on success) lora::parse, as Adapter::load does.
fn parse_all(bytes: &[u8]) -> Result<lora::LoraFile, AdapterError> {
    let (tensors, metadata) = parse_safetensors(bytes)?;
    lora::parse(tensors, &metadata, &ScalingSources::default())
}

#[test]
fn the_valid_adapter_parses() {
    let (tensors, metadata) = parse_safetensors(&sd15_lora()).unwrap();
    assert_eq!(tensors.len(), 3);
    assert_eq!(metadata["ss_network_module"], "networks.lora");
    let f = lora::parse(tensors, &metadata, &ScalingSources::default()).unwrap();
    assert_eq!(f.format, LoraFormat::Kohya);
    assert_eq!(f.rank(), 2);
    assert_eq!(f.layers.len(), 1);
    let l = &f.layers[0];
    assert_eq!((l.component, l.source.as_str()), (Component::Unet, SD15_TO_Q));
    assert_eq!((l.down.dims(), l.up.dims()), (&[2, 16][..], &[16, 2][..]));
    assert_eq!(l.scale, 1.0, "alpha = rank");
}

#[test]
fn each_malformed_file_is_invalid_with_a_clear_message() {
    for (case, bytes, words) in malformed_cases() {
        let msg = invalid_message(parse_all(&bytes), case);
        assert!(msg.contains(words), "{case}: message `{msg}` lacks `{words}`");
        if case != "no tensors" {
            let msg = invalid_message(parse_safetensors(&bytes).map(|_| ()), case);
            assert!(msg.starts_with("malformed safetensors file: ") || msg.contains("NaN"), "{case}: {msg}");
        }
    }
}

#[test]
fn adapter_load_reports_the_parser_message() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (case, bytes, words)) in malformed_cases().into_iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        let msg = invalid_message(Adapter::load("bad", &p).map(|_| ()), case);
        assert!(msg.contains(words), "{case}: message `{msg}` lacks `{words}`");
    }
    let p = dir.path().join("good.safetensors");
    std::fs::write(&p, sd15_lora()).unwrap();
    let a = Adapter::load("good", &p).unwrap();
    assert_eq!(a.size_bytes, sd15_lora().len() as u64);
    let s = a.summary(dir.path());
    assert_eq!((s.name.as_str(), s.path.as_str(), s.rank, s.modules), ("good", "good.safetensors", 2, 1));
    // A missing file is an I/O error, not a parse error.
    assert!(matches!(Adapter::load("x", &dir.path().join("missing.safetensors")), Err(AdapterError::Io(_))));
    // A directory is not a file.
    let msg = invalid_message(Adapter::load("x", dir.path()).map(|_| ()), "directory");
    assert!(msg.contains("not a regular file"), "{msg}");
}

#[test]
fn every_truncation_of_a_valid_file_is_rejected() {
    let valid = sd15_lora();
    for cut in 0..valid.len() {
        let r = parse_safetensors(&valid[..cut]);
        assert!(
            matches!(r, Err(AdapterError::Invalid(_))),
            "a file cut at {cut} of {} bytes was accepted",
            valid.len()
        );
    }
    // Single corrupted bytes never panic (most are rejected; some only change a value).
    for i in 0..valid.len() {
        for b in [0x00u8, 0xff, b'"', b'9'] {
            let mut c = valid.clone();
            c[i] = b;
            let _ = parse_all(&c);
        }
    }
}

#[test]
fn zero_sized_tensors_with_huge_dimensions_are_rejected_without_panicking() {
    // 0 elements, so the byte range [0, 0] matches, but the other dimensions multiply past
    // 2^64 (the tensor's strides would overflow): an error, not an overflow panic (regression).
    for shape in ["[0, 1099511627776, 1099511627776]", "[1099511627776, 1099511627776, 0]", "[0, 18446744073709551615]"]
    {
        let bytes = raw(&format!(r#"{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#), &[]);
        let msg = invalid_message(parse_safetensors(&bytes).map(|_| ()), shape);
        assert!(msg.contains("is too large"), "{shape}: {msg}");
        let msg = invalid_message(parse_all(&bytes), shape);
        assert!(msg.contains("is too large"), "{shape}: {msg}");
    }
    // An empty tensor with ordinary dimensions is fine for the reader (and not a LoRA).
    let bytes = raw(r#"{"t":{"dtype":"F32","shape":[0, 4],"data_offsets":[0,0]}}"#, &[]);
    assert_eq!(parse_safetensors(&bytes).unwrap().0["t"].dims(), &[0, 4]);
}

#[test]
fn lora_layout_errors_are_invalid() {
    let stem = SD15_TO_Q;
    let down = format!("{stem}.lora_down.weight");
    let up = format!("{stem}.lora_up.weight");
    let alpha = format!("{stem}.alpha");
    let m = |n: usize| f32s(&noise(n, 1, 0.5));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unpaired down", safetensors(&[(&down, "F32", vec![2, 16], m(32))], &[]), "up/B matrix missing"),
        ("unpaired up", safetensors(&[(&up, "F32", vec![16, 2], m(32))], &[]), "down/A matrix missing"),
        (
            "ranks differ",
            safetensors(&[(&down, "F32", vec![2, 16], m(32)), (&up, "F32", vec![16, 3], m(48))], &[]),
            "not a rank-r pair",
        ),
        (
            "rank zero",
            safetensors(&[(&down, "F32", vec![0, 16], vec![]), (&up, "F32", vec![16, 0], vec![])], &[]),
            "not a rank-r pair",
        ),
        (
            "3-D factors",
            safetensors(&[(&down, "F32", vec![2, 4, 4], m(32)), (&up, "F32", vec![16, 2], m(32))], &[]),
            "not a rank-r pair",
        ),
        (
            "alpha not a scalar",
            safetensors(
                &[(&alpha, "F32", vec![2], m(2)), (&down, "F32", vec![2, 16], m(32)), (&up, "F32", vec![16, 2], m(32))],
                &[],
            ),
            "alpha must be a scalar",
        ),
        (
            "alpha without a pair",
            safetensors(&[(&alpha, "F32", vec![], m(1)), ("lora_unet_x.alpha", "F32", vec![], m(1))], &[]),
            "has no lora_down/lora_up pair",
        ),
        (
            "stray kohya key",
            safetensors(
                &[
                    (&down, "F32", vec![2, 16], m(32)),
                    (&up, "F32", vec![16, 2], m(32)),
                    ("lora_unet_x.bias", "F32", vec![1], m(1)),
                ],
                &[],
            ),
            "not LoRA tensors of this format",
        ),
        (
            "unknown layout",
            safetensors(&[("model.diffusion.weight", "F32", vec![2], m(2))], &[]),
            "unrecognised LoRA key layout",
        ),
        (
            "DoRA",
            safetensors(
                &[
                    (&down, "F32", vec![2, 16], m(32)),
                    (&up, "F32", vec![16, 2], m(32)),
                    (&format!("{stem}.dora_scale"), "F32", vec![16], m(16)),
                ],
                &[],
            ),
            "DoRA",
        ),
        (
            "PEFT key without a component",
            safetensors(
                &[
                    ("foo.to_q.lora_A.weight", "F32", vec![2, 16], m(32)),
                    ("foo.to_q.lora_B.weight", "F32", vec![16, 2], m(32)),
                ],
                &[],
            ),
            "expected a `unet.`",
        ),
    ];
    for (case, bytes, words) in cases {
        let msg = invalid_message(parse_all(&bytes), case);
        assert!(msg.contains(words), "{case}: message `{msg}` lacks `{words}`");
    }
}

#[test]
fn peft_and_kohya_fixtures_parse_when_present() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let mut formats: HashMap<String, LoraFormat> = HashMap::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let a = Adapter::load("fixture", &p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            formats.insert(p.file_name().unwrap().to_string_lossy().into_owned(), a.file.format);
        }
    }
    for (name, f) in &formats {
        let want = if name.contains("kohya") { LoraFormat::Kohya } else { LoraFormat::Peft };
        assert_eq!(*f, want, "{name}");
    }
}

#[test]
fn fuzz_seeds_are_valid_adapters_of_each_layout() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/lora_file");
    let mut formats = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("seed_") {
            let a = Adapter::load(&name, &e.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
            formats.push(a.file.format);
        }
    }
    for f in [LoraFormat::Kohya, LoraFormat::Peft, LoraFormat::DiffusersOld] {
        assert!(formats.contains(&f), "no {f:?} seed in {}", dir.display());
    }
}

// ---- tiller generate --lora ----

fn tiller() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiller"));
    c.env("RUST_LOG", "warn");
    c
}

fn sd15() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd15-tiny")
}

#[test]
fn lora_argument_splits_at_the_last_numeric_colon() {
    use tiller::bootstrap::split_lora_arg;
    assert_eq!(split_lora_arg("pixel-art"), ("pixel-art", None));
    assert_eq!(split_lora_arg("pixel-art:0.8"), ("pixel-art", Some(0.8)));
    assert_eq!(split_lora_arg("a:b/c.safetensors:-1.5"), ("a:b/c.safetensors", Some(-1.5)));
    assert_eq!(split_lora_arg("a:b/c.safetensors"), ("a:b/c.safetensors", None));
    assert_eq!(split_lora_arg("C:\\loras\\x.safetensors"), ("C:\\loras\\x.safetensors", None));
    assert_eq!(split_lora_arg(":2"), (":2", None));
}

#[test]
fn generate_with_lora_files_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    std::fs::create_dir(&adapters).unwrap();
    std::fs::write(adapters.join("q.safetensors"), sd15_lora()).unwrap();
    let colon = dir.path().join("with:colon.safetensors");
    std::fs::write(&colon, kohya_lora(SD15_TO_Q, 2, 16, 16, 99)).unwrap();
    let out = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let base = |o: &str| {
        let mut c = tiller();
        c.args(["generate", "--model"]).arg(sd15()).args(["--prompt", "a cat", "--steps", "2", "--seed", "3"]);
        c.args(["--width", "32", "--height", "32", "-q", "--adapters-dir"]).arg(&adapters).args(["-o", o]);
        c
    };
    let run = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    run(&mut base(&out("plain.png")));
    let log = run(base(&out("named.png")).args(["--lora", "q:1.5"]));
    assert!(log.contains("adapters: q ×1.5"), "{log}");
    run(base(&out("path.png")).arg("--lora").arg(adapters.join("q.safetensors")).arg("--lora").arg(&colon));
    let plain = std::fs::read(out("plain.png")).unwrap();
    assert_ne!(plain, std::fs::read(out("named.png")).unwrap(), "the adapter changes the image");

    let fail = |c: &mut Command, words: &str| {
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "expected failure for {words}");
        assert!(err.contains(words), "stderr lacks `{words}`: {err}");
    };
    fail(base(&out("x.png")).args(["--lora", "nope"]), "known: q");
    fail(base(&out("x.png")).args(["--lora", "q:11"]), "between -10 and 10");
    fail(base(&out("x.png")).args(["--lora", "q", "--lora", "q:0.5"]), "given twice");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, &sd15_lora()[..40]).unwrap();
    fail(base(&out("x.png")).arg("--lora").arg(&bad), "runs past the end");
    let te2 = dir.path().join("te2.safetensors");
    std::fs::write(&te2, kohya_lora(SDXL_TE2_Q, 2, 32, 32, 1)).unwrap();
    fail(base(&out("x.png")).arg("--lora").arg(&te2), "text_encoder_2");
}
