"""Load test: the Serve graphs against a plain uvicorn peer serving the same model, side by side.

Starts a local Ray + Serve with the two-stage app in its three graphs — ``/single`` (the model
inside the HTTP ingress replica), ``/fused`` (Ingress → TwoStage), ``/stages`` (stage one in the
Ingress → Specialist) — and the vanilla app (``/vanilla``, single), and — in its own process —
a plain uvicorn + FastAPI *peer* that decodes the same way and runs the same
:class:`TwoStagePredictor` in process, with the serving defaults (deltas held packed, decoded per
routed group), as Serve's replicas do. It sends ``--requests`` real JPEG
bodies to each at every ``--concurrency`` level, one keep-alive connection per client thread, and
prints latency percentiles, throughput, the model compute time measured where the model runs
(the response's ``timing_ms``) and the overhead over it (latency − compute). ``--json FILE``
writes the figures::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --make-tiny-bundle --requests 300 --concurrency 1,8

Set ``OMP_NUM_THREADS`` for both sides alike: Ray gives a replica that reserves less than one CPU
one torch thread unless the environment says otherwise, and the peer inherits this process's.

``--proxy haproxy,serve`` (the default) measures both of Serve's ingresses, each in a Ray of its
own (Serve reads the mode when it starts) and each beside its own run of the peer: ``haproxy`` is
what ``python -m serve`` ships (Serve's HAProxy ingress and throughput-optimised mode, HAProxy's
side ports on loopback: serve/haproxy_loopback.py), ``serve`` is Serve's Python proxy (``serve
run``). Loopback only: a measurement of the serving stack, not a load generator for other hosts.
"""

# No `from __future__ import annotations`: the peer's FastAPI endpoint reads its annotations at runtime.
import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # serve_helpers: tiny bundle and test pictures
sys.path.insert(0, str(ROOT))

MODEL_STAGES = ("model", "generalist", "specialist", "network")
APPS = ("single", "fused", "stages", "vanilla", "peer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle folder or MLflow URI")
    src.add_argument("--make-tiny-bundle", action="store_true", help="make a tiny random bundle (as the tests do)")
    src.add_argument("--peer-serve", metavar="BUNDLE", help=argparse.SUPPRESS)  # the peer process itself
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=300, help="requests per app and concurrency level")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client thread counts")
    p.add_argument("--apps", default=",".join(APPS), help=f"which of {', '.join(APPS)} to measure")
    p.add_argument("--duration-s", type=float, default=120.0, help="stop sending to an app after this long")
    p.add_argument("--warmup", type=int, default=30, help="unmeasured requests per app first")
    p.add_argument("--image-px", type=int, default=224, help="side of the JPEG pictures sent")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="batch_wait_ms app argument")
    p.add_argument("--proxy", default="haproxy,serve", help="Serve ingresses to measure: haproxy, serve or both")
    p.add_argument("--json", help="write the figures to this file")
    a = p.parse_args(argv)
    if a.requests < 1 or a.duration_s <= 0:
        p.error("--requests and --duration-s must be positive")
    a.levels = [int(c) for c in a.concurrency.split(",")]
    a.apps = [x for x in a.apps.split(",") if x]
    a.proxies = [x for x in a.proxy.split(",") if x]
    if not a.proxies or set(a.proxies) - {"haproxy", "serve"}:
        p.error(f"--proxy: haproxy, serve or both, got {a.proxy!r}")
    unknown = set(a.apps) - set(APPS)
    if unknown:
        p.error(f"unknown apps {sorted(unknown)}")
    return a


