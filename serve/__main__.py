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
* on SIGTERM or SIGINT it drains: it sets the app's drain flag (serve/drain.py: an actor, so
  that every ingress replica on every node sees it), giving it ``--drain-grace-s`` (1 s): every
  ingress replica answers ``/healthz`` 503 at once (for a load balancer) and, once the grace is
  over — the requests already on their way are answered — new requests 503 with ``Retry-After``;
  it waits until every replica reports no request in flight (``--drain-timeout-s`` at most), then
  stops Serve and Ray (on a cluster it joined: deletes its app) and exits 0 — where ``serve run``
  aborts on SIGTERM (exit 134);
* the process a user or service manager signals is a small supervisor: the launcher proper, and
  Ray's processes under it, run in a session of their own, so that a signal to the whole process
  group (``timeout``, a shell's job control, ``kill -- -PGID``) reaches the supervisor alone,
  which passes it on, and the drain runs as for a signal to the launcher. In the group, Ray's
  raylet and GCS would die under the draining Serve, whose shutdown then hangs 30 s and leaves
  HAProxy on its ports. If the supervisor is killed outright, the launcher drains and stops too.
  Under systemd use ``KillMode=mixed``: its default signals every process of the unit at once;
* joining a running cluster (``RAY_ADDRESS``, or a ``ray start`` on this host), it hands the
  settings above to Serve's controller, proxies and replicas through Ray (their environment is
  the cluster's, not this process's) and says in one line which proxy serves and why: a Serve
  already running there keeps the proxy it was started with;
* ``bundle=models:/...`` or ``runs:/...`` is resolved here, once; the replicas get the files (or a
  folder in ``bundle_cache``), never the URI (serve.app.replica_source). A deployment that fails
  to start is one line with the replica's own error.

