#!/usr/bin/env bash
# The playground page tested in headless Chromium (Debian's package, installed when missing),
# driven by Playwright from the reliability venv. Needs target/debug/tiller (cargo build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if ! command -v chromium >/dev/null; then
    echo "installing Chromium (Debian's package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq chromium >&2
fi
python="$("$repo/scripts/reliability/venv.sh")"
CHROMIUM="$(command -v chromium)" "$python" "$here/test.py" --bin "${TILLER_BIN:-$repo/target/debug/tiller}" "$@"
