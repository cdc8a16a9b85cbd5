//! The shipped example config parses, documents every key, and equals the defaults where it
//! says so.

use std::path::Path;

use tiller::config::Config;

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tiller.example.toml")).unwrap()
}

#[test]
fn example_config_parses_and_validates() {
    let cfg = Config::from_toml(&example()).unwrap();
    cfg.validate().unwrap();
    // The file says its values are the defaults.
    assert_eq!(cfg, Config::default());
}

#[test]
fn example_config_and_the_reference_mention_every_key() {
    let text = example();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.md")).unwrap();
    let defaults = toml::Value::try_from(Config::default()).unwrap();
    let mut keys = Vec::new();
    for (section, table) in defaults.as_table().unwrap() {
        keys.extend(table.as_table().unwrap().keys().map(|k| (section.clone(), k.clone())));
    }
    // Optional keys are absent from the serialized defaults.
    for k in ["default", "api_key", "admin_key"] {
        let section = if k == "default" { "models" } else { "server" };
        keys.push((section.to_string(), k.to_string()));
    }
    for (section, key) in keys {
        assert!(text.contains(&format!("{key} =")), "tiller.example.toml lacks `{section}.{key}`");
        assert!(readme.contains(&format!("`{section}.{key}`")), "docs/config.md lacks `{section}.{key}`");
    }
    for (var, _) in tiller::config::ENV_VARS {
        assert!(readme.contains(var), "docs/config.md lacks {var}");
    }
}
