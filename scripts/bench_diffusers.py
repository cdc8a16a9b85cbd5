"""Time diffusers on the same weights `cargo bench --bench models` used, and print the ratio.

Reads target/bench-models/results.json (written by the Rust bench in the same run), loads each
model's unet/ and vae/ with diffusers, times what the Rust bench timed with the same shapes,
repetitions and thread count (one UNet call at batch 1, 2 and 8, one VAE decode, and for the
medium model a whole StableDiffusionPipeline generation: 256x256, 20 DDIM steps, guidance 7.5),
and prints tiller/diffusers per row. Its own times go to target/bench-models/diffusers.json.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

root = Path(__file__).resolve().parent.parent
results = json.loads((root / "target/bench-models/results.json").read_text())
reps = int(os.environ.get("TILLER_BENCH_REPS", "10"))


def median_ms(fn, n=None):
    fn()
    times = []
    for _ in range(n or reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


rows = []
timings = {}
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
        for b in (1, 2, 8):
            if f"unet_step_b{b}_ms" not in r:
                continue
            x = torch.randn(b, unet.config.in_channels, side, side, generator=g)
            ctx = torch.randn(b, 77, ctx_dim, generator=g)
            kw = {}
            if unet.config.time_cond_proj_dim:
                kw["timestep_cond"] = torch.randn(b, unet.config.time_cond_proj_dim, generator=g)
            t = torch.tensor(500.0)
            out[f"unet_step_b{b}_ms"] = median_ms(lambda: unet(x, t, ctx, **kw))
        if "vae_decode_ms" in r:
            z = torch.randn(1, vae.config.latent_channels, side, side, generator=g)
            out["vae_decode_ms"] = median_ms(lambda: vae.decode(z))
        if "attention_4096_ms" in r:
            q, k, v = (torch.randn(1, 4, 4096, 16, generator=g) for _ in range(3))
            out["attention_4096_ms"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        if "generate_20_steps_ms" in r:
            pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)

            def generate():
                pipe("a red circle above a blue square", num_inference_steps=20, guidance_scale=7.5, height=256,
                     width=256, generator=torch.Generator().manual_seed(7), output_type="np")

            out["generate_20_steps_ms"] = median_ms(generate, max(3, -(-reps // 3)))
        timings[name] = out
        for k, v in out.items():
            rows.append((name, k, r[k], v, r[k] / v))
(root / "target/bench-models/diffusers.json").write_text(json.dumps(timings, indent=2))

print(f"{'model':<10} {'measure':<21} {'tiller ms':>10} {'diffusers ms':>13} {'ratio':>7}")
for name, k, a, b, ratio in rows:
    print(f"{name:<10} {k:<21} {a:>10.2f} {b:>13.2f} {ratio:>7.2f}")
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {reps}")
sys.exit(0)
