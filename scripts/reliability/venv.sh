#!/usr/bin/env bash
# Create (or reuse) the reliability checks' venv with the pinned clients of requirements.txt.
# Prints the venv's python. The venv lives at $TILLER_RELIABILITY_VENV (default
# <repo>/.venv-reliability).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${TILLER_RELIABILITY_VENV:-$repo/.venv-reliability}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv $venv" >&2
    "$python" -m venv "$venv"
fi
missing=0
while read -r pin; do
    case "$pin" in ''|'#'*) continue ;; esac
    "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qixF "$pin" || missing=1
done < "$here/requirements.txt"
if [ "$missing" = 1 ]; then
    echo "installing $(grep -v '^#' "$here/requirements.txt" | tr '\n' ' ')into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --no-cache-dir -r "$here/requirements.txt" >&2
fi
echo "$venv/bin/python"
