#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: runs the CUDA build of tiller against the CPU
# path on the same machine and prints a report (also written to $OUT/gpu-check.md when OUT is set,
# else to target/gpu-check/). Nothing here needs the network.
#
#   scripts/build-cuda.sh                 # on any machine: target/cuda/release/tiller
#   scripts/gpu-check.sh                  # on the GPU machine, from the repository root
#
# What it checks:
#   1. parity: each fixture pipeline and the default model, 8 steps from the same initial noise,
#      CUDA f32 against CPU f32 (final latents within 1e-3), and f16 / bf16 against CPU f32
#      (reported; within 5e-2 / 1e-1, the size of the differences half precision shows in
#      diffusers' own pipelines on small models);
#   2. throughput of the default model (20 DDIM steps, CFG) at n = 1, 8 and 32 on the GPU, and
#      at n = 1 and 8 on the CPU, from the timings tiller prints;
#   3. FK steering with 8 particles end to end on the GPU;
#   4. diffusers on the same GPU, when a Python with torch (CUDA) and diffusers is available
#      (TILLER_GPU_PYTHON, default python3): the same default-model generation timed by its
#      pipeline, for the ratio. Skipped, and said so, otherwise.
#
# Env: TILLER_BIN (default target/cuda/release/tiller), TILLER_CUDA_LIBS (directory with the
# CUDA 13 runtime libraries, default: the wheels in TILLER_CUDA_VENV (.venv-cuda) when present,
# else the system's).
set -uo pipefail
cd "$(dirname "$0")/.."

bin="${TILLER_BIN:-target/cuda/release/tiller}"
out="${OUT:-target/gpu-check}"
mkdir -p "$out"
report="$out/gpu-check.md"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0

libs="${TILLER_CUDA_LIBS:-}"
if [ -z "$libs" ]; then
    libs="$(ls -d "${TILLER_CUDA_VENV:-.venv-cuda}"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1 || true)"
fi
[ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say() { echo "$*" | tee -a "$report"; }
: >"$report"
say "# tiller GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
say '```'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$report"
say "binary: $bin"
say '```'
if [ ! -x "$bin" ]; then
    say "no CUDA binary at $bin: build it with scripts/build-cuda.sh (CUDA_COMPUTE_CAP for this GPU)"
    exit 1
fi

gen() { # gen LABEL DEVICE DTYPE MODEL N STEPS [extra args...]
    local label="$1" device="$2" dtype="$3" model="$4" n="$5" steps="$6"
    shift 6
    "$bin" generate --model "$model" --prompt "a red circle above a blue square" --seed 7 -n "$n" \
        --steps "$steps" --device "$device" --dtype "$dtype" --quiet --save-latents "$work/$label.safetensors" \
        "$@" >"$work/$label.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        say "FAIL $label: exit $rc"
        tail -n 5 "$work/$label.log" | tee -a "$report"
        failures=$((failures + 1))
    fi
    return $rc
}

say ""
say "## 1. Parity against the CPU (8 steps, same initial noise)"
say ""
say '```'
for model in tests/fixtures/models/sd15-tiny tests/fixtures/models/sd2-tiny tests/fixtures/models/lcm-tiny models/shapes; do
    name="$(basename "$model")"
    gen "$name-cpu" cpu f32 "$model" 2 8 || continue
    for spec in "f32 1e-3" "f16 5e-2" "bf16 1e-1"; do
        set -- $spec
        gen "$name-cuda-$1" cuda:0 "$1" "$model" 2 8 --init-latents "$work/$name-cpu.safetensors" || continue
        python3 scripts/gpu/compare.py "$work/$name-cpu.safetensors" "$work/$name-cuda-$1.safetensors" "$2" \
            "$name cuda $1" 2>&1 | tee -a "$report"
        [ "${PIPESTATUS[0]}" -eq 0 ] || failures=$((failures + 1))
    done
done
say '```'

say ""
say "## 2. Throughput, default model (64x64, 20 DDIM steps, CFG 7.5)"
say ""
say "| device | n | denoise ms | images/s (denoise) | whole line |"
say "|---|---|---|---|---|"
for run in "cpu 1" "cpu 8" "cuda:0 1" "cuda:0 8" "cuda:0 32"; do
    set -- $run
    gen "tp-$1-$2" "$1" f32 models/shapes "$2" 20 || continue
    line="$(grep -m1 'denoise' "$work/tp-$1-$2.log")"
    ms="$(echo "$line" | sed -E 's/.*denoise ([0-9]+) ms.*/\1/')"
    say "| $1 | $2 | $ms | $(python3 -c "print(f'{$2 / max($ms, 1) * 1000:.1f}')") | ${line} |"
done

say ""
say "## 3. FK steering, 8 particles, 20 steps, on the GPU"
say ""
say '```'
if gen fk-cuda cuda:0 f32 models/shapes 1 20 --steering '{"method": "fk", "particles": 8}' --reward '"brightness"'; then
    grep -m1 'done' "$work/fk-cuda.log" | tee -a "$report"
fi
say '```'

say ""
say "## 4. diffusers on the same GPU"
say ""
py="${TILLER_GPU_PYTHON:-python3}"
if "$py" -c 'import torch, diffusers; assert torch.cuda.is_available()' 2>/dev/null; then
    "$py" scripts/gpu/diffusers_time.py models/shapes 2>&1 | tee -a "$report"
else
    say "skipped: no Python with torch (CUDA) and diffusers here (set TILLER_GPU_PYTHON)"
fi

say ""
say "failures: $failures"
echo "report: $report"
[ "$failures" -eq 0 ]
