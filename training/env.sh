# Sourced by the training scripts: the pinned virtualenv (the fixture scripts' venv:
# $TILLER_FIXTURE_VENV, default <repo>/.venv-fixtures) and the scene generator
# (`tiller shapes stream`, the debug build CI's tests share). Sets $repo, $here and $python_bin.
here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
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

(cd "$repo" && cargo build --quiet --bin tiller)
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}"
python_bin="$venv/bin/python"
