"""Distil the shapes-world default model into an LCM-LoRA (adapters/shapes-lcm): few-step
consistency sampling with the `lcm` scheduler.

The recipe of Latent Consistency Models (Luo et al. 2023) and LCM-LoRA (Luo et al. 2023b),
skipping-step latent consistency distillation with the adapter as the only trainable part:
  * teacher: the frozen default model, one DDIM step (the ODE solver) from t_{n+k} to t_n with
    classifier-free guidance at a fixed scale (--guidance, the model's default 7.5), so the
    student learns the guided ODE and samples without CFG;
  * timesteps on the 50-step DDIM grid (t = 19, 39, ..., 999; skip k = 20), the grid the `lcm`
    scheduler's `original_inference_steps = 50` samples from;
  * student f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t) with LCM's boundary scalings
    (sigma_data 0.5, timestep scaling 10), LoRA enabled;
  * target f over the teacher's x_{t_n} with an exponential moving average of the LoRA weights
    (decay --ema, 0.95 as in LCM);
  * pseudo-Huber loss sqrt(d^2 + c^2) - c, c = 0.001.
LoRA (rank --rank, alpha = rank, so scale 1) on LCM-LoRA's modules: attention projections,
proj_in/out, feed-forward, ResNet convolutions and time-embedding projections, up/down samplers.
Saved in diffusers' LoRA layout (`unet.<module>.lora_A.weight`, `lora_B.weight`) as
adapters/shapes-lcm/pytorch_lora_weights.safetensors, which `tiller serve` registers by name.

Training latents are posterior means of fresh scenes from `tiller shapes stream` (scaled by the
VAE's scaling factor), encoded once into a pool, with their captions' text-encoder states.

Run it through training/train_shapes_lcm.sh. Seeded: on one machine and thread count a rerun
gives the same weights.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from train_shapes import SceneStream

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAX_TOKENS = 16

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


class LoraWrap(nn.Module):
    """base(x) + up(down(x)) for a Linear or Conv2d base (alpha = rank: scale 1)."""

    def __init__(self, base, rank, gen):
        super().__init__()
        self.base = base
        self.enabled = True
        if isinstance(base, nn.Linear):
            r = min(rank, base.in_features, base.out_features)
            self.down = nn.Linear(base.in_features, r, bias=False)
            self.up = nn.Linear(r, base.out_features, bias=False)
        else:
            r = min(rank, base.in_channels, base.out_channels)
            self.down = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(r, base.out_channels, 1, bias=False)
        with torch.no_grad():
            fan_in = self.down.weight[0].numel()
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=gen) / math.sqrt(fan_in))
            self.up.weight.zero_()
        self.rank = r

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        return y + self.up(self.down(x)) if self.enabled else y


def add_lora(unet, rank, gen):
    wraps = {}
    for name, module in list(unet.named_modules()):
        if not name.endswith(TARGETS) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        w = LoraWrap(module, rank, gen)
        setattr(parent, child, w)
        wraps[name] = w
    return wraps


def set_lora(wraps, enabled):
    for w in wraps.values():
        w.enabled = enabled


def boundary(t, scaling=10.0, sigma_data=0.5):
    s = t.double() * scaling
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s / (s ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def bcast(v):
    return v[:, None, None, None]


def x0_eps(eps, x, abar):
    return (x - (1 - abar).sqrt() * eps) / abar.sqrt()


@torch.no_grad()
def encode_pool(args, vae, tokenizer, text_encoder, tiller):
    stream = SceneStream(tiller, args.seed)
    lat, states = [], []
    start = time.time()
    for i in range(0, args.pool, 64):
        n = min(64, args.pool - i)
        x, captions, _ = stream.batch(n)
        lat.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        states.append(text_encoder(ids)[0])
    stream.close()
    uncond_ids = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    print(f"pool of {args.pool} scenes encoded in {time.time() - start:.0f}s", flush=True)
    return torch.cat(lat), torch.cat(states), text_encoder(uncond_ids)[0]


def save(wraps, out, rank):
    from safetensors.torch import save_file

    tensors = {}
    for name, w in wraps.items():
        tensors[f"unet.{name}.lora_A.weight"] = w.down.weight.detach().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = w.up.weight.detach().contiguous()
    os.makedirs(out, exist_ok=True)
    meta = {"unet": {"r": rank, "lora_alpha": rank}}
    save_file(tensors, os.path.join(out, "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(REPO, "models", "shapes"))
    ap.add_argument("--out", default=os.path.join(REPO, "adapters", "shapes-lcm"))
    ap.add_argument("--tiller", default=os.path.join(REPO, "target", "debug", "tiller"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=16000)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (100 warm-up steps, cosine decay)")
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--guidance", type=float, default=7.5, help="teacher CFG scale")
    ap.add_argument("--huber-c", type=float, default=0.001)
    ap.add_argument("--tiny", action="store_true", help="a few steps (CI smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.batch, args.pool, args.rank = 3, 4, 64, 4

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    tok_dir = os.path.join(args.model, "tokenizer")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(args.model, "text_encoder")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(args.model, "vae")).eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet")).eval()
    with open(os.path.join(args.model, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"
    abar_all = torch.cumprod(1 - betas, 0).float()
    k = sched["num_train_timesteps"] // 50
    grid = torch.arange(1, 51) * k - 1  # 19, 39, ..., 999

    for p in unet.parameters():
        p.requires_grad_(False)
    wraps = add_lora(unet, args.rank, gen)
    lora_params = [p for w in wraps.values() for p in (w.down.weight, w.up.weight)]
    for p in lora_params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in lora_params]
    n_params = sum(p.numel() for p in lora_params)
    print(f"LoRA rank {args.rank} on {len(wraps)} modules: {n_params / 1e6:.2f} M parameters", flush=True)

    latents, states, uncond = encode_pool(args, vae, tokenizer, text_encoder, args.tiller)
    opt = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=0.0)
    start = time.time()
    log = []
    w = args.guidance
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, latents.shape[0], (args.batch,), generator=gen)
        x0, ctx = latents[idx], states[idx]
        b = x0.shape[0]
        n = torch.randint(0, 50, (b,), generator=gen)
        t_start = grid[n]
        t_next = (t_start - k).clamp(min=0)
        noise = torch.randn(x0.shape, generator=gen)
        a_s = bcast(abar_all[t_start])
        # t_next = -1 would be the final image; at n = 0 the next grid point is t = 0 here
        a_n = bcast(abar_all[t_next])
        x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * noise
        cs_s, co_s = boundary(t_start)
        cs_n, co_n = boundary(t_next)

        # student, LoRA on
        set_lora(wraps, True)
        eps = unet(x_s, t_start, encoder_hidden_states=ctx).sample
        pred = bcast(cs_s) * x_s + bcast(co_s) * x0_eps(eps, x_s, a_s)

        with torch.no_grad():
            # teacher: the frozen model with CFG, one DDIM step t_start -> t_next
            set_lora(wraps, False)
            both = unet(torch.cat([x_s, x_s]), torch.cat([t_start, t_start]),
                        encoder_hidden_states=torch.cat([ctx, uncond.expand(b, -1, -1)])).sample
            e_c, e_u = both.chunk(2)
            e_g = e_u + w * (e_c - e_u)
            x0_t = x0_eps(e_g, x_s, a_s)
            x_n = a_n.sqrt() * x0_t + (1 - a_n).sqrt() * e_g
            # target: the EMA LoRA at t_next
            set_lora(wraps, True)
            live = [p.detach().clone() for p in lora_params]
            for p, e in zip(lora_params, ema):
                p.data.copy_(e)
            eps_t = unet(x_n, t_next, encoder_hidden_states=ctx).sample
            target = bcast(cs_n) * x_n + bcast(co_n) * x0_eps(eps_t, x_n, a_n)
            for p, v in zip(lora_params, live):
                p.data.copy_(v)

        loss = (torch.sqrt((pred.float() - target.float()) ** 2 + args.huber_c ** 2) - args.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, lora_params):
                e.mul_(args.ema).add_(p.detach(), alpha=1 - args.ema)
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - start
            print(f"step {step:>5}/{args.steps} loss {loss.item():.5f} lr {lr:.2e} {el:.0f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 6), "seconds": round(el, 1)})
        if (step + 1) % 500 == 0 or step == args.steps - 1:
            save(wraps, args.out, args.rank)
    seconds = time.time() - start
    summary = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "pool": args.pool, "rank": args.rank,
               "lr": args.lr, "ema": args.ema, "guidance": args.guidance, "huber_c": args.huber_c,
               "lora_parameters": n_params, "modules": len(wraps), "train_seconds": round(seconds, 1),
               "threads": args.threads, "torch": torch.__version__, "log": log}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"saved {args.out} after {seconds:.0f}s")


if __name__ == "__main__":
    main()