Ray's own ports listen on every interface (Ray 2.60 has no bind-address option; the README lists
them); this launcher keeps Ray's default token authentication on, so they answer no one without
the token. App arguments are those of :class:`serve.app.AppArgs` (two replicas by default: a
replica that dies is routed around in about a second, serve/haproxy_loopback.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request
import uuid

from serve.haproxy_loopback import haproxy_environment

CONTROL_FD = "SUPERSUB_SERVE_CONTROL_FD"  # the launcher's end of the supervisor's pipe


def main(argv: list[str] | None = None) -> int:
    if CONTROL_FD not in os.environ and os.name == "posix":
        return supervise(sys.argv[1:] if argv is None else argv)
    # First of all: a SIGTERM or Ctrl-C from here on is a request to stop, never an abort that
    # leaves a half-started Ray behind.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _watch_supervisor(stop)
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
    # What Serve's processes must read when they start: set here for a Ray this process starts
    # (its processes inherit this environment), handed over through Ray on a cluster it joins.
    # The user's own Serve settings (RAY_SERVE_HAPROXY_STATS_PORT, ...) go with them.
    serve_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    serve_env.setdefault("RAY_USAGE_STATS_ENABLED", os.environ.get("RAY_USAGE_STATS_ENABLED", "0"))
    # Serve's controller kills a proxy not ready within 5 s and the launch fails with "actor
    # died": on a busy host its start takes longer (seen at load average 6 on 2 cores).
    serve_env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if stop.is_set():
        return 0
    if a.proxy == "haproxy":
        try:
            serve_env.update(haproxy_environment())
        except FileNotFoundError as e:
            print(f"python -m serve: error: {e}; --proxy serve runs without it", file=sys.stderr)
            return 2
    os.environ.update(serve_env)
    args.setdefault("drain", f"supersub-drain-{uuid.uuid4().hex[:12]}")
    return serve_until_signalled(a, args, stop, serve_env)


def supervise(argv: list[str]) -> int:
    """Runs the launcher as a child in a session of its own and passes SIGTERM / SIGINT on to it
    through a pipe (closed, too, when this process dies: the launcher then stops as if
    signalled). Returns the launcher's exit status."""
    import subprocess

    read, write = os.pipe()

    def forward(*_) -> None:
        try:
            os.write(write, b"s")
        except OSError:  # the launcher has already exited
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen([sys.executable, "-m", "serve", *argv], env={**os.environ, CONTROL_FD: str(read)},
                                 pass_fds=(read,), start_new_session=True)
    finally:
        os.close(read)
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


def _watch_supervisor(stop: threading.Event) -> None:
    """``stop`` set when the supervisor passes a signal on, or dies (its end of the pipe closes)."""
    fd = os.environ.pop(CONTROL_FD, None)
    if fd is None:
        return

    def watch() -> None:
        try:
            os.read(int(fd), 1)
        except OSError:
            pass
        stop.set()

    threading.Thread(target=watch, name="supervisor", daemon=True).start()


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


APP = "supersub"
HINT_LOGS = "the replicas' logs are under RAY_TMPDIR (default /tmp/ray)/session_latest/logs/serve"


def _joining() -> bool:
    """Whether :func:`jobs.cli.start_or_join_ray` will join a running cluster rather than start
    Ray: the same lookup (``RAY_ADDRESS``, else the last ``ray start`` on this host)."""
    from ray._private import services

    return services.get_ray_address_from_environment(None, None) is not None


def _start_ray(ray, runtime_env: dict | None = None) -> bool:
    """Ray started or joined with its address pinned (:func:`jobs.cli.start_or_join_ray`: beside
    another Ray on the host, Serve's own lookups must not find the other one); once more if Ray's
    node timed out during its start-up (an overloaded machine: 3 of ~22 launches there).
    Returns whether this process started Ray (and so may stop all of Serve at the end)."""
    import logging

    from jobs.cli import start_or_join_ray

    for attempt in (1, 2):
        try:
            return start_or_join_ray(worker_env=False, include_dashboard=False, log_to_driver=False,
                                     logging_level=logging.WARNING, runtime_env=runtime_env)[0]
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


def _serve_running(ray) -> bool:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _proxy_kind(ray) -> str:
    """Which proxy Serve's controller runs: "HAProxy", "Serve's Python proxy" or "no proxy"."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        proxies = ray.get(controller.get_proxies.remote(), timeout=30)
        kinds = {h._ray_actor_creation_function_descriptor.class_name for h in proxies.values()}
    except Exception:  # noqa: BLE001 - a diagnostic line must not stop the service
        return "an unknown proxy"
    return "HAProxy" if "HAProxyManager" in kinds else "Serve's Python proxy" if kinds else "no proxy"


def _ingress_line(kind: str, wanted: str, started_serve: bool) -> str:
    """One line: which proxy takes HTTP, and why."""
    asked = "HAProxy" if wanted == "haproxy" else "Serve's Python proxy"
    if started_serve:
        return f"ingress: {kind} (--proxy {wanted})"
    why = "Serve was already running on this cluster and keeps the proxy it started with"
    if kind != asked:
        why += f"; --proxy {wanted} takes effect when Serve starts (after `serve shutdown`)"
    return f"ingress: {kind} ({why})"


def serve_until_signalled(a: argparse.Namespace, args: dict[str, str], stop: threading.Event | None = None,
                          serve_env: dict[str, str] | None = None) -> int:
    stop = stop or threading.Event()
    import ray
    from ray import serve

    from serve import drain as drain_flag
    from serve.app import app, vanilla_app

    try:
        # Pre-flight, before Ray starts: every argument checked, every bundle file read and hashed
        # (supersub.bundle.verify_files), a models:/ or runs:/ bundle resolved here — a bad one is
        # one line and exit 2, not a failure in a replica.
        application = (vanilla_app if a.vanilla else app)(args)
    except Exception as e:  # noqa: BLE001 - every bad argument or bundle: one line, exit 2
        print(_error(e), file=sys.stderr)
        return 2
    if stop.is_set():
        return 0
    started, flag = True, None  # until known: a Ray that half-started here is ours to stop
    try:
        # Joining, Serve's processes start with the cluster's environment: the settings go
        # through Ray — the job's runtime env (the replicas), the controller's (its proxies).
        env = {"env_vars": dict(serve_env or {})} if serve_env and _joining() else None
        try:
            started = _start_ray(ray, env)
        finally:
            _reinstall(stop)
        if not stop.is_set():
            flag = drain_flag.create(args["drain"])
            ray.get(flag.busy.remote(), timeout=120)
            started_serve = not _serve_running(ray)
            serve.start(http_options={"host": a.host, "port": a.port},
                        controller_options={"runtime_env": env} if env else None)
            print(_ingress_line(_proxy_kind(ray), a.proxy, started_serve), flush=True)
            serve.run(application, name=APP, route_prefix="/", blocking=False)
    except SystemExit:  # Ray's own SIGTERM handler fired while ray.init held it: stop
        stop.set()
    except Exception as e:  # noqa: BLE001 - Ray or the app failing to start: one line, not a traceback
        failed = _deploy_failure(serve) if ray.is_initialized() else None
        print(_error(RuntimeError(failed), HINT_LOGS) if failed else _error(e, _launch_hint(e)), file=sys.stderr)
        _shutdown(ray, serve, started)
        return 1
    url = f"http://{a.host}:{a.port}"
    deadline, serving = time.monotonic() + 300, False
    while not stop.is_set() and time.monotonic() < deadline:
        failed = _deploy_failure(serve)
        if failed:
            print(_error(RuntimeError(failed), HINT_LOGS), file=sys.stderr)
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
    # Until the grace is over /predict still answers: the requests already sent — in HAProxy, or
    # on their way to it — are answered; /healthz is 503 at once.
    try:
        ray.get(flag.start.remote(max(0.0, a.drain_grace_s)), timeout=30)
    except Exception as e:  # noqa: BLE001 - the flag is unreachable: stop without the drain
        print(_error(e, "the drain flag is unreachable: stopping without a drain"), file=sys.stderr, flush=True)
    time.sleep(max(0.0, a.drain_grace_s))
    replicas, left = wait_until_idle(flag, a.drain_timeout_s)
    if replicas:
        print(f"drain timeout after {a.drain_timeout_s:g} s: {left} request(s) in flight on {replicas} replica(s) "
              "are cut", flush=True)
    else:
        time.sleep(0.5)  # the last answers, handed to the replicas' servers, pass through HAProxy
    # Not serve.delete first: the routes would go at once and new requests get 404, not 503.
    _shutdown(ray, serve, started)
    print("stopped", flush=True)
    return 0


def _status_name(status) -> str:
    return str(status).split(".")[-1]


def _deploy_failure(serve) -> str | None:
    """Why the app failed to deploy, in one line — the last line of the failing deployment's
    message, where Serve puts its replica's exception (the app's own message only names the
    deployments) — or None while it has not failed."""
    try:
        app = serve.status().applications.get(APP)
    except Exception:  # noqa: BLE001 - the controller is still starting
        return None
    if app is None or _status_name(app.status) != "DEPLOY_FAILED":
        return None
    messages = [d.message for d in app.deployments.values()
                if _status_name(d.status) in ("DEPLOY_FAILED", "UNHEALTHY") and d.message]
    for message in (*messages, app.message or ""):
        lines = [x.strip() for x in message.splitlines() if x.strip()]
        if lines:
            return f"deploying the app failed: {lines[-1]}"
    return "deploying the app failed"


def _shutdown(ray, serve, started: bool = True) -> None:
    """Serve and Ray stopped; on a cluster this process joined, only this app is deleted and the
    cluster (with whatever else it serves) is left running. The drain flag ends with this process."""
    for step in (serve.shutdown if started else lambda: serve.delete(APP), ray.shutdown):
        try:
            if ray.is_initialized():
                step()
        except Exception:  # noqa: BLE001, S110 - stopping what may have half-started
            pass


def wait_until_idle(flag, timeout_s: float) -> tuple[int, int]:
    """Waits until every ingress replica, on every node, has reported no request in flight since
    the drain began (twice in a row, 0.1 s apart). Returns (0, 0) then; at the timeout, the
    replicas still busy and their requests in flight."""
    import ray

    deadline, zeros, busy = time.monotonic() + timeout_s, 0, (-1, -1)
    while zeros < 2 and time.monotonic() < deadline:
        try:
            busy = tuple(ray.get(flag.busy.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - the flag is unreachable: what is known stands
            pass
        zeros = zeros + 1 if busy == (0, 0) else 0
        time.sleep(0.1)
    return (0, 0) if zeros >= 2 else busy


if __name__ == "__main__":
    sys.exit(main())
