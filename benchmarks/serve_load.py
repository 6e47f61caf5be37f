"""Load test: the two-stage app against the single-network vanilla app, side by side.

Starts a local Ray + Serve (or attaches to a running Serve on loopback with ``--url``), runs
both applications on the same bundle (``/two`` and ``/vanilla``), sends ``--requests`` real JPEG
bodies to each at ``--concurrency`` (never for longer than ``--duration-s``), and prints latency
percentiles, throughput and the model compute time measured inside the replicas (the response's
``timing_ms``), so that the serving overhead over model compute is visible::

    .venv/bin/python benchmarks/serve_load.py --make-tiny-bundle --requests 400 --concurrency 4

Loopback only: this is a measurement of the serving stack, not a load generator for other hosts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # serve_helpers: tiny bundle and test pictures

MODEL_STAGES = ("generalist", "specialist", "network")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle directory or MLflow artifact URI")
    src.add_argument("--make-tiny-bundle", action="store_true", help="make a tiny random bundle (as the tests do)")
    src.add_argument("--url", help="attach to a running Serve on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument("--two-prefix", default="/two", help="route prefix of the two-stage app (with --url)")
    p.add_argument("--vanilla-prefix", default="/vanilla", help="route prefix of the vanilla app (with --url)")
    p.add_argument("--requests", type=int, default=400, help="requests per app")
    p.add_argument("--concurrency", type=int, default=4, help="client threads, one keep-alive connection each")
    p.add_argument("--duration-s", type=float, default=60.0, help="stop sending to an app after this long")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured requests per app first")
    p.add_argument("--image-px", type=int, default=224, help="side of the JPEG pictures sent")
    p.add_argument("--routing", default=None, help="two-stage routing override: hard, soft, soft:K")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="@serve.batch wait (app argument)")
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.duration_s <= 0:
        p.error("--requests, --concurrency and --duration-s must be positive")
    if a.url and urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address")
    return a


# ------------------------------------------------------------------------------ serving
def start_serve(a: argparse.Namespace, scratch: Path) -> str:
    """Starts Ray and Serve here with both apps (Ray's files and a made bundle under
    ``scratch``); returns the base URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", str(scratch / "ray"))
    import socket

    import ray
    from ray import serve

    from serve.app import app, vanilla_app

    bundle = a.bundle
    if a.make_tiny_bundle:
        from serve_helpers import make_tiny_bundle

        bundle = str(make_tiny_bundle(scratch / "bundle"))
    args = {"bundle": bundle}
    if a.batch_wait_ms is not None:
        args["batch_wait_ms"] = a.batch_wait_ms
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=500_000_000, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Access logs off: a log line per request and replica is measurable on two cores.
    quiet = {"enable_access_log": False}
    t0 = time.perf_counter()
    serve.run(app({**args, **({"routing": a.routing} if a.routing else {})}), name="two", route_prefix="/two", logging_config=quiet)
    serve.run(vanilla_app(args), name="vanilla", route_prefix="/vanilla", logging_config=quiet)
    print(f"serve: both apps up in {time.perf_counter() - t0:.1f} s on bundle {bundle}", flush=True)
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------ load
def pictures(n: int, px: int) -> list[bytes]:
    from serve_helpers import image_bytes

    return [image_bytes(1000 + i, "JPEG", (px, px)) for i in range(n)]