# ------------------------------------------------------------------------------ serving
def start_serve(a: argparse.Namespace, bundle: str, scratch: Path) -> str:
    """Starts Ray and Serve here with the three apps; returns the base URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", str(scratch / "ray"))
    if a.proxies == ["haproxy"]:
        from serve.haproxy_loopback import haproxy_environment

        os.environ.update(haproxy_environment(scratch / "haproxy"))
    import ray
    from ray import serve

    from serve.app import app, vanilla_app

    args = {"bundle": bundle, **({"batch_wait_ms": a.batch_wait_ms} if a.batch_wait_ms is not None else {})}
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=500_000_000, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    quiet = {"enable_access_log": False}  # a log line per request and replica is measurable on two cores
    t0 = time.perf_counter()
    if "single" in a.apps:
        serve.run(app({**args, "graph": "single"}), name="single", route_prefix="/single", logging_config=quiet)
    if "fused" in a.apps:
        serve.run(app({**args, "graph": "fused"}), name="fused", route_prefix="/fused", logging_config=quiet)
    if "stages" in a.apps:
        serve.run(app({**args, "graph": "stages"}), name="stages", route_prefix="/stages", logging_config=quiet)
    if "vanilla" in a.apps:
        serve.run(vanilla_app(args), name="vanilla", route_prefix="/vanilla", logging_config=quiet)
    print(f"serve: apps up in {time.perf_counter() - t0:.1f} s on bundle {bundle}", flush=True)
    return f"http://127.0.0.1:{port}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_serve(bundle: str, port: int) -> None:
    """The peer: uvicorn + FastAPI, the same decoding and the same two-stage predictor, in one
    process, one request at a time through the model (what a hand-written service would be)."""
    import threading as th

    import uvicorn
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    from serve.images import Limits, decode_all, preprocessor, request_images
    from supersub.data.dataset import eval_draft_size
    from supersub.remote import open_bundle

    b = open_bundle(bundle)
    predictor, routing, limits = b.predictor("cpu"), b.routing(), Limits()  # the serving defaults, as Serve's replicas
    transform, draft = preprocessor(b.image_size), eval_draft_size(b.image_size)
    lock, api = th.Lock(), FastAPI()

    def model(x):
        with lock:
            t0 = time.perf_counter()
            fine, sup = predictor.predict(x, routing)
            return fine, sup, (time.perf_counter() - t0) * 1000

    @api.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        images, _ = await request_images(request, limits)
        x, decode_ms = await run_in_threadpool(decode_all, images, limits, draft, transform)
        fine, sup, ms = await run_in_threadpool(model, x)
        f, s = int(fine[0].argmax()), int(sup[0].argmax())
        return {"superclass": b.hierarchy.superclasses[s].id, "subclass": b.hierarchy.subclasses[f].id,
                "timing_ms": {"decode": decode_ms[0], "model": ms, "total": (time.perf_counter() - t0) * 1000}}

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @api.get("/hierarchy")
    async def hierarchy():
        return b.hierarchy.to_dict()

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_peer(bundle: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--peer-serve", bundle, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the uvicorn peer did not start")


# ------------------------------------------------------------------------------ load
def pictures(n: int, px: int) -> list[bytes]:
    from serve_helpers import image_bytes

    return [image_bytes(1000 + i, "JPEG", (px, px)) for i in range(n)]


def run_load(url: str, path: str, bodies: list[bytes], n: int, concurrency: int, duration_s: float) -> dict:
    """``n`` POSTs of the bodies in turn from ``concurrency`` threads; per-request latency and
    the response's ``timing_ms``; failures are counted, never retried."""
    u = urlparse(url)
    path = u.path.rstrip("/") + path
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
    over = [ms - c for (ms, _), c in zip(run["results"], compute)]
    # Time outside the app's endpoint (HTTP, proxy, hops into the replica) vs inside it.
    outside = [ms - t["total"] for ms, t in run["results"]]
    return {
        "ok/sent": f"{len(lat)}/{run['sent']}",
        "req/s": len(lat) / run["wall_s"],
        "p50 ms": pct(lat, 50),
        "p99 ms": pct(lat, 99),
        "compute p50 ms": pct(compute, 50),
        "decode p50 ms": pct(decode, 50),
        "overhead p50 ms": pct(over, 50),
        "overhead w/o decode p50 ms": pct([o - d for o, d in zip(over, decode)], 50),
        "outside app p50 ms": pct(outside, 50),
    }


