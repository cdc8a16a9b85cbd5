#!/usr/bin/env bash
# Smoke runs of the training scripts (what CI runs; the shipped weights are committed and CI
# never trains them): a few steps of each on tiny networks, loaded back by tiller.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Keeps training/train_shapes.py honest (the shipped weights are committed; CI never trains
# them): builds its pinned venv, runs 3 VAE + 3 UNet steps of tiny networks, and checks that
# tiller loads the resulting diffusers directory and generates from it.
smoke="$(mktemp -d)"
trap 'rm -rf "$smoke"' EXIT
training/train.sh --tiny --out "$smoke/model" --logs "$smoke/logs"
target/debug/tiller generate --model "$smoke/model" --prompt "a red circle" --steps 2 --seed 1 \
    --output "$smoke/out.png" --quiet
test -s "$smoke/out.png"
# --tiny also keeps two weight averages besides the shipped one (--ema-variants 0,0.9).
test -s "$smoke/logs/variants/ema-0/unet/diffusion_pytorch_model.safetensors"
test -s "$smoke/logs/variants/ema-0.9/text_encoder/model.safetensors"
test -s "$smoke/logs/variants/vae-before-refine/diffusion_pytorch_model.safetensors"
# The raw weights are saved as they were, not after an average overwrote them: they differ from
# both the shipped average and the 0.9 one.
"${TILLER_FIXTURE_VENV:-.venv-fixtures}/bin/python" - "$smoke" <<'PY'
import sys
from safetensors.torch import load_file
root = sys.argv[1]
name = "unet/diffusion_pytorch_model.safetensors"
raw, avg, shipped = (load_file(f"{root}/{p}/{name}") for p in ("logs/variants/ema-0", "logs/variants/ema-0.9", "model"))
for label, other in (("0.9", avg), ("shipped", shipped)):
    assert any(not raw[k].equal(other[k]) for k in raw), f"raw weights equal the {label} average"
print("weight averages: raw differs from the 0.9 and shipped averages")
PY
# A bad --ema-variants stops before any training, naming the option.
if training/train.sh --tiny --ema-variants 1.5 --out "$smoke/bad" --logs "$smoke/bad-logs" 2>"$smoke/bad.err"; then
    echo "train.sh accepted --ema-variants 1.5" >&2
    exit 1
fi
grep -q -- "argument --ema-variants" "$smoke/bad.err"
# The UNet stage's other data path, fresh scenes every batch (the shipped recipe uses the pool),
# and its torch.compile path, which --tiny otherwise skips (about 4 minutes of compiling).
training/train.sh --tiny --pool 0 --compile --out "$smoke/fresh" --logs "$smoke/fresh-logs"
test -s "$smoke/fresh/unet/diffusion_pytorch_model.safetensors"
# The refine stage runs one pass per --refine-clean share (0.6,0.9 by default): two passes in one
# run give the same decoder as one pass and then `--only refine` with the second share, which is
# how the shipped decoder was made and how a run's decoder can be refined again.
test -s "$smoke/logs/refine2_decoder_loss.csv"
training/train.sh --tiny --refine-clean 0.6 --out "$smoke/one-pass" --logs "$smoke/one-pass-logs"
first_pass_log="$(md5sum < "$smoke/one-pass-logs/refine_decoder_loss.csv")"
training/train.sh --only refine --refine-clean 0.9 --refine-steps 2 --vae-batch 2 \
    --out "$smoke/one-pass" --logs "$smoke/one-pass-logs"
# --only keeps the logs of the run it continues: its passes log under their own name.
test "$(md5sum < "$smoke/one-pass-logs/refine_decoder_loss.csv")" = "$first_pass_log"
test -s "$smoke/one-pass-logs/refine-only_decoder_loss.csv"
"${TILLER_FIXTURE_VENV:-.venv-fixtures}/bin/python" - "$smoke" <<'PY'
import sys
from safetensors.torch import load_file
root = sys.argv[1]
name = "vae/diffusion_pytorch_model.safetensors"
two, one = load_file(f"{root}/model/{name}"), load_file(f"{root}/one-pass/{name}")
assert all(two[k].equal(one[k]) for k in two), "two refine passes differ from one pass + --only refine"
print("refine passes: two in one run equal one pass + --only refine")
PY
if training/train.sh --tiny --refine-clean 0.6,2 --out "$smoke/bad" --logs "$smoke/bad-logs" 2>"$smoke/bad.err"; then
    echo "train.sh accepted --refine-clean 0.6,2" >&2
    exit 1
fi
grep -q -- "argument --refine-clean" "$smoke/bad.err"
# --unet-config (architecture trials): the saved UNet has the trial's architecture; an unreadable
# file is refused naming the option; --bench times the trial configs against the shipped step.
training/train.sh --tiny --unet-config training/trials/attn16.json --out "$smoke/attn16" --logs "$smoke/attn16-logs"
"${TILLER_FIXTURE_VENV:-.venv-fixtures}/bin/python" -c '
import json, sys
cfg = json.load(open(sys.argv[1]))
assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3, cfg["down_block_types"]
print("--unet-config: the saved UNet has cross-attention at every level")' "$smoke/attn16/unet/config.json"
if training/train.sh --tiny --unet-config "$smoke/missing.json" --out "$smoke/bad" --logs "$smoke/bad-logs" 2>"$smoke/bad.err"; then
    echo "train.sh accepted a missing --unet-config" >&2
    exit 1
fi
grep -q -- "argument --unet-config" "$smoke/bad.err"
training/train.sh --bench --tiny --no-compile --bench-reps 1 --bench-unets training/trials/tl2.json >"$smoke/bench.out"
grep -q "^tl2.json .*x the batch-32 step above" "$smoke/bench.out"

# ShapesCLIP (the shapes_clip reward): a few steps of a tiny model, its held-out report, and
# tiller loading it as a clip_score reward that steers.
training/train_shapes_clip.sh --tiny --out "$smoke/clip"
test -s "$smoke/clip/model.safetensors"
grep -q '"heldout_ranking_accuracy"' "$smoke/clip/eval.json"
printf '[rewards.tiny_clip]\nkind = "clip_score"\npath = "%s"\n' "$smoke/clip" >"$smoke/rewards.toml"
target/debug/tiller generate --model models/shapes --prompt "a red circle" --steps 2 --seed 1 --quiet \
    --config "$smoke/rewards.toml" --reward tiny_clip --steering '{"method": "best_of_n", "n": 2}' \
    --output "$smoke/clip.png" 2>"$smoke/clip.err"
grep -q "reward" "$smoke/clip.err"
# The LCM-LoRA distillation: a few steps, then tiller merges the adapter and samples with `lcm`.
training/train_shapes_lcm.sh --tiny --out "$smoke/lcm"
test -s "$smoke/lcm/pytorch_lora_weights.safetensors"
target/debug/tiller generate --model models/shapes --prompt "a red circle" --scheduler lcm --steps 2 \
    --guidance 1 --lora "$smoke/lcm" --seed 1 --quiet --output "$smoke/lcm.png"
test -s "$smoke/lcm.png"
