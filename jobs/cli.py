"""What every job's ``main`` shares: user errors as one line and exit code 2, never a traceback;
Ray started or joined with its address pinned (:func:`start_or_join_ray`)."""

from __future__ import annotations

import os
import sys


def fail(error: BaseException, prog: str = "") -> int:
    """Prints ``error`` as one line on stderr and returns the exit code for a user error (2)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{prog + ': ' if prog else ''}error: {text}", file=sys.stderr)
    return 2


def start_or_join_ray(log=None, *, worker_env: bool = True, **init_kwargs) -> tuple[bool, str]:
    """``ray.init`` with the cluster's address pinned, for this process and every worker of the job.

    Ray code that looks a cluster up by itself — the State API, Train's placement-group cleaner,
    a library's own ``ray.init()`` — reads ``RAY_ADDRESS`` first; without it, it searches the host
    and fails ("Found multiple active Ray instances") or picks another cluster when a second Ray
    runs there. So the address is decided before ``ray.init``:

    * ``RAY_ADDRESS``, else the cluster of the last ``ray start`` on this host (as ``ray.init()``
      would find it): joined;
    * else a local Ray is started on a GCS port chosen here (``RAY_GCS_SERVER_PORT``), so that its
      address is known before it starts.

    Either way the address goes into ``os.environ`` (this process, and the raylet a local start
    spawns) and, with ``worker_env``, into the job's ``runtime_env`` env_vars (every worker, on
    every node). Serve leaves that out: an actor with a runtime env cannot take a pre-started
    worker, and on a busy host Serve's proxy then misses its 5 s readiness check and is killed.
    Returns ``(started, address)``: whether this process started Ray (and so must stop it)."""
    import ray
    from ray._private import services

    if ray.is_initialized():
        address = ray.get_runtime_context().gcs_address
        os.environ["RAY_ADDRESS"] = address
        return False, address
    runtime_env = init_kwargs.pop("runtime_env", None) or {}
    env = dict(runtime_env.get("env_vars", {}))

    def with_address(address: str) -> dict:
        return {**runtime_env, "env_vars": {**env, "RAY_ADDRESS": address}} if worker_env else runtime_env or None

    address = services.get_ray_address_from_environment(None, init_kwargs.get("_temp_dir"))
    started = address is None
    if started:
        port = _free_port()
        address = f"{services.get_node_ip_address()}:{port}"
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = address  # inherited by the raylet, hence by every local worker
        try:
            ray.init(address="local", runtime_env=with_address(address), **init_kwargs)
        except BaseException:
            os.environ.pop("RAY_ADDRESS", None)
            raise
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved
        actual = ray.get_runtime_context().gcs_address
        if actual != address and log:
            log(f"warning: Ray started at {actual}, not at the pinned {address}")
        os.environ["RAY_ADDRESS"] = address = actual
    else:
        ray.init(address=address, runtime_env=with_address(address), **init_kwargs)
        if "://" not in address:  # a Ray Client address stays as given
            address = ray.get_runtime_context().gcs_address
        os.environ["RAY_ADDRESS"] = address
    return started, address


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
