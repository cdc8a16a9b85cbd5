#!/usr/bin/env bash
# Train ShapesCLIP, the `shapes_clip` reward (models/shapes-clip), from scratch.
#
#   training/train_shapes_clip.sh                          # the shipped model, ~25 min on 2 cores
#   training/train_shapes_clip.sh --tiny --out DIR         # a few steps of a tiny model (CI smoke test)
#
# Arguments go to training/train_shapes_clip.py (--help lists them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$python_bin" "$here/train_shapes_clip.py" --tiller "$repo/target/debug/tiller" "$@"
