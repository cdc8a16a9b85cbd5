#!/usr/bin/env bash
# Fuzz each parser target of fuzz/ for a fixed time (default 60 s each; FUZZ_SECONDS to change):
#   lora_file           LoRA files: safetensors reader, LoRA layouts, matching and deltas
#   generation_request  request JSON: parsing, validation, steering/reward specs, memory estimate
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz needs nightly compiler features;
# RUSTC_BOOTSTRAP=1 lets the stable toolchain provide them. Exits non-zero on the first crash,
# leaving the input in fuzz/artifacts/<target>/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../../fuzz"
seconds="${FUZZ_SECONDS:-60}"
export RUSTC_BOOTSTRAP=1
for target in lora_file generation_request; do
    dict=()
    [ -f "$target.dict" ] && dict=("-dict=$target.dict")
    echo "== fuzzing $target for $seconds s"
    cargo fuzz run "$target" -- -max_total_time="$seconds" "${dict[@]}"
done
echo "fuzz: no crashes"
