"""``python -m serve bundle=PATH [key=value ...] [--host 127.0.0.1] [--port 8000] [--vanilla]``

Serves a bundle the way ``serve run serve.app:app bundle=PATH`` does, with what a service
needs around it:

* it binds the HTTP endpoint to loopback unless told otherwise (``--fast``: Serve's HAProxy
  ingress, whose side ports listen everywhere — see ``--help``);
* it prints one line when ``/healthz`` first answers ok (every stage has run a forward);
* on SIGTERM or SIGINT it drains: Serve stops routing new requests, lets the ones in flight
  finish (each deployment's ``graceful_shutdown_timeout_s``), and the process exits 0 — where
  ``serve run`` aborts on SIGTERM (exit 134).

Ray's own ports listen on every interface (Ray 2.60 has no bind-address option); this launcher
keeps Ray's default token authentication on, so they answer no one without the token. App
arguments are those of :class:`serve.app.AppArgs`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0])
    p.add_argument("args", nargs="+", metavar="key=value", help="app arguments, e.g. bundle=runs/default/bundle")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--vanilla", action="store_true", help="serve the bundle's vanilla network (vanilla_app)")
    p.add_argument("--fast", action="store_true",
                   help="Ray Serve's HAProxy ingress and throughput-optimised mode: about 6 ms less per request on "
                   "2 CPUs, but HAProxy's stats (8404) and metrics (9101) ports and the replicas' HTTP ports listen "
                   "on every interface: only behind a firewall or on a private network")
    a = p.parse_intermixed_args(argv)  # key=value pairs before and after the options
    args = {}
    for item in a.args:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"{item!r} is not key=value")
        args[key] = value
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.fast:  # read by Ray Serve when it starts: set before ray.init
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
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
    print("draining: finishing the requests in flight", flush=True)
    # Deleting the app drains it: every replica stops taking requests and finishes the ones it
    # has (graceful_shutdown_timeout_s) before it stops; serve.shutdown() alone would cut them.
    serve.delete("supersub", _blocking=True)
    serve.shutdown()
    ray.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
