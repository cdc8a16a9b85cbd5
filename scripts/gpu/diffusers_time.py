"""Time diffusers' StableDiffusionPipeline on a tiller model directory, for the GPU check's ratio.

Usage: diffusers_time.py MODEL_DIR [DEVICE]   (DEVICE defaults to cuda)
Same work as the check's tiller runs: 64x64, 20 DDIM steps, guidance 7.5, n = 1, 8 and 32.
Prints a markdown table of the denoising-plus-decoding wall time per call.
"""
import sys
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

model, device = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cuda")
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe = pipe.to(device)
pipe.set_progress_bar_config(disable=True)
size = pipe.unet.config.sample_size * pipe.vae_scale_factor


def run(n):
    g = torch.Generator(device).manual_seed(7)
    pipe("a red circle above a blue square", num_inference_steps=20, guidance_scale=7.5, height=size, width=size,
         num_images_per_prompt=n, generator=g, output_type="np")


print(f"diffusers, torch {torch.__version__}, {device}, {size}x{size}, 20 DDIM steps")
print("| n | ms per call | images/s |")
print("|---|---|---|")
for n in (1, 8, 32):
    run(n)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run(n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ms = sorted(times)[1] * 1e3
    print(f"| {n} | {ms:.0f} | {n / ms * 1e3:.1f} |")
