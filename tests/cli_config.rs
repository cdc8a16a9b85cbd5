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

#[test]
fn serve_flags_override_the_store_location() {
    use clap::Parser;
    let cli = tiller::cli::Cli::try_parse_from(["tiller", "serve", "--data-dir", "/srv/tiller-data"]).unwrap();
    let tiller::cli::Command::Serve(args) = cli.command else { panic!("not serve") };
    let cfg = args.config().unwrap();
    assert_eq!(cfg.storage.data_dir, std::path::PathBuf::from("/srv/tiller-data"));
    assert_eq!(cfg.storage.database_url(), "sqlite:///srv/tiller-data/tiller.db?mode=rwc");
}
