"""Train ShapesCLIP (models/shapes-clip): a small CLIP for the shapes world, the prompt-alignment
reward `shapes_clip` that `tiller serve` offers.

Both towers are transformers' `CLIPModel` (a ViT over 8x8 patches of the 64x64 image and the
shapes model's own tokenizer), trained contrastively (the CLIP loss of Radford et al. 2021) on
scenes from `tiller shapes stream`. Plain in-batch negatives only teach which colours and shapes
are present, so each image also meets hard negatives made from its own caption, the kinds a
prompt-alignment benchmark such as GenEval checks:
  attribute  colours swapped between the objects, or one colour or shape changed
  count      a wrong number ("two" for "three", "two red circles" for "a red circle")
  relation   the opposite relation, or the two objects swapped around it
  missing    one of two objects left out
Every negative is checked to be false for the scene (an "and" caption in the other order, or
"B right of A" for "A left of B", would be true and is never used). The loss is cross-entropy of
each image over all captions in the batch plus the hard negatives, and of each caption over the
images (captions that occur twice in a batch are not counted as each other's negatives).

Images are augmented (blur, noise, small colour shifts) so the reward also ranks the softer images
a diffusion model draws and the blurry x0 predictions steering scores mid-sampling.

The held-out report (models/shapes-clip/eval.json) is, per category and per kind of hard
negative, the share of held-out scenes (another generator seed) whose true caption scores above
the negative.

Run it through training/train_shapes_clip.sh (pinned virtualenv, the scene generator).
Seeded: on one machine and thread count a rerun gives the same weights.
"""

import argparse
import functools
import json
import math
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

from train_shapes import CATEGORIES, SceneStream  # noqa: E402  (the scene reader the default model trains on)

COLORS = ["red", "green", "blue", "yellow", "purple", "cyan"]
SHAPES = ["circle", "square", "triangle"]
NUMBERS = {"a": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
KINDS = ["attribute", "count", "relation", "missing"]
MAX_TOKENS = 16


# ---------------------------------------------------------------------------------------------
# Captions as structures: [(count, color, shape), ...] and an optional relation between two.


def parse(caption):
    words = caption.split()
    for rel in RELATIONS:
        token = f" {rel} "
        if token in caption:
            left, right = caption.split(token)
            return [obj(left.split()), obj(right.split())], rel
    if " and " in caption:
        left, right = caption.split(" and ")
        return [obj(left.split()), obj(right.split())], None
    return [obj(words)], None


def obj(words):
    count = NUMBERS[words[0]]
    shape = words[2][:-1] if count > 1 else words[2]
    return (count, words[1], shape)


def render(objects, relation):
    def one(o):
        n, c, s = o
        return f"{NUMBER_WORDS[n]} {c} {s}{'s' if n > 1 else ''}"

    if relation:
        return f"{one(objects[0])} {relation} {one(objects[1])}"
    return " and ".join(one(o) for o in objects)


def canonical(objects, relation):
    """Captions with the same meaning get the same key."""
    if relation in ("right of", "below"):
        objects, relation = [objects[1], objects[0]], RELATIONS[relation]
    if relation:
        return (tuple(objects), relation)
    merged = {}
    for n, c, s in objects:
        merged[(c, s)] = merged.get((c, s), 0) + n
    return (tuple(sorted((n, c, s) for (c, s), n in merged.items())), None)


@functools.lru_cache(maxsize=None)
def negatives(caption):
    """{kind: [false captions]} for a caption of the world (do not modify the result)."""
    objects, relation = parse(caption)
    truth = canonical(objects, relation)
    out = {k: [] for k in KINDS}

    def add(kind, objs, rel):
        if canonical(objs, rel) != truth:
            text = render(objs, rel)
            if text not in out[kind]:
                out[kind].append(text)

    # attribute: swap colours (or shapes) between two objects, else change one attribute
    if len(objects) == 2:
        (n1, c1, s1), (n2, c2, s2) = objects
        add("attribute", [(n1, c2, s1), (n2, c1, s2)], relation)
        add("attribute", [(n1, c1, s2), (n2, c2, s1)], relation)
    for i, (n, c, s) in enumerate(objects):
        for c2 in COLORS:
            if c2 != c:
                objs = list(objects)
                objs[i] = (n, c2, s)
                add("attribute", objs, relation)
        for s2 in SHAPES:
            if s2 != s:
                objs = list(objects)
                objs[i] = (n, c, s2)
                add("attribute", objs, relation)
    # count: another number for one object
    for i, (n, c, s) in enumerate(objects):
        for n2 in (1, 2, 3, 4):
            if n2 != n and not (relation and n2 > 1):
                objs = list(objects)
                objs[i] = (n2, c, s)
                add("count", objs, relation)
    # relation: the opposite relation, or the objects swapped
    if relation:
        add("relation", objects, RELATIONS[relation])
        add("relation", [objects[1], objects[0]], relation)
    # missing: one of two objects
    if len(objects) == 2:
        for o in objects:
            add("missing", [o], None)
    return out


# ---------------------------------------------------------------------------------------------


def gaussian_blur(x, sigma):
    """Per-image separable Gaussian blur; sigma (N,) in pixels, 0 = unchanged."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (offsets[None, :] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 7)
    n, c, h, w = x.shape
    pad = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    # horizontal then vertical, one kernel per image
    rows = torch.stack([pad[..., :, i:i + w] for i in range(2 * radius + 1)], -1)
    x = (rows * k[:, None, None, None, :]).sum(-1)
    cols = torch.stack([x[..., i:i + h, :] for i in range(2 * radius + 1)], -1)
    return (cols * k[:, None, None, None, :]).sum(-1)


def augment(x, gen):
    """Images in [-1, 1]: blur (half the images), pixel noise and a small per-channel shift."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.2 * (torch.rand(n, generator=gen) < 0.5)
    x = gaussian_blur(x, sigma)
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.1)
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.1
    return x.clamp(-1, 1)