def floor_ms(url: str, n: int = 100) -> float:
    """p50 of GET /hierarchy one at a time: the HTTP round trip through the serving stack with no
    model, no decoding and a small answer — the floor an app's overhead sits on."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", u.path.rstrip("/") + "/hierarchy")
        conn.getresponse().read()
        lat.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return pct(lat, 50)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.peer_serve:
        peer_serve(a.peer_serve, a.port)
        return 0
    if len(a.proxies) > 1:
        return each_proxy(a, argv if argv is not None else sys.argv[1:])
    # A short path: Ray's socket paths must stay under ~107 characters.
    with tempfile.TemporaryDirectory(prefix="ssload-", dir="/tmp") as scratch:
        bundle = a.bundle
        if a.make_tiny_bundle:
            from serve_helpers import make_tiny_bundle

            bundle = str(make_tiny_bundle(Path(scratch) / "bundle"))
        with running_apps(a, bundle, Path(scratch)) as urls:
            return measure(a, urls)


@contextlib.contextmanager
def running_apps(a: argparse.Namespace, bundle: str, scratch: Path) -> Iterator[dict[str, str]]:
    """``a.apps`` started on ``bundle`` (the peer as its own process, the rest in one Serve):
    app name → base URL; everything stopped on the way out."""
    peer, urls = None, {}
    try:
        if "peer" in a.apps:
            peer, urls["peer"] = start_peer(bundle)
        if set(a.apps) - {"peer"}:
            url = start_serve(a, bundle, scratch)
            urls.update({x: f"{url}/{x}" for x in a.apps if x != "peer"})
        yield urls
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=30)
        if set(a.apps) - {"peer"}:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def each_proxy(a: argparse.Namespace, argv: list[str]) -> int:
    """One child run a proxy mode (a Ray of its own), then the tables side by side."""
    base = [x for i, x in enumerate(argv) if not (x.startswith(("--proxy", "--json"))
                                                    or (i and argv[i - 1] in ("--proxy", "--json")))]
    merged, rc = {}, 0
    for proxy in a.proxies:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            print(f"\n=== --proxy {proxy}", flush=True)
            rc |= subprocess.run([sys.executable, __file__, *base, "--proxy", proxy, "--json", f.name]).returncode
            text = Path(f.name).read_text()
            merged.update({f"{k} [{proxy}]": v for k, v in (json.loads(text) if text else {}).items()})
    if a.json:
        Path(a.json).write_text(json.dumps(merged, indent=2))
    return rc


def measure(a: argparse.Namespace, urls: dict[str, str]) -> int:
    bodies = pictures(32, a.image_px)
    table = {}
    for c in a.levels:
        for name in a.apps:  # interleaved per level: load drifts hit every app alike
            base = urls[name]
            run_load(base, "/predict", bodies, a.warmup, min(c, a.warmup), a.duration_s)
            run = run_load(base, "/predict", bodies, a.requests, c, a.duration_s)
            table[(name, c)] = summarise(run)
            if c == 1:
                table[(name, c)]["floor p50 ms"] = floor_ms(base)
            if run["errors"]:
                print(f"{name} c={c}: {len(run['errors'])} failed, e.g. {run['errors'][:3]}", file=sys.stderr)
    print(f"\n--proxy {a.proxies[0]}: {a.requests} requests per app and level, {a.image_px}x{a.image_px} JPEG "
          f"bodies, loopback, {os.cpu_count()} CPUs; compute = the model's time where it runs (timing_ms), overhead = latency - compute")
    keys = list(dict.fromkeys(k for row in table.values() for k in row))
    print(f"{'app':10s}{'c':>4s}" + "".join(f"{k:>16s}" for k in keys))
    for (name, c), row in table.items():
        cells = [row.get(k, "") for k in keys]
        print(f"{name:10s}{c:>4d}" + "".join(f"{v:>16.2f}" if isinstance(v, float) else f"{v:>16s}" for v in cells))
    for c in a.levels:
        for name in ("single", "fused", "stages"):
            if (name, c) in table and ("peer", c) in table and table[("peer", c)]["req/s"] > 0:
                f, p = table[(name, c)], table[("peer", c)]
                print(f"c={c}: {name}/peer throughput {f['req/s'] / p['req/s']:.2f}; {name} overhead p50 "
                      f"{f['overhead p50 ms']:.1f} ms (peer {p['overhead p50 ms']:.1f} ms)")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{n}@c{c}": r for (n, c), r in table.items()}, indent=2))
    return 0 if all(not r["ok/sent"].startswith("0/") for r in table.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
