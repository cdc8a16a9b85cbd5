#!/usr/bin/env bash
# Install the dependency checkers CI runs (from crates.io, pinned, --locked), unless present.
#   cargo-machete: fails on a dependency that no source file uses;
#   cargo-deny:    licences, banned and duplicate crates, and sources (deny.toml).
set -euo pipefail
install() {
    local name="$1" version="$2"
    if "$name" --version 2>/dev/null | grep -qF "$version"; then return 0; fi
    cargo install "$name" --version "$version" --locked
}
install cargo-machete 0.9.2
install cargo-deny 0.20.2
