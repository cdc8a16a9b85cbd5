"""Run the README's examples against a real tiller, as a user would paste them.

Every ```sh block that calls the API (curl) or the CLI (`tiller generate`), and the ```python
blocks (the `openai` client, run in order as one script), run in a scratch directory where
`models/` and `adapters/` are the repository's, against `tiller serve` on a free port (the
examples' `127.0.0.1:8080` is rewritten to it) and with `target/release/tiller` rewritten to the
binary under test. A block fails on a non-zero exit, on an `"error"` in a curl answer, or when it
does not write the files it names. The server's experiment store lives in the scratch directory. Blocks that build or run the project itself (`cargo`,
`docker`) are CI's other steps and are skipped, by name.

Usage: python scripts/readme_examples.py [--bin target/debug/tiller]
(needs the `openai` package: scripts/reliability/venv.sh makes a venv with it pinned).
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(readme):
    """(language, code, line) of every fenced block."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", readme, re.S | re.M):
        out.append((m.group(1), m.group(2), readme[: m.start()].count("\n") + 1))
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(repo, "target", "debug", "tiller"))
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    readme = open(os.path.join(repo, "README.md"), encoding="utf-8").read()
    work = tempfile.mkdtemp(prefix="tiller-readme-")
    for d in ("models", "adapters"):
        os.symlink(os.path.join(repo, d), os.path.join(work, d))
    port = free_port()
    log = open(os.path.join(work, "serve.log"), "w")
    server = subprocess.Popen([binary, "serve", "--bind", f"127.0.0.1:{port}"], cwd=work, stdout=log, stderr=log)
    failures, ran, skipped = [], 0, 0
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
                break
            except Exception:
                if server.poll() is not None:
                    break
                time.sleep(0.2)
        else:
            raise SystemExit("tiller did not become ready")
        if server.poll() is not None:
            print(open(os.path.join(work, "serve.log")).read(), file=sys.stderr)
            raise SystemExit("tiller serve exited")

        def fix(code):
            code = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
            return code.replace("target/release/tiller", binary)

        python_blocks = []
        for lang, code, line in blocks(readme):
            if lang == "python":
                python_blocks.append((code, line))
                continue
            if lang != "sh":
                continue
            if "docker " in code or re.search(r"^cargo (run|test)", code, re.M):
                skipped += 1
                print(f"-- README line {line}: skipped (builds or runs the project: CI's other steps)")
                continue
            code = "\n".join(l for l in code.splitlines() if not l.startswith("cargo build"))
            ran += 1
            before = set(os.listdir(work))
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", fix(code)], cwd=work, capture_output=True, text=True, timeout=600)
            problem = None
            if r.returncode != 0:
                problem = f"exit {r.returncode}"
            elif "curl" in code:
                try:
                    answer = json.loads(r.stdout)
                except ValueError:
                    answer = None  # the example prints something else (checked by its exit code)
                if isinstance(answer, dict) and "error" in answer:
                    problem = f"error answer: {r.stdout[:300]}"
                elif isinstance(answer, dict) and "/v1/images/" in code and not answer.get("data"):
                    problem = f"answer without images: {r.stdout[:300]}"
            for name in re.findall(r"--output (\S+)", code) + re.findall(r'open\("([^"{}]+)", "wb"\)', code):
                if not os.path.isfile(os.path.join(work, name)):
                    problem = problem or f"did not write {name}"
            new = sorted(set(os.listdir(work)) - before)
            status = problem or "ok"
            print(f"-- README line {line}: {status}; wrote {new}")
            if problem:
                failures.append((line, problem, r.stdout[-2000:], r.stderr[-2000:]))
        if python_blocks:
            ran += 1
            script = "\n\n".join(fix(code) for code, _ in python_blocks)
            r = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=600)
            lines = ", ".join(str(line) for _, line in python_blocks)
            wrote = [n for n in ("out.png", "out_0.png", "out_1.png") if os.path.isfile(os.path.join(work, n))]
            if r.returncode != 0 or len(wrote) != 3:
                failures.append((lines, f"exit {r.returncode}, wrote {wrote}", r.stdout[-2000:], r.stderr[-2000:]))
            print(f"-- README python blocks (lines {lines}): {'ok' if r.returncode == 0 else 'FAILED'}; wrote {wrote}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    for line, problem, out, err in failures:
        print(f"FAILED README line {line}: {problem}\nstdout: {out}\nstderr: {err}", file=sys.stderr)
    print(f"README examples: {ran} ran, {len(failures)} failed, {skipped} skipped")
    if failures:
        print(open(os.path.join(work, "serve.log")).read()[-4000:], file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
