//! `tiller experiment run`: every prompt through every arm at matched seeds on local models,
//! written as the server's results table (JSON) and as Markdown.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn offline_runs_compare_the_arms_at_matched_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = dir.path().join("arms.toml");
    std::fs::write(
        &config,
        r#"
name = "fk-vs-plain"
model = "toy-gmm"
metrics = ["brightness"]
seeds = [1, 2, 3]

[[arms]]
name = "plain"
request = { steps = 10 }

[[arms]]
name = "fk"
request = { steps = 10, steering = { method = "fk", particles = 4, beta = 20 }, reward = "brightness" }
"#,
    )
    .unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "# two prompts\na\n\nb\n").unwrap();
    let out = dir.path().join("table");
    let experiment_run = || {
        Command::new(env!("CARGO_BIN_EXE_tiller"))
            .args(["experiment", "run", "--config"])
            .arg(&config)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--models-dir")
            .arg(repo.join("models"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let run = experiment_run();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(table["n"], 12, "2 prompts × 3 seeds × 2 arms");
    let arms = table["arms"].as_array().unwrap();
    assert_eq!((arms[0]["n"].as_u64(), arms[1]["n"].as_u64()), (Some(6), Some(6)));
    let mean = |i: usize| arms[i]["metrics"]["brightness"]["mean"].as_f64().unwrap();
    assert!(mean(1) > mean(0), "FK towards brightness is brighter: {table}");
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("| plain | 6 |") && md.contains("| fk | 6 |") && md.contains("brightness"), "{md}");
    // Six images per arm are too few for the always-valid interval; the table says which it shows.
    assert!(md.contains("(fixed-sample)"), "{md}");
    // A bad arm is refused naming it, before anything runs.
    std::fs::write(
        &config,
        "name = \"x\"\nmodel = \"toy-gmm\"\n[[arms]]\nname = \"a\"\n[[arms]]\nname = \"b\"\nrequest = { stepz = 3 }\n",
    )
    .unwrap();
    let run = experiment_run();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("stepz"), "{err}");
}
