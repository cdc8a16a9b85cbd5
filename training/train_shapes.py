"""Train the shapes-world default model (models/shapes) from scratch on CPU.

Every component is rebuilt: the CLIP BPE tokenizer (vocab.json + merges.txt), the AutoencoderKL
(64x64 RGB <-> 4x16x16 latents), and a CLIP text encoder trained jointly with the
UNet2DConditionModel on the epsilon-prediction DDPM objective; last, the decoder is refined on
the trained UNet's own latents. Scenes come from the project's own generator (`tiller shapes
stream`, the spec's implementation): fresh every batch for the VAE and decoder stages, and a pool
of `--pool` scenes encoded once for the UNet stage. The output is a diffusers
StableDiffusionPipeline directory.

Run it through training/train.sh, which builds the generator and the pinned virtualenv:
    training/train.sh                      # the full model, ~56-58 min on 2 cores
    training/train.sh --tiny --out /tmp/x  # a few steps of a tiny config (CI smoke test)
    training/train.sh --bench              # time one training step (compare benches/train_step.rs)

Seeded: the generator seed, the torch seed and the data order are fixed by --seed; on one
machine and thread count a rerun gives the same weights.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts", "fixtures"))
import clip_bpe  # noqa: E402  (our CLIP-format BPE writer, shared with the fixtures)

RECORD = 2 + 94 + 64 * 64 * 3  # `tiller shapes stream` record size
CATEGORIES = ["single", "counting", "two_objects", "position", "colors"]

# The world's vocabulary (spec v1) comes first so each word is one token; the general English
# word list behind it lets other prompts split into known pieces instead of bytes.
WORLD_WORDS = (
    "a and of left right above below two three four red green blue yellow purple cyan "
    "circle circles square squares triangle triangles"
).split()

MAX_TOKENS = 16  # bos + the longest caption (9 words) + eos fits with room to spare

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=128,
)

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def load_json(path):
    with open(path) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


TINY = {
    "unet": dict(block_out_channels=[32, 32, 32], attention_head_dim=2, norm_num_groups=8),
    "vae": dict(block_out_channels=[8, 8, 8], norm_num_groups=8),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 projection_dim=32),
}


class SceneStream:
    """Reads scenes from `tiller shapes stream --seed S` (images in [-1, 1], captions)."""

    def __init__(self, tiller, seed, start=0):
        self.proc = subprocess.Popen(
            [tiller, "shapes", "stream", "--seed", str(seed), "--start", str(start)],
            stdout=subprocess.PIPE,
            bufsize=1 << 20,
        )

    def batch(self, n):
        raw = self.proc.stdout.read(n * RECORD)
        if len(raw) != n * RECORD:
            raise RuntimeError("the scene generator stopped early (see its stderr)")
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(n, RECORD)
        captions = [bytes(r[2:2 + r[1]]).decode() for r in rec]
        categories = [CATEGORIES[r[0]] for r in rec]
        pix = rec[:, 96:].reshape(n, 64, 64, 3).astype(np.float32)
        images = torch.from_numpy(pix).permute(0, 3, 1, 2) / 127.5 - 1.0
        return images.contiguous(), captions, categories

    def close(self):
        self.proc.stdout.close()
        self.proc.kill()
        self.proc.wait()


def write_tokenizer(directory):
    from transformers import CLIPTokenizer

    words = list(WORLD_WORDS)
    for w in clip_bpe.training_words():
        if w not in words:
            words.append(w)
    clip_bpe.write_clip_bpe(directory, words)
    tok = CLIPTokenizer(
        os.path.join(directory, "vocab.json"),
        os.path.join(directory, "merges.txt"),
        model_max_length=MAX_TOKENS,
        pad_token="<|endoftext|>",
    )
    for w in WORLD_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, f"'{w}' is not one token"
    return tok


class Ema:
    """Exponential moving average of parameters with the usual warm-up: the decay at update n is
    min(`decay`, (1 + n) / (10 + n)), so the ramp rules for the first 9 / (1 - decay) updates.
    At the shipped 4,000 steps the ramp is at 0.9978 (0.999 would take 8,990 updates): the average
    spans about the last ninth of training, whatever `decay` above 0.998 is given."""

    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, module):
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)


BACKGROUND = 240 / 127.5 - 1.0  # the spec's background grey on the [-1, 1] scale


def object_weight(x, strength):
    """Per-pixel loss weight 1 + strength on and around objects, 1 on far background.

    Objects cover 4-25 % of a scene, so a plain reconstruction loss is mostly about the flat
    background; the evaluator, though, judges edges, corners and the 3-pixel gaps between objects.
    The mask is dilated by 3 pixels so those gaps count as object pixels too."""
    fg = ((x - BACKGROUND).abs().amax(dim=1, keepdim=True) > 0.05).float()
    fg = F.max_pool2d(fg, kernel_size=7, stride=1, padding=3)
    return 1.0 + strength * fg


def weighted_mean(err, w):
    return (err * w).sum() / (w.sum() * err.shape[1])


def training_schedule():
    """The DDPM noise schedule the UNet is trained on (the shipped DDIM config's betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    def __init__(self, path, fields):
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerow(fields)

    def row(self, *values):
        self.w.writerow(values)
        self.f.flush()


def build_models(args):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_cfg = load_json(os.path.join(HERE, "vae_config.json"))
    unet_cfg = dict(args.unet_config)
    text_cfg = dict(TEXT_CONFIG)
    if args.tiny:
        vae_cfg.update(TINY["vae"])
        unet_cfg.update(TINY["unet"])
        text_cfg.update(TINY["text"])
    vae = AutoencoderKL(**vae_cfg)
    unet_cfg["cross_attention_dim"] = text_cfg["hidden_size"]
    unet = UNet2DConditionModel(**unet_cfg)
    return vae, unet, text_cfg


def train_vae(args, vae, stream, log_dir):
    log = Log(os.path.join(log_dir, "vae_loss.csv"), ["step", "seconds", "l1", "kl", "lr"])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, fused=True)
    vae.train()
    start = time.time()
    for step in range(args.vae_steps):
        lr = lr_at(step, args.vae_steps, args.vae_lr, min(200, args.vae_steps // 10 + 1))
        for g in opt.param_groups:
            g["lr"] = lr
        x = stream.batch(args.vae_batch)[0].to(args.device)
        post = vae.encode(x).latent_dist
        z = post.sample()
        y = vae.decode(z).sample
        w = object_weight(x, args.object_weight)
        l1 = weighted_mean((y - x).abs(), w)
        kl = post.kl().mean() / (16 * 16 * 4)
        loss = l1 + 0.05 * weighted_mean((y - x) ** 2, w) + args.kl_weight * kl
        l1, kl = l1.detach(), kl.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.vae_steps - 1:
            log.row(step, round(time.time() - start, 1), float(l1), float(kl), lr)
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae {step:>6}/{args.vae_steps}  l1 {float(l1):.4f}  kl {float(kl):.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    vae.eval()
    return time.time() - start


def trainable_decoder(vae):
    """Freeze the encoder (so the latents the UNet learns do not change) and return the decoder's
    parameters, made trainable."""
    for p in list(vae.encoder.parameters()) + list(vae.quant_conv.parameters()):
        p.requires_grad_(False)
    params = [p for p in vae.decoder.parameters()] + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def decoder_loss(y, x, weight):
    w = object_weight(x, weight)
    return weighted_mean((y - x).abs(), w) + 0.5 * weighted_mean((y - x) ** 2, w)


def train_decoder(args, vae, log_dir, stage):
    """Fine-tune the decoder (encoder frozen) on posterior *means*, which is what it decodes at
    inference: trained on posterior samples only, it decoded means with mottled interiors (53 % of
    reconstructions judged correct; 90 % after this stage). The encoder, hence the latents the
    UNet learns, is unchanged, so the stage may run before or after the UNet stage.

    Two stages use it. "decoder": exact means, object-weighted loss (sharp edges and gaps).
    "robust": means plus Gaussian noise of a random level up to `--robust-noise` latent stds,
    plain loss. Generated latents are never exact; a decoder that has only seen exact means turned
    their small errors into tinted background patches, which the evaluator reads as extra regions.
    """
    if stage == "decoder":
        steps, noise, weight, name = args.decoder_steps, 0.0, args.object_weight, "decoder_loss.csv"
    else:
        steps, noise, weight, name = args.robust_steps, args.robust_noise, 0.0, "robust_decoder_loss.csv"
    stream = SceneStream(args.tiller, seed=args.seed + (5 if stage == "decoder" else 6))
    gen = torch.Generator().manual_seed(args.seed + 6)
    zstd = 1.0 / vae.config.scaling_factor

    @torch.no_grad()
    def inputs(step):
        x = stream.batch(args.vae_batch)[0].to(args.device)
        z = vae.encode(x).latent_dist.mean
        if noise > 0:
            level = torch.rand(z.shape[0], 1, 1, 1, generator=gen) * noise * zstd
            z = z + (level * torch.randn(z.shape, generator=gen)).to(args.device)
        return z, x

    seconds = fit_decoder(args, vae, os.path.join(log_dir, name), stage, steps, inputs, weight)
    stream.close()
    return seconds


def fit_decoder(args, vae, csv_path, stage, steps, inputs, weight, warmup=0, print_every=100):
    """The decoder stages' shared loop: `inputs(step)` gives (latents to decode, the scenes they
    must become); encoder frozen, AdamW at `--decoder-lr` (linear warm-up over `warmup` steps)."""
    log = Log(csv_path, ["step", "seconds", "loss"])
    params = trainable_decoder(vae)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, fused=True)
    start = time.time()
    for step in range(steps):
        if warmup:
            for g in opt.param_groups:
                g["lr"] = args.decoder_lr * min(1.0, (step + 1) / warmup)
        z, x = inputs(step)
        y = vae.decode(z).sample
        loss = decoder_loss(y, x, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.row(step, round(time.time() - start, 1), float(loss.detach()))
        if step % print_every == 0 or step == steps - 1:
            print(f"{stage} {step:>5}/{steps}  loss {float(loss.detach()):.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    for p in vae.parameters():
        p.requires_grad_(False)
    vae.eval()
    return time.time() - start


@torch.no_grad()
def denoise_back(unet, sched, latents, ctx, uncond, t_start, noise, guidance, k=5):
    """The trained UNet's own version of real latents: noise each to its `t_start`, then run `k`
    guided DDIM steps back to the clean estimate (the last step's x0 prediction)."""
    alphas = sched.alphas_cumprod.to(latents.device)
    a = alphas[t_start].view(-1, 1, 1, 1)
    z = a.sqrt() * latents + (1 - a).sqrt() * noise
    n = len(latents)
    both = torch.cat([uncond, ctx])
    for j in range(k):
        t = (t_start.float() * (1 - j / k)).round().long().clamp(min=1)
        t_next = (t_start.float() * (1 - (j + 1) / k)).round().long()
        eps = unet(torch.cat([z, z]), torch.cat([t, t]), both).sample
        eps = eps[:n] + guidance * (eps[n:] - eps[:n])
        a = alphas[t].view(-1, 1, 1, 1)
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        a_next = torch.where(t_next.view(-1, 1, 1, 1) > 0, alphas[t_next].view(-1, 1, 1, 1), torch.ones_like(a))
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0


def refine_passes(args, vae, unet, text_encoder, tokenizer, log_dir, prefix="refine"):
    """One refine pass per `--refine-clean` share, in order; returns their seconds in all. Pass i
    logs to `<prefix><i>_decoder_loss.csv` (no number for the first), so `--only refine`, with its
    own prefix, keeps the logs of the run it continues.

    The second pass (more exact latents) gives back the round trip the first one costs: on the
    shipped run it took the judged reconstructions from 92.0 % to 95.2 % (README)."""
    seconds = 0.0
    for i, clean in enumerate(args.refine_clean):
        name = prefix if i == 0 else f"{prefix}{i + 1}"
        seconds += train_decoder_on_samples(args, vae, unet, text_encoder, tokenizer, log_dir, clean, name)
    return seconds


def train_decoder_on_samples(args, vae, unet, text_encoder, tokenizer, log_dir, clean, name):
    """The "refine" decoder stage, after the UNet: the decoder learns to draw the real scene from
    the trained UNet's own version of its latent (`denoise_back` from a random t in
    60..`--refine-tmax`; a `clean` share of exact latents keeps the round trip).

    Sampled latents differ from encoded ones in ways a decoder trained on encodings alone turns
    into mixed colours, rounded corners and tinted patches; here it learns to map the UNet's
    typical errors back onto the palette and the spec's geometry. The scene is the target, so the
    decoder is taught what was meant, never what the UNet drew. Encoder and UNet are frozen."""
    sched = training_schedule()
    for m in (unet, text_encoder):
        m.eval()
        m.requires_grad_(False)
    stream = SceneStream(args.tiller, seed=args.seed + 8)
    gen = torch.Generator().manual_seed(args.seed + 9)
    with torch.no_grad():
        empty = tokenizer([""] * args.vae_batch, padding="max_length", max_length=MAX_TOKENS,
                          return_tensors="pt").input_ids.to(args.device)
        uncond = text_encoder(empty).last_hidden_state
    sf = vae.config.scaling_factor

    @torch.no_grad()
    def inputs(step):
        x, captions, _ = stream.batch(args.vae_batch)
        x = x.to(args.device)
        latents, ids = encode_scenes(vae, tokenizer, x, captions, args.device)
        ctx = text_encoder(ids).last_hidden_state
        t_start = torch.randint(60, args.refine_tmax + 1, (len(ids),), generator=gen).to(args.device)
        noise = torch.randn(latents.shape, generator=gen).to(args.device)
        exact = (torch.rand(len(ids), generator=gen) < clean).to(args.device)
        z = latents.clone()
        redo = (~exact).nonzero().flatten()  # the UNet runs only on the latents that are replaced
        if len(redo):
            z[redo] = denoise_back(unet, sched, latents[redo], ctx[redo], uncond[redo], t_start[redo],
                                   noise[redo], args.guidance)
        return z / sf, x

    seconds = fit_decoder(args, vae, os.path.join(log_dir, f"{name}_decoder_loss.csv"), name,
                          args.refine_steps, inputs, args.refine_weight, warmup=20, print_every=50)
    stream.close()
    return seconds


@torch.no_grad()
def vae_holdout(vae, tiller, n, device):
    """Reconstruction MAE on [0, 1] of `n` held-out scenes (another seed), and the latent std."""
    stream = SceneStream(tiller, seed=999_999)
    x = stream.batch(n)[0].to(device)
    stream.close()
    z = vae.encode(x).latent_dist.mean
    y = vae.decode(z).sample.clamp(-1, 1)
    mae = float((y - x).abs().mean() / 2)
    return mae, float(z.std())


@torch.no_grad()
def encode_scenes(vae, tokenizer, x, captions, device):
    """UNet training inputs: latents (posterior means x scaling factor) and padded token ids."""
    latents = vae.encode(x.to(device)).latent_dist.mean * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return latents, ids


@torch.no_grad()
def encode_pool(args, vae, tokenizer, stream):
    """Encode `--pool` fresh scenes once: latents (posterior means x scaling factor) and token ids.

    The UNet stage then draws its batches from this pool (about `steps * batch / pool` epochs)
    instead of encoding every batch. Measured on an earlier model (batch 32): 284 s to encode
    32,000 scenes, then 0.85 s per step against ~0.9-0.96 s fresh, so at 2,300 steps it about
    breaks even; it pays off only for longer runs. Posterior means, not samples: the
    posterior's noise is unpredictable from the caption, and at small t it dominated the epsilon
    loss (0.33 plateau in a trial run) and decoded as colour smears."""
    latents, ids = [], []
    start = time.time()
    chunk = 64
    for i in range(0, args.pool, chunk):
        n = min(chunk, args.pool - i)
        x, captions, _ = stream.batch(n)
        z, tokens = encode_scenes(vae, tokenizer, x, captions, args.device)
        latents.append(z)
        ids.append(tokens)
        if (i // chunk) % 100 == 0:
            print(f"pool {i + n:>6}/{args.pool} scenes encoded  {time.time() - start:.0f}s", flush=True)
    print(f"pool of {args.pool} scenes encoded in {time.time() - start:.0f}s", flush=True)
    return torch.cat(latents), torch.cat(ids), time.time() - start


def train_unet(args, vae, unet, text_encoder, tokenizer, log_dir):
    # The stage's own scene stream: its data do not depend on whether the VAE stages ran in this
    # process (`--vae-from`) or before it, so both give the same UNet.
    stream = SceneStream(args.tiller, seed=args.seed + 7)

    sched = training_schedule()
    alphas = sched.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(args.device)
    pool_s = 0.0
    if args.pool:
        pool_latents, pool_ids, pool_s = encode_pool(args, vae, tokenizer, stream)
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_TOKENS,
                          return_tensors="pt").input_ids.to(args.device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # fused AdamW: one pass over all parameters instead of a chain of element-wise ones (with
    # channels-last, 0.83x the plain step's time in `training/train.sh --bench`)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    ema_unet, ema_text = Ema(unet, args.ema), Ema(text_encoder, args.ema)
    # Extra averages kept only to choose --ema (saved by save_variants, never shipped); 0 is the
    # raw weights and needs no average.
    variants = {d: (Ema(unet, d), Ema(text_encoder, d)) for d in args.ema_variants if d > 0}
    log = Log(os.path.join(log_dir, "unet_loss.csv"), ["step", "seconds", "loss", "lr"])
    gen = torch.Generator().manual_seed(args.seed + 1)
    # channels-last convolutions: 703 vs 752 ms per fwd+bwd+AdamW step of batch 32 with oneDNN on this
    # CPU (one back-to-back comparison of the two layouts; not part of training/train.sh --bench)
    unet.to(memory_format=torch.channels_last)
    # torch.compile (inductor's C++ kernels) fuses the group norms, activations and attention around
    # the oneDNN convolutions: 0.73x the plain step's time in `training/train.sh --bench`, after
    # 160-260 s of compiling forward and backward (/tmp/torchinductor_$USER caches it), so it pays
    # for itself after ~1,000 steps.
    forward = torch.compile(unet) if args.compile else unet
    if args.compile:
        print("compiling the UNet's training step (about 4 minutes on 2 cores, unless cached)", flush=True)
    unet.train()
    text_encoder.train()
    start = time.time()
    smooth = None
    order = torch.randperm(args.pool, generator=gen) if args.pool else None
    cursor = 0
    for step in range(args.unet_steps):
        lr = lr_at(step, args.unet_steps, args.lr, min(300, args.unet_steps // 10 + 1))
        for g in opt.param_groups:
            g["lr"] = lr
        if args.pool:
            if cursor + args.batch > args.pool:  # a new epoch over the pool, in a new order
                order, cursor = torch.randperm(args.pool, generator=gen), 0
            idx = order[cursor:cursor + args.batch].to(args.device)
            cursor += args.batch
            latents, ids = pool_latents[idx], pool_ids[idx]
        else:  # fresh scenes every batch (--pool 0)
            x, captions, _ = stream.batch(args.batch)
            latents, ids = encode_scenes(vae, tokenizer, x, captions, args.device)
        # Caption dropout trains the unconditional branch classifier-free guidance needs.
        drop = (torch.rand(len(ids), generator=gen) < args.uncond).to(args.device)
        ids = torch.where(drop[:, None], empty_ids, ids)
        ctx = text_encoder(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=gen).to(args.device)
        t = torch.randint(0, 1000, (len(ids),), generator=gen)
        # Input perturbation (Ning et al. 2023): the UNet sees x_t built from slightly wrong noise
        # but must still predict the true noise, as at sampling time, where x_t carries the errors
        # of earlier steps (exposure bias).
        seen = noise + args.input_perturbation * torch.randn(latents.shape, generator=gen).to(args.device) \
            if args.input_perturbation else noise
        noisy = sched.add_noise(latents, seen, t).to(args.device)
        t = t.to(args.device)
        pred = forward(noisy.contiguous(memory_format=torch.channels_last), t, ctx).sample
        # Min-SNR-5 weighting (Hang et al. 2023) for epsilon prediction: faster convergence.
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        for v_unet, v_text in variants.values():
            v_unet.update(unet)
            v_text.update(text_encoder)
        mse = float(per.mean())
        smooth = mse if smooth is None else 0.98 * smooth + 0.02 * mse
        if step % 10 == 0 or step == args.unet_steps - 1:
            log.row(step, round(time.time() - start, 1), mse, lr)
        if step % 100 == 0 or step == args.unet_steps - 1:
            print(f"unet {step:>6}/{args.unet_steps}  mse {smooth:.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
    stream.close()
    unet.to(memory_format=torch.contiguous_format)  # safetensors stores dense row-major tensors
    if args.ema_variants:
        save_variants(args, unet, text_encoder, variants)
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    unet.eval()
    text_encoder.eval()
    return time.time() - start, pool_s


def save_variants(args, unet, text_encoder, variants):
    """Called with the raw weights in place; the caller then loads the shipped average.

    `--ema-variants`: each listed average's UNet and text encoder under <logs>/variants/ema-<decay>/
    (0: the raw weights), to be judged against the shipped --ema. Put one in a copy of the output
    pipeline together with variants/vae-before-refine and run `--only refine` on it: the result is
    what a run with `--ema <decay>` would have shipped (the refine stage has its own seeded data)."""
    root = os.path.join(args.logs, "variants")
    for decay in sorted(args.ema_variants):  # 0 first: the raw weights, before an average overwrites them
        if decay > 0:
            for average, module in zip(variants[decay], (unet, text_encoder)):
                average.copy_to(module)
        for name, module in (("unet", unet), ("text_encoder", text_encoder)):
            module.save_pretrained(os.path.join(root, f"ema-{decay:g}", name), safe_serialization=True)
    print(f"saved weight averages {sorted(args.ema_variants)} under {root}", flush=True)


def bench(args):
    """Time one training step of the real configs at the batch sizes of benches/train_step.rs, then
    the UNet step as the UNet stage runs it (channels-last, fused AdamW, and with `--compile`
    torch.compile), as ratios to the plain step measured in the same run. Then that step at batch
    64 and for each `--bench-unets` config, as ratios to the UNet stage's step at batch 32: the
    relative cost of a recipe."""
    import copy

    from diffusers import UNet2DConditionModel

    vae, unet, _ = build_models(args)
    width = unet.config.cross_attention_dim

    def data(batch):
        return (torch.randn(batch, 4, 16, 16), torch.full((batch,), 500), torch.randn(batch, 16, width),
                torch.randn(batch, 4, 16, 16))
    x, t, ctx, _ = data(32)

    def unet_fwd():
        with torch.no_grad():
            unet(x, t, ctx)

    def unet_step_fn(net, forward, fused, memory_format, batch=32):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused)
        xin, tb, cb, target = data(batch)
        xin = xin.contiguous(memory_format=memory_format)

        def step():
            loss = F.mse_loss(forward(xin, tb, cb).sample, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    img = torch.randn(16, 3, 64, 64)

    def vae_step():
        y = vae.decode(vae.encode(img).latent_dist.mean).sample
        loss = (y - img).abs().mean()
        vopt.zero_grad()
        loss.backward()
        vopt.step()

    shipped = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    rows = [("unet forward", 32, unet_fwd),
            ("unet forward+backward+adamw", 32, unet_step_fn(unet, unet, False, torch.contiguous_format)),
            ("vae encode+decode+backward", 16, vae_step),
            ("unet step, channels-last + fused adamw", 32,
             unet_step_fn(shipped, shipped, True, torch.channels_last))]
    if args.compile:
        compiled = copy.deepcopy(shipped)
        rows.append(("unet step, as above + torch.compile", 32,
                     unet_step_fn(compiled, torch.compile(compiled), True, torch.channels_last)))
    recipes = [("unet step, channels-last + fused adamw", 64, shipped)]
    for name, cfg in args.bench_unets:
        net = UNet2DConditionModel(**dict(cfg, cross_attention_dim=width))
        recipes.append((name, 32, net.to(memory_format=torch.channels_last)))
    first_recipe = len(rows)
    for label, batch, net in recipes:
        rows.append((label, batch, unet_step_fn(net, net, True, torch.channels_last, batch)))
    plain = stage = None
    for i, (label, batch, f) in enumerate(rows):
        t0 = time.time()
        f()  # warm-up; for the compiled step this is the compile
        first = time.time() - t0
        t0 = time.time()
        for _ in range(args.bench_reps):
            f()
        ms = (time.time() - t0) * 1e3 / args.bench_reps
        if label == "unet forward+backward+adamw":
            plain = ms
        if label == "unet step, channels-last + fused adamw" and batch == 32:
            stage = ms
        if i >= first_recipe:
            ratio = f"  {ms / stage:.2f}x the batch-32 step above"
        else:
            ratio = f"  {ms / plain:.2f}x the plain unet step" if plain and label.startswith("unet step") else ""
        extra = f"  (first call {first:.0f} s)" if first > 5 else ""
        print(f"{label:<40} batch {batch:>3}: {ms:>9.1f} ms/step {ms / batch:>7.2f} ms/sample{ratio}{extra}",
              flush=True)


def save_pipeline(args, vae, unet, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    # Ship the tokenizer as SD 1.x does, vocab.json + merges.txt (tokenizer.json would only
    # repeat them, with transformers' padding settings).
    tj = os.path.join(args.out, "tokenizer", "tokenizer.json")
    if os.path.exists(tj):
        os.remove(tj)


def config_file(path):
    """An argparse type: a JSON config file, read (a missing or malformed file names the option)."""
    try:
        return load_json(path)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"cannot read the config '{path}': {e}")


def config_files(text):
    """`--bench-unets`: comma-separated JSON config files, as (file name, config) pairs."""
    return [(os.path.basename(path), config_file(path)) for path in text.split(",")]


def comma_floats(what, interval, inside, example):
    """An argparse type for a comma-separated list of numbers that `inside` accepts; a bad list
    is an error naming the option, before any training."""
    def parse(text):
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = None
        if not values or not all(inside(v) for v in values):
            raise argparse.ArgumentTypeError(
                f"expected {what} in {interval} separated by commas, e.g. {example}; got '{text}'")
        return values
    return parse


# `--refine-clean`: one refine pass per share; `--ema-variants`: extra averages (0 = raw weights)
shares = comma_floats("shares", "[0, 1]", lambda v: 0.0 <= v <= 1.0, "0.6,0.9")
ema_decays = comma_floats("decays", "[0, 1)", lambda v: 0.0 <= v < 1.0, "0,0.995")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "shapes"))
    ap.add_argument("--logs", default=os.path.join(REPO, "docs", "training"),
                    help="loss CSVs, the loss plot and summary.json go here")
    ap.add_argument("--tiller", default=os.path.join(REPO, "target", "release", "tiller"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=3e-4)
    ap.add_argument("--decoder-steps", type=int, default=400, help="decoder fine-tune on posterior means")
    ap.add_argument("--decoder-lr", type=float, default=3e-4)
    ap.add_argument("--robust-steps", type=int, default=0,
                    help="decoder steps on noisy posterior means (after the decoder stage)")
    ap.add_argument("--robust-noise", type=float, default=0.3,
                    help="largest latent noise of the robust decoder stage, in latent stds")
    ap.add_argument("--refine-steps", type=int, default=300,
                    help="decoder steps on the trained UNet's own versions of real latents (after the UNet)")
    ap.add_argument("--refine-tmax", type=int, default=400,
                    help="refine stage: latents are noised to a random t in 60..this, then denoised back")
    ap.add_argument("--refine-clean", type=shares, default=[0.6, 0.9],
                    help="refine stage: share of exact latents (keeps the VAE round trip); "
                         "one pass of --refine-steps per comma-separated share")
    ap.add_argument("--refine-weight", type=float, default=4.0,
                    help="refine stage: extra loss weight on and around objects")
    ap.add_argument("--only", choices=["robust", "refine"],
                    help="only this decoder stage, on the pipeline already at --out (the UNet does not "
                         "depend on it: the encoder is frozen); updates summary.json")
    ap.add_argument("--unet-config", type=config_file, default=os.path.join(HERE, "unet_config.json"), metavar="FILE",
                    help="UNet2DConditionModel config (architecture trials; cross_attention_dim follows the text encoder)")
    # Batch 64 for 4,000 steps: at 4,350 x 64 a GPU trial scored 0.66 against 0.40 for the earlier
    # 2,900 x 32, where twice the steps at batch 32 (run M) reached only 0.46 (README).
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=40000,
                    help="UNet stage: encode this many scenes once and sample batches from them "
                         "(0: encode fresh scenes every batch)")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="extra VAE loss weight on and around objects (0: plain mean, the shipped recipe)")
    ap.add_argument("--lr", type=float, default=2e-3, help="UNet + text encoder peak learning rate")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the UNet for its training stage (default: on, except with --tiny)")
    ap.add_argument("--input-perturbation", type=float, default=0.0,
                    help="std of extra noise in the UNet's input only (Ning et al. 2023); 0.1 scored "
                         "lower than 0 in one end-to-end run, so it is off")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped UNet and text encoder")
    ap.add_argument("--ema-variants", type=ema_decays, default=[],
                    metavar="D,D,...",
                    help="also keep these EMA decays (0: the raw weights) and save them under "
                         "<logs>/variants/ to choose --ema; the shipped weights are unchanged")
    ap.add_argument("--uncond", type=float, default=0.1, help="caption dropout rate")
    ap.add_argument("--device", default="cpu", help="cpu (the budgeted run) or cuda (recipe trials)")
    ap.add_argument("--sample-captions", metavar="DIR",
                    help="instead of training: generate DIR/captions.jsonl's captions with the diffusers "
                         "pipeline at --out into DIR/diffusers/ (judge with `tiller eval shapes --images`)")
    ap.add_argument("--vae-from", metavar="DIR", help="skip VAE training: load this AutoencoderKL folder")
    ap.add_argument("--tiny", action="store_true", help="tiny networks and a few steps (CI smoke test)")
    ap.add_argument("--bench", action="store_true", help="time one training step and exit")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale for --sample-captions")
    ap.add_argument("--bench-reps", type=int, default=3)
    ap.add_argument("--bench-unets", type=config_files, default=[],
                    metavar="FILE,FILE,...",
                    help="--bench: also time these UNet configs' step (training/trials/*.json), as ratios")
    args = ap.parse_args()

    if args.compile is None:
        args.compile = not args.tiny  # minutes of compiling would dwarf three tiny steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.bench:
        bench(args)
        return
    if args.sample_captions:
        sample_captions(args)
        return
    if args.only:
        decoder_stage_only(args)
        return
    if args.tiny:
        args.vae_steps, args.unet_steps, args.batch, args.vae_batch, args.decoder_steps = 3, 3, 4, 2, 2
        args.robust_steps = args.refine_steps = 2  # exercise every stage, including the optional ones
        args.pool = min(args.pool, 8)
        args.object_weight = 1.0
        args.input_perturbation = args.input_perturbation or 0.1
        args.ema_variants = args.ema_variants or [0.0, 0.9]
    from transformers import CLIPTextConfig, CLIPTextModel

    total_start = time.time()
    os.makedirs(args.logs, exist_ok=True)
    vae, unet, text_cfg = build_models(args)
    stage_dir = os.path.join(args.out, "tokenizer")
    tokenizer = write_tokenizer(stage_dir)
    text_cfg["vocab_size"] = len(tokenizer.get_vocab())
    text_cfg["bos_token_id"] = tokenizer.bos_token_id
    text_cfg["eos_token_id"] = tokenizer.eos_token_id
    text_cfg["pad_token_id"] = tokenizer.pad_token_id
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"parameters: vae {n(vae):,}  unet {n(unet):,}  text encoder {n(text_encoder):,}", flush=True)

    stream = SceneStream(args.tiller, args.seed)
    if args.vae_from:
        # Rerun only the text encoder + UNet stage on a VAE trained earlier by this script.
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from)
        vae_s = 0.0
    vae.to(args.device)
    unet.to(args.device)
    text_encoder.to(args.device)
    if not args.vae_from:
        vae_s = train_vae(args, vae, stream, args.logs)
    mae, zstd = vae_holdout(vae, args.tiller, 8 if args.tiny else 256, args.device)
    if not args.vae_from:
        vae.register_to_config(scaling_factor=round(1.0 / max(zstd, 1e-6), 5))
    print(f"vae held-out MAE {mae:.4f}; latent std {zstd:.3f} -> scaling_factor "
          f"{vae.config.scaling_factor}", flush=True)
    decoder_s = robust_s = 0.0
    if not args.vae_from:
        decoder_s = train_decoder(args, vae, args.logs, "decoder")
        if args.robust_steps:
            robust_s = train_decoder(args, vae, args.logs, "robust")
        mae, _ = vae_holdout(vae, args.tiller, 8 if args.tiny else 256, args.device)
        print(f"vae held-out MAE after the decoder stages {mae:.4f}", flush=True)
        vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)  # a checkpoint
    for p in vae.parameters():
        p.requires_grad_(False)
    stream.close()
    if args.ema_variants:  # the decoder the refine stage starts from, to refine a variant alike
        vae.save_pretrained(os.path.join(args.logs, "variants", "vae-before-refine"), safe_serialization=True)
    unet_s, pool_s = train_unet(args, vae, unet, text_encoder, tokenizer, args.logs)
    refine_s = 0.0
    if args.refine_steps:
        refine_s = refine_passes(args, vae, unet, text_encoder, tokenizer, args.logs)
    mae, _ = vae_holdout(vae, args.tiller, 8 if args.tiny else 256, args.device)
    save_pipeline(args, vae.to("cpu"), unet.to("cpu"), text_encoder.to("cpu"), tokenizer)
    summary = dict(
        seed=args.seed, device=args.device, threads=args.threads, tiny=args.tiny, vae_steps=args.vae_steps,
        vae_batch=args.vae_batch, unet_steps=args.unet_steps, batch=args.batch, lr=args.lr, compile=args.compile,
        input_perturbation=args.input_perturbation, ema=args.ema, ema_variants=args.ema_variants,
        vae_seconds=round(vae_s, 1), decoder_steps=args.decoder_steps, decoder_seconds=round(decoder_s, 1),
        robust_steps=args.robust_steps, robust_noise=args.robust_noise, robust_seconds=round(robust_s, 1),
        **refine_summary(args, refine_s), unet_seconds=round(unet_s, 1), pool=args.pool, pool_seconds=round(pool_s, 1),
        object_weight=args.object_weight,
        total_seconds=round(time.time() - total_start, 1), vae_holdout_mae=round(mae, 5),
        scaling_factor=vae.config.scaling_factor, torch=torch.__version__,
        parameters=dict(vae=n(vae), unet=n(unet), text_encoder=n(text_encoder)),
    )
    with open(os.path.join(args.logs, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(args.logs)
    print(json.dumps(summary, indent=2))


def refine_summary(args, seconds):
    return dict(refine_steps=args.refine_steps, refine_tmax=args.refine_tmax, refine_clean=args.refine_clean,
                refine_weight=args.refine_weight, refine_seconds=round(seconds, 1))


def decoder_stage_only(args):
    """Rerun one decoder stage (`--only robust|refine`) on the pipeline at --out; updates summary.json."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None, requires_safety_checker=False)
    vae = pipe.vae.to(args.device)
    if args.only == "robust":
        seconds = train_decoder(args, vae, args.logs, "robust")
        update = dict(robust_steps=args.robust_steps, robust_noise=args.robust_noise, robust_seconds=round(seconds, 1))
    else:
        seconds = refine_passes(args, vae, pipe.unet.to(args.device), pipe.text_encoder.to(args.device),
                                pipe.tokenizer, args.logs, prefix="refine-only")
        update = refine_summary(args, seconds)
    mae, _ = vae_holdout(vae, args.tiller, 256, args.device)
    print(f"vae held-out MAE after the {args.only} decoder stage {mae:.4f}", flush=True)
    vae.to("cpu").save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    path = os.path.join(args.logs, "summary.json")
    with open(path) as f:
        summary = json.load(f)
    summary.update(update, vae_holdout_mae=round(mae, 5))
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)


@torch.no_grad()
def sample_captions(args):
    """diffusers' own StableDiffusionPipeline on our model: a cross-check of tiller's sampler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.out).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    out_dir = os.path.join(args.sample_captions, "diffusers")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(args.sample_captions, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    results = []
    for i in range(0, len(rows), 50):
        chunk = rows[i:i + 50]
        gens = [torch.Generator(args.device).manual_seed(args.seed + i + j) for j in range(len(chunk))]
        images = pipe([r["caption"] for r in chunk], num_inference_steps=50, guidance_scale=args.guidance,
                      generator=gens, height=64, width=64).images
        for r, im in zip(chunk, images):
            im.save(os.path.join(out_dir, r["file"]))
            results.append(dict(r))
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(results)} images to {out_dir}")


def plot(log_dir):
    """Loss curves as docs/training/loss.png (skipped when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = [(axes[0], "vae_loss.csv", "l1", "VAE reconstruction L1 ([-1, 1] scale)"),
              (axes[1], "decoder_loss.csv", "loss", "decoder stages: L1 + 0.5 MSE"),
              (axes[1], "robust_decoder_loss.csv", "loss", None),
              (axes[1], "refine_decoder_loss.csv", "loss", None),
              (axes[1], "refine2_decoder_loss.csv", "loss", None),
              (axes[2], "unet_loss.csv", "loss", "UNet epsilon MSE (per batch)")]
    for i, (ax, name, col, title) in enumerate(panels):
        if not os.path.exists(os.path.join(log_dir, name)):  # e.g. --vae-from: no VAE stage
            continue
        with open(os.path.join(log_dir, name)) as f:
            rows = list(csv.DictReader(f))
        steps = np.array([int(r["step"]) for r in rows])
        vals = np.array([float(r[col]) for r in rows])
        colour = f"C{i}"
        ax.plot(steps, vals, lw=0.6, alpha=0.4, color=colour)
        k = max(1, len(vals) // 50)
        if len(vals) > k:
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.5, color=colour, label=name.removesuffix("_loss.csv"))
        ax.set_yscale("log")
        ax.set_xlabel("step")
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(log_dir, "loss.png"), dpi=110)


if __name__ == "__main__":
    main()