def build_model(args, vocab_size):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=args.width, intermediate_size=4 * args.width,
                num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=args.width,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.vision_layers,
                  num_attention_heads=4, image_size=64, patch_size=args.patch, num_channels=3,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=args.width)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.width)
    return CLIPModel(cfg)


def tokenize(tok, captions):
    return tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
               return_tensors="pt").input_ids


def image_features(model, pixels):
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def text_features(model, ids):
    return model.text_projection(model.text_model(input_ids=ids).pooler_output)


def contrastive_loss(model, images, ids, pos_count, same_caption):
    """Images (B) against texts (B positives first, then the hard negatives)."""
    img = F.normalize(image_features(model, images), dim=-1)
    txt = F.normalize(text_features(model, ids), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # (B, B + H)
    b = pos_count
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, :b] = same_caption & ~torch.eye(b, dtype=torch.bool)
    logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(b)
    i2t = F.cross_entropy(logits, target)
    t2i = F.cross_entropy(logits[:, :b].T, target)
    return 0.5 * (i2t + t2i)


@torch.no_grad()
def evaluate(model, tok, tiller, seed, count):
    """Held-out ranking accuracy of the true caption over each kind of hard negative."""
    model.eval()
    stream = SceneStream(tiller, seed)
    wins = {c: {k: [0, 0] for k in KINDS + ["in_batch"]} for c in CATEGORIES}
    done = 0
    while done < count:
        n = min(256, count - done)
        x, captions, cats = stream.batch(n)
        img = F.normalize(image_features(model, x), dim=-1)
        pos = F.normalize(text_features(model, tokenize(tok, captions)), dim=-1)
        s_pos = (img * pos).sum(-1)
        # in-batch: the true caption above every other different caption of the batch
        all_scores = img @ pos.T
        for i in range(n):
            others = [j for j in range(n) if canonical(*parse(captions[j])) != canonical(*parse(captions[i]))]
            w = wins[cats[i]]["in_batch"]
            w[0] += int((all_scores[i, others] < s_pos[i]).all())
            w[1] += 1
        for kind in KINDS:
            rows, texts = [], []
            for i, c in enumerate(captions):
                for t in negatives(c)[kind]:
                    rows.append(i)
                    texts.append(t)
            if not texts:
                continue
            neg = F.normalize(text_features(model, tokenize(tok, texts)), dim=-1)
            s_neg = (img[rows] * neg).sum(-1)
            # a scene counts as ranked right for a kind when its caption beats every negative of it
            ok = {}
            for r, good in zip(rows, (s_pos[rows] > s_neg).tolist()):
                ok[r] = ok.get(r, True) and good
            for r, good in ok.items():
                w = wins[cats[r]][kind]
                w[0] += int(good)
                w[1] += 1
        done += n
    stream.close()
    model.train()
    report = {}
    for c in CATEGORIES:
        report[c] = {k: round(v[0] / v[1], 4) for k, v in wins[c].items() if v[1]}
    totals = {}
    for k in KINDS + ["in_batch"]:
        hit = sum(wins[c][k][0] for c in CATEGORIES)
        tot = sum(wins[c][k][1] for c in CATEGORIES)
        if tot:
            totals[k] = round(hit / tot, 4)
    report["all"] = totals
    return report


