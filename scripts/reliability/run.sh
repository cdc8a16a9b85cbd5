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
server=""
cleanup() {
    [ -n "$server" ] && { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT

# start_server NAME EXTRA_LIMITS: serve the embedded default model on a free port with
# NAME.toml; sets $server and exports TILLER_URL.
start_server() {
    local name="$1" limits="$2" port
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cat > "$work/$name.toml" <<TOML
[server]
bind = "127.0.0.1:$port"
[models]
root = "$repo/models"
device = "cpu"
[limits]
request_timeout_secs = 120
$limits
[adapters]
root = "$work/adapters"
[storage]
data_dir = "$work/data"
[rewards.unreachable]
kind = "http"
url = "http://127.0.0.1:9/score"
timeout_ms = 500
TOML
    mkdir -p "$work/adapters"
    "$bin" serve --config "$work/$name.toml" > "$work/$name.log" 2>&1 &
    server=$!
    export TILLER_URL="http://127.0.0.1:$port"
    for _ in $(seq 1 600); do
        curl -sf "$TILLER_URL/ready" >/dev/null && return 0
        kill -0 "$server" 2>/dev/null || { cat "$work/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "tiller did not become ready" >&2
    cat "$work/$name.log" >&2
    exit 1
}

echo "== openai client"
start_server client ""
"$python" "$here/openai_client.py"

# Schemathesis: every operation of the committed document, schema-valid and schema-invalid
# inputs. Valid generations must finish quickly, so this server's limits are small (a request
# over them is a documented 400, not a failure); the load test below uses the default limits.
echo "== schemathesis"
start_server schema "max_steps = 4
max_n = 2
max_particles = 4
max_reno_iterations = 2"
examples=$([ "$short" = 1 ] && echo 25 || echo 100)
# From the scratch directory: schemathesis keeps a cache of its findings in the working directory.
(cd "$work" && "$(dirname "$python")/schemathesis" run "$repo/openapi/openapi.json" --url "$TILLER_URL" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
    --max-examples "$examples" --seed 2026 --workers 2 --request-timeout 60 \
    --suppress-health-check too_slow,filter_too_much --output-truncate true)
if grep -q "panicked" "$work/schema.log"; then
    echo "the server logged a panic during schemathesis" >&2
    grep -m5 "panicked" "$work/schema.log" >&2
    exit 1
fi

echo "== load"
start_server load ""
if [ "$short" = 1 ]; then
    "$python" "$here/load.py" "$TILLER_URL" --clients 16 --seconds 15 --pid "$server"
else
    "$python" "$here/load.py" "$TILLER_URL" --clients 64 --seconds 60 --pid "$server"
fi
# The server is still healthy after all of it.
curl -sf "$TILLER_URL/ready" >/dev/null
echo "reliability: all checks passed"
