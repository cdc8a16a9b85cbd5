"""Load test: concurrent clients against a running tiller, for a fixed time.

Each client sends generation requests in a loop (a mix of plain, steered, multi-image and
largest-allowed requests on the default model). Every request must be answered: 200, 429 with a
Retry-After header (overload), 400 `insufficient_memory` (refused by admission) or, for the
largest requests that the client gives up on, a cancelled job. Any 5xx other than a 504 timeout,
or a connection error, is a lost request. The server's RSS is sampled throughout and must stay
under --max-rss-mib. Prints a summary and exits non-zero on any loss.
"""

import argparse
import json
import random
import threading
import time
import urllib.error
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("--clients", type=int, default=64)
p.add_argument("--seconds", type=float, default=60)
p.add_argument("--pid", type=int, help="server pid, for RSS sampling")
p.add_argument("--max-rss-mib", type=float, default=6144)
args = p.parse_args()

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three circles"]


def request_body(rng):
    kind = rng.random()
    body = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(1 << 32), "size": "64x64"}
    if kind < 0.6:
        body["steps"] = rng.choice([4, 10, 20])
    elif kind < 0.8:
        body.update(steps=10, steering={"method": "fk", "particles": 4}, reward="brightness")
    elif kind < 0.95:
        body.update(steps=4, n=rng.choice([2, 4, 10]))
    else:
        # The largest request the limits allow; the client gives up on it after a few seconds,
        # which cancels it on the server.
        body.update(size="128x128", n=10, steps=150, steering={"method": "fk", "particles": 64}, reward="brightness")
    return body


lock = threading.Lock()
stats = {"sent": 0, "ok": 0, "busy": 0, "busy_without_retry_after": 0, "refused_memory": 0, "gave_up": 0,
         "timeout": 0, "other_4xx": 0, "lost": 0}
lost_examples = []
stop_at = time.monotonic() + args.seconds


def count(key, example=None):
    with lock:
        stats[key] += 1
        if example and len(lost_examples) < 5:
            lost_examples.append(example)


def client(seed):
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        body = request_body(rng)
        largest = body.get("size") == "128x128"
        data = json.dumps(body).encode()
        req = urllib.request.Request(f"{args.url}/v1/images/generations", data=data,
                                     headers={"Content-Type": "application/json"})
        count("sent")
        try:
            with urllib.request.urlopen(req, timeout=5 if largest else 300) as r:
                r.read()
                count("ok")
        except urllib.error.HTTPError as e:
            payload = e.read()
            if e.code == 429:
                count("busy" if e.headers.get("Retry-After") else "busy_without_retry_after")
                time.sleep(min(float(e.headers.get("Retry-After") or 1), 2))
            elif e.code == 400 and b"insufficient_memory" in payload:
                count("refused_memory")
            elif e.code == 504:
                count("timeout")
            elif 400 <= e.code < 500:
                count("other_4xx", f"{e.code} {payload[:200]!r} for {body}")
            else:
                count("lost", f"{e.code} {payload[:200]!r} for {body}")
        except (TimeoutError, urllib.error.URLError) as e:
            if largest and "timed out" in str(e):
                count("gave_up")
            else:
                count("lost", f"{type(e).__name__}: {e} for {body}")


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


max_rss = 0.0
threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    if args.pid:
        r = rss_mib(args.pid)
        if r is None:
            stats["lost"] += 1
            lost_examples.append("the server process is gone")
            break
        max_rss = max(max_rss, r)
    time.sleep(0.25)
for t in threads:
    t.join(timeout=310)

print(json.dumps({**stats, "max_rss_mib": round(max_rss, 1)}, indent=1))
failed = []
if stats["lost"]:
    failed.append(f"{stats['lost']} lost requests: {lost_examples}")
if stats["busy_without_retry_after"]:
    failed.append("429 without Retry-After")
if stats["other_4xx"]:
    failed.append(f"unexpected 4xx: {lost_examples}")
if stats["ok"] == 0:
    failed.append("no request succeeded")
if args.pid and max_rss > args.max_rss_mib:
    failed.append(f"RSS reached {max_rss:.0f} MiB > {args.max_rss_mib} MiB")
if failed:
    raise SystemExit("load: " + "; ".join(failed))
print(f"load: 0 lost requests of {stats['sent']}")
