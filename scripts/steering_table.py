#!/usr/bin/env python3
"""The steering table: what each steering strategy buys on the default model, at matched compute.

Runs `tiller eval shapes` (the shapes-world evaluator, exact and GenEval-style) for every row of
the grid below on held-out captions of every category, with three evaluation seeds (each seed
draws its own captions and noises), and writes the table as Markdown and JSON:

    scripts/steering_table.py                       # the full grid (see docs/steering-table.md for its time)
    scripts/steering_table.py --per-category 4 --seeds 1 --rows base,lcm4,fk4   # a quick look
    scripts/steering_table.py --list                # the rows

Rows: the base model (50-step DDIM, CFG 7.5), the LCM-LoRA generator (`adapters/shapes-lcm`,
`lcm` sampler, no CFG) at 1 and 4 steps, and on that generator best-of-N, FK (`diff` and `max`
potentials) and SVDD with the `shapes_clip` reward at two matched budgets of denoiser
evaluations (NFE) per image, ×4 and ×8 the 4-step run, and ReNO on its 1-step form at ×4.
Reward evaluations and ReNO's backward passes are counted in their own columns. `--rows
base_fk4,base_bon4` adds FK and best-of-N on the 50-step base model. Standard library only; it
needs the release binary (`cargo build --release`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CATEGORIES = ["single", "counting", "two_objects", "position", "colors"]

BASE = ["--model", "shapes", "--scheduler", "ddim", "--steps", "50"]
LCM = ["--model", "shapes", "--lora", "shapes-lcm", "--scheduler", "lcm", "--guidance", "1"]
REWARD = ["--reward", "shapes_clip"]


def steer(spec):
    return ["--steering", json.dumps(spec)] + REWARD


# (key, label, budget, tiller eval shapes arguments, options). Options: "captions" = captions per
# category for that row when it must be smaller (ReNO backpropagates through the UNet, the
# decoder and the reward every iteration: about 40x a forward on CPU); "extra" = only with --rows.
ROWS = [
    ("base", "base, 50-step DDIM, CFG 7.5", "—", BASE, {}),
    ("base_bon4", "best-of-4, base 50-step DDIM", "×4", BASE + steer({"method": "best_of_n", "n": 4}), {"extra": True}),
    ("base_fk4", "FK diff k=4, base 50-step DDIM", "×4", BASE + steer({"method": "fk", "particles": 4}), {"extra": True}),
    ("lcm1", "LCM-LoRA, 1 step", "—", LCM + ["--steps", "1"], {}),
    ("lcm4", "LCM-LoRA, 4 steps", "—", LCM + ["--steps", "4"], {}),
    ("bon4", "best-of-4", "×4", LCM + ["--steps", "4"] + steer({"method": "best_of_n", "n": 4}), {}),
    ("fk4", "FK diff k=4", "×4", LCM + ["--steps", "4"] + steer({"method": "fk", "particles": 4}), {}),
    ("fkmax4", "FK max k=4", "×4", LCM + ["--steps", "4"] + steer({"method": "fk", "particles": 4, "potential": "max"}), {}),
    ("svdd4", "SVDD M=4", "×4", LCM + ["--steps", "4"] + steer({"method": "svdd", "candidates": 4}), {}),
    ("reno16", "ReNO 16 iterations, 1 step", "×4", LCM + ["--steps", "1"] + steer({"method": "reno", "iterations": 16}),
     {"captions": 4}),
    ("bon8", "best-of-8", "×8", LCM + ["--steps", "4"] + steer({"method": "best_of_n", "n": 8}), {}),
    ("fk8", "FK diff k=8", "×8", LCM + ["--steps", "4"] + steer({"method": "fk", "particles": 8}), {}),
    ("fkmax8", "FK max k=8", "×8", LCM + ["--steps", "4"] + steer({"method": "fk", "particles": 8, "potential": "max"}), {}),
    ("svdd8", "SVDD M=8", "×8", LCM + ["--steps", "4"] + steer({"method": "svdd", "candidates": 8}), {}),
]


def run_row(tiller, args, per_category, seed):
    cmd = [tiller, "eval", "shapes", "--json", "--quiet", "--per-category", str(per_category), "--seed", str(seed)]
    cmd += args
    start = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    report = json.loads(out.stdout)
    report["wall_seconds"] = time.time() - start
    return report


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(key, label, budget, reports):
    acc = {c: mean_sd([next(x["accuracy"] for x in r["categories"] if x["category"] == c) for r in reports])[0]
           for c in CATEGORIES}
    mean, sd = mean_sd([r["mean_accuracy"] for r in reports])
    cost = [r["cost"] for r in reports]
    return {
        "key": key, "label": label, "budget": budget, "runs": len(reports),
        "images": sum(r["total"] for r in reports),
        "accuracy": acc, "mean_accuracy": mean, "mean_accuracy_sd": sd,
        "mean_reward": mean_sd([c["mean_reward"] for c in cost])[0],
        "nfe": statistics.fmean(c["denoiser_evals_per_image"] for c in cost),
        "reward_evals": statistics.fmean(c["reward_evals_per_image"] for c in cost),
        "backward": statistics.fmean(c["backward_evals_per_image"] for c in cost),
        "seconds_per_image": statistics.fmean(c["seconds_per_image"] for c in cost),
    }


def markdown(rows, meta):
    head = ("| strategy | budget | images | " + " | ".join(CATEGORIES) +
            " | mean accuracy (± sd) | shapes_clip | NFE | reward evals | backward | s / image |")
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 9)]
    for r in rows:
        fmt = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
        lines.append(
            f"| {r['label']} | {r['budget']} | {r['images']} | " + " | ".join(fmt(r["accuracy"][c]) for c in CATEGORIES) +
            f" | **{fmt(r['mean_accuracy'], 3)}** ± {fmt(r['mean_accuracy_sd'], 3)} | {fmt(r['mean_reward'])} |"
            f" {r['nfe']:.0f} | {r['reward_evals']:.0f} | {r['backward']:.0f} | {r['seconds_per_image']:.2f} |")
    lines.append("")
    lines.append(f"{meta['per_category']} captions per category (ReNO: fewer, see `images`) × {len(meta['seeds'])} evaluation seeds "
                 f"({', '.join(map(str, meta['seeds']))}); {meta['total_seconds'] / 60:.0f} min in all. "
                 f"Command: `{meta['command']}`.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiller", default=os.path.join(REPO, "target", "release", "tiller"))
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3, help="evaluation seeds 2026, 2027, ...")
    ap.add_argument("--rows", help="comma-separated row keys (default: all)")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "steering-table"),
                    help="writes OUT.md and OUT.json")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for key, label, budget, a, opts in ROWS:
            print(f"{key:10} {label} ({budget}{', only with --rows' if opts.get('extra') else ''}): "
                  f"tiller eval shapes {' '.join(a)}")
        return
    keys = args.rows.split(",") if args.rows else [r[0] for r in ROWS if not r[4].get("extra")]
    unknown = set(keys) - {r[0] for r in ROWS}
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; --list shows them")
    seeds = [2026 + i for i in range(args.seeds)]
    start = time.time()
    rows = []
    for key, label, budget, a, opts in ROWS:
        if key not in keys:
            continue
        reports = []
        per_category = min(args.per_category, opts.get("captions", args.per_category))
        for seed in seeds:
            r = run_row(args.tiller, a, per_category, seed)
            print(f"{key:10} seed {seed}: mean accuracy {r['mean_accuracy']:.3f}, "
                  f"{r['cost']['denoiser_evals_per_image']:.0f} NFE, {r['wall_seconds']:.0f} s", flush=True)
            reports.append(r)
        rows.append(summarise(key, label, budget, reports))
    meta = {"per_category": args.per_category, "seeds": seeds, "total_seconds": time.time() - start,
            "command": "scripts/steering_table.py " + " ".join(sys.argv[1:])}
    text = markdown(rows, meta)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
