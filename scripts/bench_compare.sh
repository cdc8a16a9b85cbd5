#!/usr/bin/env bash
# Runs the Rust model benchmark and the diffusers timing on the same weights and prints
# tiller/diffusers ratios (< 1 means tiller is faster).
#
# The two sides run one after the other, and a shared machine's speed drifts by 10 % or more
# over minutes, so TILLER_BENCH_ROUNDS (default 1) repeats the pair, alternating, and the
# summary gives each measure's ratio per round and their median. Arguments go to
# `cargo bench --bench models` (e.g. `medium` to run only the medium model); TILLER_BENCH_REPS
# sets the repetitions on both sides and TILLER_BENCH_ONLY the measures (diffusers times what the
# Rust side timed).
# Needs the fixture virtualenv (scripts/fixtures/make_fixtures.sh creates it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TILLER_FIXTURE_VENV:-.venv-fixtures}"
if [ ! -x "$venv/bin/python" ]; then
  echo "no virtualenv at $venv: run scripts/fixtures/make_fixtures.sh first or set TILLER_FIXTURE_VENV" >&2
  exit 1
fi
rounds="${TILLER_BENCH_ROUNDS:-1}"
out=target/bench-models
for round in $(seq 1 "$rounds"); do
  echo "== round $round of $rounds"
  cargo bench --bench models -- "$@"
  "$venv/bin/python" scripts/bench_diffusers.py
  cp "$out/results.json" "$out/round-$round-tiller.json"
  cp "$out/diffusers.json" "$out/round-$round-diffusers.json"
done
"$venv/bin/python" - "$out" "$rounds" <<'PY'
import json, statistics, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
ratios = {}
for r in range(1, rounds + 1):
    tiller = json.loads((out / f"round-{r}-tiller.json").read_text())
    diffusers = json.loads((out / f"round-{r}-diffusers.json").read_text())
    for name, measures in diffusers.items():
        for k, ms in measures.items():
            ratios.setdefault((name, k), []).append((tiller[name][k], ms))
print(f"\n{'model':<10} {'measure':<21} {'tiller/diffusers per round':<34} {'median':>7}")
for (name, k), pairs in ratios.items():
    per_round = [a / b for a, b in pairs]
    cells = " ".join(f"{x:.2f}" for x in per_round)
    print(f"{name:<10} {k:<21} {cells:<34} {statistics.median(per_round):>7.2f}")
PY
