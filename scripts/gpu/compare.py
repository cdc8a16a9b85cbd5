"""Compare two safetensors files written by `tiller generate --save-latents`, tensor by tensor.

Pure Python (no numpy, torch or safetensors package), so it runs on a bare GPU machine.
Usage: compare.py REFERENCE CANDIDATE TOLERANCE LABEL
Prints one line per tensor with the largest absolute difference; exits 1 when `latents`
differs by more than TOLERANCE.
"""
import json
import struct
import sys


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {meta['dtype']}, expected F32")
        a, b = meta["data_offsets"]
        out[name] = struct.unpack(f"<{(b - a) // 4}f", body[a:b])
    return out


ref, cand, tol, label = load(sys.argv[1]), load(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
worst = {}
for name in sorted(ref):
    if name not in cand or len(cand[name]) != len(ref[name]):
        raise SystemExit(f"{label}: {name} missing or of another size in {sys.argv[2]}")
    worst[name] = max(abs(x - y) for x, y in zip(ref[name], cand[name]))
print(f"{label}: " + ", ".join(f"{k} max |diff| {v:.2e}" for k, v in worst.items()) + f" (tolerance on latents {tol:g})")
sys.exit(0 if worst["latents"] <= tol else 1)
