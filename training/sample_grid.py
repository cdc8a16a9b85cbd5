"""Build docs/shapes/samples.png from a `tiller eval shapes --out DIR` directory: the first
`--per-row` images of each category, one row per category, upscaled with a green (correct) or
red (wrong) frame as the evaluator judged them.

    tiller eval shapes --model shapes --out /tmp/eval
    python3 training/sample_grid.py /tmp/eval docs/shapes/samples.png
"""

import argparse
import json
import os

from PIL import Image, ImageDraw

CATEGORIES = ["single", "counting", "two_objects", "position", "colors"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dir")
    ap.add_argument("out")
    ap.add_argument("--per-row", type=int, default=8)
    ap.add_argument("--scale", type=int, default=2)
    args = ap.parse_args()
    with open(os.path.join(args.eval_dir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    cell = 64 * args.scale + 6
    grid = Image.new("RGB", (cell * args.per_row, cell * len(CATEGORIES)), "white")
    draw = ImageDraw.Draw(grid)
    for r, cat in enumerate(CATEGORIES):
        picks = [x for x in rows if x["category"] == cat][: args.per_row]
        for c, x in enumerate(picks):
            im = Image.open(os.path.join(args.eval_dir, x["file"])).convert("RGB")
            im = im.resize((64 * args.scale, 64 * args.scale), Image.NEAREST)
            x0, y0 = c * cell, r * cell
            colour = (40, 170, 70) if x["correct"] else (220, 40, 40)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour)
            grid.paste(im, (x0 + 3, y0 + 3))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    for cat in CATEGORIES:
        picks = [x for x in rows if x["category"] == cat][: args.per_row]
        print(cat + ": " + " | ".join(x["caption"] for x in picks))


if __name__ == "__main__":
    main()
