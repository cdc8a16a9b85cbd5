"""Offline checks of the deployment files (deploy/kubernetes/*.yaml, deploy/compose.yaml): the
structure Kubernetes and Compose need, and that the files agree with each other and with tiller
(probe paths, port names, volume and secret references, the TILLER_* variables the server
reads, as docs/config.md lists them). No cluster or network needed.

Usage: python scripts/check_deploy.py   (needs PyYAML, pinned in scripts/reliability/requirements.txt)
"""

import os
import re
import sys

import yaml

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
failures = []


def check(cond, what):
    print(("ok: " if cond else "FAILED: ") + what)
    if not cond:
        failures.append(what)


known_env = set(re.findall(r"`(TILLER_[A-Z_]+)`", open(os.path.join(repo, "docs", "config.md")).read()))
known_env |= {"TILLER_CONFIG"}

# Kubernetes
docs = []
kdir = os.path.join(repo, "deploy", "kubernetes")
for name in sorted(os.listdir(kdir)):
    if name.endswith(".yaml"):
        docs += [d for d in yaml.safe_load_all(open(os.path.join(kdir, name))) if d]
for d in docs:
    check(all(k in d for k in ("apiVersion", "kind", "metadata")) and "name" in d["metadata"],
          f"{d.get('kind')} has apiVersion, kind and metadata.name")
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
deployments = by_kind.get("Deployment", [])
check(len(deployments) == 1, "one Deployment")
dep = deployments[0]
spec = dep["spec"]
labels = spec["template"]["metadata"]["labels"]
check(all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()), "the selector matches the pod labels")
pod = spec["template"]["spec"]
volumes = {v["name"]: v for v in pod.get("volumes", [])}
claims = {d["metadata"]["name"] for d in by_kind.get("PersistentVolumeClaim", [])}
for c in pod["containers"]:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(c.get("args", [None])[0] == "serve", "the container runs `tiller serve`")
    check(c["readinessProbe"]["httpGet"]["path"] == "/ready", "readiness probes /ready")
    check(c["livenessProbe"]["httpGet"]["path"] == "/health", "liveness probes /health")
    for probe in ("readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        check(port in ports or port in ports.values(), f"{probe} port {port} is a container port")
    bind = " ".join(c.get("args", []))
    check(any(str(p) in bind for p in ports.values()), "the server binds the container port")
    for m in c.get("volumeMounts", []):
        check(m["name"] in volumes, f"volume mount {m['name']} has a volume")
    for e in c.get("env", []):
        check(e["name"] in known_env, f"{e['name']} is a variable tiller reads")
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            check("name" in ref and "key" in ref, f"{e['name']} names a secret and a key")
    names = [e["name"] for e in c.get("env", [])]
    check("TILLER_STORAGE_URL" in names, "replicas share a database (TILLER_STORAGE_URL)")
for v in volumes.values():
    claim = v.get("persistentVolumeClaim", {}).get("claimName")
    if claim:
        check(claim in claims, f"claim {claim} is defined")
for svc in by_kind.get("Service", []):
    check(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "the Service selects the pods")
    all_ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        check(p["targetPort"] in all_ports, f"Service targetPort {p['targetPort']} is a container port")

# Compose
compose = yaml.safe_load(open(os.path.join(repo, "deploy", "compose.yaml")))
services = compose["services"]
for name, s in services.items():
    deps = s.get("depends_on", [])
    for dep in (deps if isinstance(deps, list) else deps.keys()):
        check(dep in services, f"compose: {name} depends on the defined service {dep}")
    for k in (s.get("environment") or {}):
        if k.startswith("TILLER_"):
            check(k in known_env, f"compose: {k} is a variable tiller reads")
tiller = services["tiller"]
url = tiller["environment"]["TILLER_STORAGE_URL"]
check(url.startswith("postgres://") and "@postgres/" in url, "compose: tiller uses the postgres service")
check("/ready" in " ".join(tiller["healthcheck"]["test"]), "compose: the health check asks /ready")
nginx = open(os.path.join(repo, "deploy", "nginx.conf")).read()
check("server tiller:8080" in nginx and "proxy_buffering off" in nginx, "nginx proxies to the replicas, unbuffered (SSE)")

if failures:
    sys.exit(f"{len(failures)} deployment checks failed")
print("deployment checks passed")
