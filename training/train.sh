#!/usr/bin/env bash
# Train the shapes-world default model (models/shapes) from scratch, or a tiny smoke-test version.
#
#   training/train.sh                           # full model into models/shapes, logs in docs/training (~46 min on 2 AVX-512 cores)
#   training/train.sh --tiny --out DIR --logs DIR   # a few steps of tiny networks (what CI runs)
#   training/train.sh --bench                   # one training step's cost (compare `cargo bench --bench train_step`)
#
# Builds the scene generator (`tiller shapes stream`) and a virtualenv with pinned PyTorch /
# diffusers / transformers (the fixture scripts' venv: $TILLER_FIXTURE_VENV, default
# <repo>/.venv-fixtures), then runs training/train_shapes.py with the remaining arguments.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$python_bin" "$here/train_shapes.py" --tiller "$repo/target/debug/tiller" "$@"
