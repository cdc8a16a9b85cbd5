"""The playground page in a real browser: Debian's Chromium, driven by Playwright (pinned in
scripts/reliability/requirements.txt; it uses the system Chromium, no browser download).

Starts `tiller serve` on the repository's models, creates an experiment and sends it a few
requests, then opens /playground with two strategy columns and checks that
  * the page loads and both columns show a finished image (streamed over SSE),
  * each column reports a reward and its NFE, and the FK column draws its trace,
  * the experiments dashboard lists the experiment's two arms.
Writes a screenshot (--screenshot PATH). Exits non-zero on the first failed check.

Usage: python scripts/playground/test.py [--bin target/debug/tiller] [--screenshot FILE]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from playwright.sync_api import sync_playwright

repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(repo, "target", "debug", "tiller"))
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    work = tempfile.mkdtemp(prefix="tiller-playground-")
    log = open(os.path.join(work, "serve.log"), "w")
    env = dict(os.environ, TILLER_DATA_DIR=os.path.join(work, "data"), TILLER_MODELS_DIR=os.path.join(repo, "models"),
               TILLER_ADAPTERS_DIR=os.path.join(repo, "adapters"))
    server = subprocess.Popen([os.path.abspath(args.bin), "serve", "--bind", f"127.0.0.1:{port}"], cwd=work, env=env,
                              stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/ready", timeout=2)
                break
            except Exception:
                check(server.poll() is None, "tiller serve is running")
                time.sleep(0.2)
        post(f"{base}/v1/experiments", {
            "name": "playground-demo", "metrics": ["shapes_clip"], "assignment": "random",
            "arms": [{"name": "plain", "request": {"steps": 8}},
                     {"name": "best-of-2", "request": {"steps": 8, "steering": {"method": "best_of_n", "n": 2},
                                                      "reward": "shapes_clip"}}]})
        for i in range(4):
            for arm in ("plain", "best-of-2"):
                post(f"{base}/v1/images/generations", {"prompt": "three green triangles", "seed": i, "experiment":
                                                       "playground-demo", "arm": arm})
        fields = [{"steps": 12, "seed": 7, "reward": "shapes_clip"}, {"steps": 12, "seed": 7, "eta": 1.0,
                                             "steering": {"method": "fk", "particles": 4}, "reward": "shapes_clip"}]
        url = f"{base}/playground?columns=2&autorun=1&fields={urllib.parse.quote(json.dumps(fields))}"
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            check(page.title() == "tiller playground", "the page loads")
            page.wait_for_selector('img[data-done="1"] >> nth=1', timeout=300_000)
            check(page.locator('img[data-done="1"]').count() == 2, "both strategies show a finished image")
            stats = page.locator(".stats").all_inner_texts()
            check(all("NFE" in t and "reward" in t for t in stats), f"each column reports reward and NFE: {stats}")
            check("(fk)" in stats[1], f"the second column ran FK: {stats[1]}")
            page.wait_for_selector("table.experiment tr.arm >> nth=1", timeout=60_000)
            arms = page.locator("table.experiment tr.arm td:first-child").all_inner_texts()
            check(arms == ["plain", "best-of-2"], f"the dashboard shows the experiment's arms: {arms}")
            check(not errors, f"no script errors: {errors}")
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=True)
                print(f"wrote {args.screenshot}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    print("playground checks passed")


if __name__ == "__main__":
    main()
