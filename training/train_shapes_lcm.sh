#!/usr/bin/env bash
# Distil models/shapes into the LCM-LoRA adapters/shapes-lcm (few-step `lcm` sampling).
#
#   training/train_shapes_lcm.sh                           # the shipped adapter
#   training/train_shapes_lcm.sh --tiny --out DIR          # a few steps (CI smoke test)
#
# Arguments go to training/train_shapes_lcm.py (--help lists them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$python_bin" "$here/train_shapes_lcm.py" --tiller "$repo/target/debug/tiller" "$@"
