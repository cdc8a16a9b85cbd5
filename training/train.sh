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

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${TILLER_FIXTURE_VENV:-$repo/.venv-fixtures}"
python="${PYTHON:-python3}"
pins=(torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 safetensors numpy matplotlib)

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv $venv" >&2
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata as m
want = {"torch": "2.15.0", "diffusers": "0.42.1", "transformers": "5.23.0"}
ok = all(m.version(k).split("+")[0] == v for k, v in want.items())
for k in ("safetensors", "numpy", "matplotlib"):
    m.version(k)
raise SystemExit(0 if ok else 1)
PY
then
    echo "installing ${pins[*]} into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --no-cache-dir "${pins[@]}"
fi

# The generator is cheap; the debug build shares CI's test build.
(cd "$repo" && cargo build --quiet --bin tiller)
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
exec "$venv/bin/python" "$here/train_shapes.py" --tiller "$repo/target/debug/tiller" "$@"
