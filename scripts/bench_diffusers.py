"""Time diffusers on the same weights `cargo bench --bench models` used, and print the ratio.

Reads target/bench-models/results.json (written by the Rust bench in the same run), loads each
model's unet/ and vae/ with diffusers, times one UNet call (batch 1 and 2) and one VAE decode
with the same shapes, repetitions and thread count, and prints tiller/diffusers per row.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

root = Path(__file__).resolve().parent.parent
results = json.loads((root / "target/bench-models/results.json").read_text())
reps = int(os.environ.get("TILLER_BENCH_REPS", "10"))


def median_ms(fn):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


rows = []
with torch.inference_mode():
    for name, r in results.items():
        torch.set_num_threads(int(r["threads"]))
        d = Path(r["dir"])
        unet = UNet2DConditionModel.from_pretrained(d / "unet").eval()
        vae = AutoencoderKL.from_pretrained(d / "vae").eval()
        side = r["latent_side"]
        g = torch.Generator().manual_seed(0)
        ctx_dim = unet.config.cross_attention_dim
        ctx_dim = ctx_dim if isinstance(ctx_dim, int) else ctx_dim[0]
        out = {}
        for b in (1, 2):
            x = torch.randn(b, unet.config.in_channels, side, side, generator=g)
            ctx = torch.randn(b, 77, ctx_dim, generator=g)
            kw = {}
            if unet.config.time_cond_proj_dim:
                kw["timestep_cond"] = torch.randn(b, unet.config.time_cond_proj_dim, generator=g)
            t = torch.tensor(500.0)
            out[f"unet_step_b{b}_ms"] = median_ms(lambda: unet(x, t, ctx, **kw))
        z = torch.randn(1, vae.config.latent_channels, side, side, generator=g)
        out["vae_decode_ms"] = median_ms(lambda: vae.decode(z))
        for k, v in out.items():
            rows.append((name, k, r[k], v, r[k] / v))

print(f"{'model':<10} {'measure':<16} {'tiller ms':>10} {'diffusers ms':>13} {'ratio':>7}")
for name, k, a, b, ratio in rows:
    print(f"{name:<10} {k:<16} {a:>10.2f} {b:>13.2f} {ratio:>7.2f}")
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
sys.exit(0)
