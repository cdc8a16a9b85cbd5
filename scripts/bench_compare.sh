#!/usr/bin/env bash
# Runs the Rust model benchmark and the diffusers timing on the same weights, in one go, and
# prints tiller/diffusers ratios (< 1 means tiller is faster).
# Needs the fixture virtualenv (scripts/fixtures/make_fixtures.sh creates it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TILLER_FIXTURE_VENV:-.venv-fixtures}"
if [ ! -x "$venv/bin/python" ]; then
  echo "no virtualenv at $venv: run scripts/fixtures/make_fixtures.sh first or set TILLER_FIXTURE_VENV" >&2
  exit 1
fi
cargo bench --bench models -- "$@"
"$venv/bin/python" scripts/bench_diffusers.py
