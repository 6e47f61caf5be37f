"""``python -m serve bundle=PATH [key=value ...] [--host 127.0.0.1] [--port 8000] [--vanilla]``

Serves a bundle the way ``serve run serve.app:app bundle=PATH`` does, with what a service
needs around it:

* it installs its SIGTERM / SIGINT handler first, then checks every argument and reads, hashes
  and parses every bundle file (``supersub.bundle.verify_files``) before Ray starts: a bad bundle
  or setting is one line, exit 2; Ray failing to start is one line with a hint, exit 1;
* it binds the HTTP endpoint to loopback unless told otherwise;
* it runs Serve's HAProxy ingress and throughput-optimised mode (``--proxy haproxy``, the
  default): HTTP goes from HAProxy straight to the ingress replica's own server, where behind
  Serve's Python proxy the replica fetches each request body from the proxy with an actor call —
  3.4–4.9 ms of overhead a request instead of 10–12 on 2 CPUs (docs/benchmarks.md). HAProxy's stats and metrics
  ports, which Ray binds to every interface, are moved to loopback (serve/haproxy_loopback.py).
  ``--proxy serve`` is Serve's own proxy, as ``serve run`` has it;
* it prints one line when ``/healthz`` first answers ok (every stage has run a forward);
* on SIGTERM or SIGINT it drains: it creates the app's ``drain_file``, dated ``--drain-grace-s``
  (1 s) ahead, so every ingress replica answers ``/healthz`` 503 at once (for a load balancer) and,
  once the grace is over — the requests already on their way are answered — new requests 503 with
  ``Retry-After``; it waits
  until ``/healthz`` reports no request in flight (``--drain-timeout-s`` at most), then stops Serve
  and Ray and exits 0 — where ``serve run`` aborts on SIGTERM (exit 134).

Ray's own ports listen on every interface (Ray 2.60 has no bind-address option; the README lists
them); this launcher keeps Ray's default token authentication on, so they answer no one without
the token. App arguments are those of :class:`serve.app.AppArgs` (two replicas by default: a
replica that dies is routed around in about a second, serve/haproxy_loopback.py).
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
    # First of all: a SIGTERM or Ctrl-C from here on is a request to stop, never an abort that
    # leaves a scratch folder or a half-started Ray behind (issue 21).
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0])
    p.add_argument("args", nargs="+", metavar="key=value", help="app arguments, e.g. bundle=runs/default/bundle")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--vanilla", action="store_true", help="serve the bundle's vanilla network (vanilla_app)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, wait at most this long for the requests in flight")
    p.add_argument("--drain-grace-s", type=float, default=1.0,
                   help="on SIGTERM, keep answering /predict this long (/healthz is 503 at once): requests "
                   "already on their way are answered, not refused")
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
    # Serve's controller kills a proxy not ready within 5 s and the launch fails with "actor
    # died": on a busy host its start takes longer (seen at load average 6 on 2 cores).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if stop.is_set():
        return 0
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
        return serve_until_signalled(a, args, stop)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _error(e: BaseException, hint: str = "") -> str:
    """``python -m serve: error: <the first line of e>[; hint]`` — one line. For an error raised in
    a Ray actor (whose first line only names the actor), the error it wraps."""
    while isinstance(getattr(e, "cause", None), BaseException) and e.cause is not e:
        e = e.cause
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return f"python -m serve: error: {lines[0]}" + (f"; {hint}" if hint else "")


def _launch_hint(e: BaseException) -> str:
    text = str(e)
    if "timed out during startup" in text or "Timed out" in text or "timeout" in text.lower():
        return ("Ray's processes did not start in time — usually an overloaded machine (Ray waits 30 s for its "
                "raylet); retry when it is less busy")
    if "AF_UNIX path length" in text:
        return "RAY_TMPDIR is too long for Ray's socket paths: use a shorter folder (e.g. /tmp/ray)"
    if "address already in use" in text.lower() or "Failed to bind" in text:
        return "a port is taken: choose another with --port, or stop what holds it"
    return "Ray's logs are under RAY_TMPDIR (default /tmp/ray)/session_latest/logs"


def _start_ray(ray) -> bool:
    """Ray started or joined with its address pinned (:func:`jobs.cli.start_or_join_ray`: beside
    another Ray on the host, Serve's own lookups must not find the other one); once more if Ray's
    node timed out during its start-up (an overloaded machine: 3 of ~22 launches there, issue 21).
    Returns whether this process started Ray (and so may stop all of Serve at the end)."""
    import logging

    from jobs.cli import start_or_join_ray

    for attempt in (1, 2):
        try:
            return start_or_join_ray(worker_env=False, include_dashboard=False, log_to_driver=False,
                                     logging_level=logging.WARNING)[0]
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this one
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print("Ray did not start in time (overloaded machine?); trying once more", file=sys.stderr, flush=True)
            ray.shutdown()
    return False


def _reinstall(stop: threading.Event) -> None:
    # ray.init installs handlers of its own (SIGTERM: sys.exit); put ours back.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def serve_until_signalled(a: argparse.Namespace, args: dict[str, str], stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    import ray
    from ray import serve

    from serve.app import app, vanilla_app

    try:
        # Pre-flight, before Ray starts: every argument checked, every bundle file read and hashed
        # (supersub.bundle.verify_files) — a bad one is one line and exit 2, not a failure in a replica.
        application = (vanilla_app if a.vanilla else app)(args)
    except Exception as e:  # noqa: BLE001 - every bad argument or bundle: one line, exit 2
        print(_error(e), file=sys.stderr)
        return 2
    if stop.is_set():
        return 0
    started = True  # until known: a Ray that half-started here is ours to stop
    try:
        try:
            started = _start_ray(ray)
        finally:
            _reinstall(stop)
        if not stop.is_set():
            serve.start(http_options={"host": a.host, "port": a.port})
            serve.run(application, name="supersub", route_prefix="/", blocking=False)
    except SystemExit:  # Ray's own SIGTERM handler fired while ray.init held it: stop
        stop.set()
    except Exception as e:  # noqa: BLE001 - Ray failing to start: one line with a hint, not a traceback
        print(_error(e, _launch_hint(e)), file=sys.stderr)
        _shutdown(ray, serve, started)
        return 1
    url = f"http://{a.host}:{a.port}"
    deadline, serving = time.monotonic() + 300, False
    while not stop.is_set() and time.monotonic() < deadline:
        failed = _deploy_failure(serve)
        if failed:
            print(_error(RuntimeError(failed), "the replicas' logs are under RAY_TMPDIR (default /tmp/ray)"
                         "/session_latest/logs/serve"), file=sys.stderr)
            _shutdown(ray, serve, started)
            return 1
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    print(f"serving {args['bundle']} on {url} (POST /predict, GET /healthz)", flush=True)
                    serving = True
                    break
        except OSError:
            time.sleep(0.5)
    stop.wait()
    if not serving:  # stopped while starting: nothing was answered, nothing to drain
        _shutdown(ray, serve, started)
        print("stopped", flush=True)
        return 0
    print("draining: new requests are answered 503 + Retry-After; finishing the ones in flight", flush=True)
    # The file's date is when /predict starts refusing (serve.app.Ingress._refusing): until then
    # the requests already sent — in HAProxy, or on their way to it — are answered.
    drain, refuse_at = Path(args["drain_file"]), time.time() + max(0.0, a.drain_grace_s)
    drain.touch()
    os.utime(drain, (refuse_at, refuse_at))
    time.sleep(max(0.0, a.drain_grace_s))
    left = wait_until_idle(url, a.drain_timeout_s)
    if left:
        cut = f"{left} request(s) in flight are cut" if left > 0 else "no draining /healthz answer seen"
        print(f"drain timeout after {a.drain_timeout_s:g} s: {cut}", flush=True)
    else:
        time.sleep(0.5)  # the last answers, handed to the replicas' servers, pass through HAProxy
    # Not serve.delete first: the routes would go at once and new requests get 404, not 503.
    _shutdown(ray, serve, started)
    print("stopped", flush=True)
    return 0


def _deploy_failure(serve) -> str | None:
    """Why the app failed to deploy (its status message, first line), or None while it has not."""
    try:
        app = serve.status().applications.get("supersub")
    except Exception:  # noqa: BLE001 - the controller is still starting
        return None
    if app is None or str(app.status).split(".")[-1] != "DEPLOY_FAILED":
        return None
    message = (app.message or "deploying the app failed").strip()
    # Serve's message is a traceback; its last line names the error.
    lines = [x for x in message.splitlines() if x.strip()]
    return f"deploying the app failed: {lines[-1].strip() if lines else message}"


def _shutdown(ray, serve, started: bool = True) -> None:
    """Serve and Ray stopped; on a cluster this process joined, only this app is deleted and the
    cluster (with whatever else it serves) is left running."""
    for step in (serve.shutdown if started else lambda: serve.delete("supersub"), ray.shutdown):
        try:
            if ray.is_initialized():
                step()
        except Exception:  # noqa: BLE001, S110 - stopping what may have half-started
            pass


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