def save(model, tok_dir, out):
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(out, f))
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        # Pixel values = 2x - 1, the scene stream's own range; 64x64 needs no resize.
        json.dump({"crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "do_normalize": True,
                   "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "size": {"shortest_edge": 64}, "image_processor_type": "CLIPImageProcessor"}, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "shapes-clip"))
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "models", "shapes", "tokenizer"))
    ap.add_argument("--tiller", default=os.path.join(REPO, "target", "debug", "tiller"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=777, help="generator seed of the held-out scenes")
    ap.add_argument("--eval-count", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--hard", type=int, default=4, help="hard negatives per image")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--relation-focus", action=argparse.BooleanOptionalAction, default=True,
                    help="give position captions both relation negatives every step")
    ap.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (CI smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.batch, args.width, args.vision_layers, args.text_layers = 5, 16, 32, 1, 1
        args.eval_count = 64

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(os.path.join(args.tokenizer, "vocab.json"), os.path.join(args.tokenizer, "merges.txt"),
                        model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    model = build_model(args, len(tok))
    params = sum(p.numel() for p in model.parameters())
    print(f"ShapesCLIP: {params / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    stream = SceneStream(args.tiller, args.seed)
    start = time.time()
    log = []
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / 200)
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, captions, _ = stream.batch(args.batch)
        hard = []
        for c in captions:
            neg = negatives(c)
            pool = [t for k in KINDS for t in neg[k]]
            # One of each applicable kind first, so rare kinds (relation, missing) are seen; a
            # relation caption gets both of its relation negatives (the opposite relation and
            # the swapped objects): relations are what a pooled text embedding learns last.
            focus = args.relation_focus and neg["relation"]
            by_kind = [neg[k] for k in KINDS if neg[k] and not (focus and k == "relation")]
            picks = [rng.choice(v) for v in by_kind] + (list(neg["relation"]) if focus else [])
            while len(picks) < args.hard:
                picks.append(rng.choice(pool))
            hard.extend(picks[-args.hard:])
        texts = captions + hard
        ids = tokenize(tok, texts)
        same = torch.tensor([[a == b for b in captions] for a in captions])
        loss = contrastive_loss(model, augment(x, gen), ids, len(captions), same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - start
            print(f"step {step:>5}/{args.steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"scale {model.logit_scale.exp().item():.1f} {el:.0f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 5), "seconds": round(el, 1)})
    stream.close()
    seconds = time.time() - start
    save(model, args.tokenizer, args.out)
    report = evaluate(model, tok, args.tiller, args.eval_seed, args.eval_count)
    summary = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "hard_negatives": args.hard,
               "lr": args.lr, "width": args.width, "vision_layers": args.vision_layers,
               "text_layers": args.text_layers, "patch": args.patch, "parameters": params,
               "train_seconds": round(seconds, 1), "threads": args.threads, "torch": torch.__version__,
               "eval_seed": args.eval_seed, "eval_scenes": args.eval_count,
               "heldout_ranking_accuracy": report, "log": log}
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