def run_load(url: str, path: str, bodies: list[bytes], n: int, concurrency: int, duration_s: float) -> dict:
    """``n`` POSTs of the bodies in turn from ``concurrency`` threads; per-request latency and
    the response's ``timing_ms``; failures are counted, never retried."""
    u = urlparse(url)
    lock = threading.Lock()
    next_i, results, errors = [0], [], []
    deadline = time.perf_counter() + duration_s

    def worker() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        while True:
            with lock:
                if next_i[0] >= n or time.perf_counter() > deadline:
                    break
                i = next_i[0]
                next_i[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=bodies[i % len(bodies)], headers={"content-type": "image/jpeg"})
                resp = conn.getresponse()
                payload = resp.read()
                ms = (time.perf_counter() - t0) * 1000
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {payload[:120]!r}")
                timing = json.loads(payload)["timing_ms"]
                with lock:
                    results.append((ms, timing))
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever it is
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
                with lock:
                    errors.append(repr(e)[:200])
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration_s + 60)
    wall = time.perf_counter() - t0
    return {"results": results, "errors": errors, "wall_s": wall, "sent": next_i[0]}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarise(run: dict) -> dict[str, float | str]:
    lat = [ms for ms, _ in run["results"]]
    compute = [sum(t.get(k, 0.0) for k in MODEL_STAGES) for _, t in run["results"]]
    decode = [t["decode"] for _, t in run["results"]]
    total = [t["total"] for _, t in run["results"]]
    over = [ms - c for (ms, _), c in zip(run["results"], compute)]
    over_nodecode = [o - d for o, d in zip(over, decode)]
    return {
        "ok / sent": f"{len(lat)}/{run['sent']}",
        "throughput (req/s)": len(lat) / run["wall_s"],
        "latency p50 (ms)": pct(lat, 50),
        "latency p99 (ms)": pct(lat, 99),
        "model compute p50 (ms)": pct(compute, 50),
        "decode+preprocess p50 (ms)": pct(decode, 50),
        "ingress total p50 (ms)": pct(total, 50),
        "overhead over model compute p50 (ms)": pct(over, 50),
        "  same, without decode p50 (ms)": pct(over_nodecode, 50),
        "mean (ms)": statistics.fmean(lat) if lat else float("nan"),
    }


def floor_ms(url: str, path: str, n: int = 100) -> float:
    """p50 of GET healthz, one at a time: the proxy + ingress round trip with no model at all."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path)
        conn.getresponse().read()
        lat.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return pct(lat, 50)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.url:
        return measure(a, a.url.rstrip("/"))
    # A short path: Ray's socket paths must stay under ~107 characters.
    with tempfile.TemporaryDirectory(prefix="ssload-", dir="/tmp") as scratch:
        try:
            return measure(a, start_serve(a, Path(scratch)))
        finally:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def measure(a: argparse.Namespace, url: str) -> int:
    prefixes = {"two-stage": a.two_prefix.rstrip("/"), "vanilla": a.vanilla_prefix.rstrip("/")}
    bodies = pictures(32, a.image_px)
    summaries, floors = {}, {}
    for name, prefix in prefixes.items():
        run_load(url, prefix + "/predict", bodies, a.warmup, min(a.concurrency, a.warmup), a.duration_s)
        run = run_load(url, prefix + "/predict", bodies, a.requests, a.concurrency, a.duration_s)
        summaries[name] = summarise(run)
        floors[name] = floor_ms(url, prefix + "/healthz")
        if run["errors"]:
            print(f"{name}: {len(run['errors'])} failed, e.g. {run['errors'][:3]}", file=sys.stderr)
    print(
        f"\n{a.requests} requests per app at concurrency {a.concurrency} (limit {a.duration_s:.0f} s), "
        f"{a.image_px}x{a.image_px} JPEG bodies, loopback, {os.cpu_count()} CPUs"
    )
    names = list(summaries)
    print(f"{'':40s}" + "".join(f"{n:>14s}" for n in names))
    for key in summaries[names[0]]:
        cells = [summaries[n][key] for n in names]
        print(f"{key:40s}" + "".join(f"{c:>14.2f}" if isinstance(c, float) else f"{c:>14s}" for c in cells))
    print(f"{'floor: GET /healthz p50, 1 at a time (ms)':40s}" + "".join(f"{floors[n]:>14.2f}" for n in names))
    print(
        "model compute = generalist + specialist (two-stage) or network (vanilla), from timing_ms, measured in the "
        "replicas;\noverhead = client latency - model compute, per request (decode, HTTP proxy, handle hops, batching waits)."
    )
    return 0 if all(not s["ok / sent"].startswith("0/") for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
