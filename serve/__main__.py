"""``python -m serve bundle=PATH [key=value ...] [--host 127.0.0.1] [--port 8000] [--vanilla]``

Serves a bundle the way ``serve run serve.app:app bundle=PATH`` does, with what a service
needs around it:

* it binds the HTTP endpoint to loopback unless told otherwise;
* it runs Serve's HAProxy ingress and throughput-optimised mode (``--proxy haproxy``, the
  default): HTTP goes from HAProxy straight to the ingress replica's own server, where behind
  Serve's Python proxy the replica fetches each request body from the proxy with an actor call —
  3.4–4.9 ms of overhead a request instead of 10–12 on 2 CPUs (docs/benchmarks.md). HAProxy's stats and metrics
  ports, which Ray binds to every interface, are moved to loopback (serve/haproxy_loopback.py).
  ``--proxy serve`` is Serve's own proxy, as ``serve run`` has it;
* it prints one line when ``/healthz`` first answers ok (every stage has run a forward);
* on SIGTERM or SIGINT it drains: it creates the app's ``drain_file``, so every ingress replica
  answers new requests 503 with ``Retry-After`` (and ``/healthz`` 503, for a load balancer), waits
  until ``/healthz`` reports no request in flight (``--drain-timeout-s`` at most), then stops Serve
  and Ray and exits 0 — where ``serve run`` aborts on SIGTERM (exit 134).

Ray's own ports listen on every interface (Ray 2.60 has no bind-address option); this launcher
keeps Ray's default token authentication on, so they answer no one without the token. App
arguments are those of :class:`serve.app.AppArgs`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from serve.haproxy_loopback import haproxy_environment


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0])
    p.add_argument("args", nargs="+", metavar="key=value", help="app arguments, e.g. bundle=runs/default/bundle")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--vanilla", action="store_true", help="serve the bundle's vanilla network (vanilla_app)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, wait at most this long for the requests in flight")
    p.add_argument("--proxy", choices=("haproxy", "serve"), default="haproxy",
                   help="haproxy (default): Serve's HAProxy ingress and throughput-optimised mode, every port it "
                   "opens on loopback (stats 8404, metrics 9101: RAY_SERVE_HAPROXY_STATS_PORT / _METRICS_PORT); "
                   "serve: Serve's Python proxy, as `serve run` has it (~8 ms more a request on 2 CPUs)")
    a = p.parse_intermixed_args(argv)  # key=value pairs before and after the options
    args = {}
    for item in a.args:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"{item!r} is not key=value")
        args[key] = value
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    scratch = Path(tempfile.mkdtemp(prefix="supersub-serve-"))
    try:
        if a.proxy == "haproxy":
            try:
                # Read by Serve when it starts: set before ray.init.
                os.environ.update(haproxy_environment(scratch / "haproxy"))
            except FileNotFoundError as e:
                print(f"python -m serve: error: {e}; --proxy serve runs without it", file=sys.stderr)
                return 2
        args.setdefault("drain_file", str(scratch / "draining"))
        return serve_until_signalled(a, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def serve_until_signalled(a: argparse.Namespace, args: dict[str, str]) -> int:
    import ray
    from ray import serve

    from serve.app import app, vanilla_app

    try:
        application = (vanilla_app if a.vanilla else app)(args)
    except Exception as e:  # noqa: BLE001 - every bad argument or bundle: one line, exit 2
        print(f"python -m serve: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init: replaces Ray's aborting handler
        signal.signal(sig, lambda *_: stop.set())
    serve.run(application, name="supersub", route_prefix="/", blocking=False)
    url = f"http://{a.host}:{a.port}"
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    print(f"serving {args['bundle']} on {url} (POST /predict, GET /healthz)", flush=True)
                    break
        except OSError:
            time.sleep(0.5)
    stop.wait()
    print("draining: new requests are answered 503 + Retry-After; finishing the ones in flight", flush=True)
    Path(args["drain_file"]).touch()
    left = wait_until_idle(url, a.drain_timeout_s)
    if left:
        cut = f"{left} request(s) in flight are cut" if left > 0 else "no draining /healthz answer seen"
        print(f"drain timeout after {a.drain_timeout_s:g} s: {cut}", flush=True)
    # Not serve.delete first: the routes would go at once and new requests get 404, not 503.
    serve.shutdown()
    ray.shutdown()
    print("stopped", flush=True)
    return 0


def wait_until_idle(url: str, timeout_s: float) -> int:
    """Polls the draining ``/healthz`` until three answers in a row say no request is in flight
    (three: behind several ingress replicas, one answer speaks for one replica). Returns 0 then;
    at the timeout, the last count seen (-1: none seen)."""
    deadline, zeros, left = time.monotonic() + timeout_s, 0, -1
    while zeros < 3 and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5):
                pass  # 200: the flag is not seen yet
        except urllib.error.HTTPError as e:
            left = int(json.loads(e.read() or b"{}").get("in_flight", -1))
            zeros = zeros + 1 if left == 0 else 0
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return 0 if zeros >= 3 else left


if __name__ == "__main__":
    sys.exit(main())
