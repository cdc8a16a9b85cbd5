#!/usr/bin/env bash
# The reliability campaign against a real tiller serving the embedded default model:
#   1. the `openai` Python client (streaming included)       openai_client.py
#   2. schemathesis against the committed OpenAPI document   (0 server errors, 0 schema violations)
#   3. a load test: concurrent clients, every accepted request answered, overload = 429 +
#      Retry-After, RSS bounded                               load.py
# Usage: scripts/reliability/run.sh [--short]   (--short: CI's quick version)
# Needs target/debug/tiller (cargo build) or TILLER_BIN; installs its pinned clients via venv.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
short=0
[ "${1:-}" = "--short" ] && short=1
bin="${TILLER_BIN:-$repo/target/debug/tiller}"
[ -x "$bin" ] || { echo "no tiller binary at $bin; run cargo build first" >&2; exit 1; }
python="$("$here/venv.sh")"

work="$(mktemp -d)"
port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$work/tiller.toml" <<TOML
[server]
bind = "127.0.0.1:$port"
[models]
root = "$repo/models"
device = "cpu"
[limits]
queue_depth = 8
request_timeout_secs = 120
[rewards.unreachable]
kind = "http"
url = "http://127.0.0.1:9/score"
timeout_ms = 500
TOML
"$bin" serve --config "$work/tiller.toml" > "$work/server.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export TILLER_URL="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
    curl -sf "$TILLER_URL/ready" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
done
curl -sf "$TILLER_URL/ready" >/dev/null || { echo "tiller did not become ready" >&2; cat "$work/server.log" >&2; exit 1; }

echo "== openai client"
"$python" "$here/openai_client.py"

echo "== schemathesis"
examples=$([ "$short" = 1 ] && echo 40 || echo 200)
"$python" "$here/schema.py" "$TILLER_URL" "$repo/openapi/openapi.json" "$examples"

echo "== load"
if [ "$short" = 1 ]; then
    "$python" "$here/load.py" "$TILLER_URL" --clients 16 --seconds 15 --pid "$server"
else
    "$python" "$here/load.py" "$TILLER_URL" --clients 64 --seconds 60 --pid "$server"
fi
# The server is still healthy after all of it.
curl -sf "$TILLER_URL/ready" >/dev/null
echo "reliability: all checks passed"
