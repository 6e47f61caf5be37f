"""Shared Ray fixtures and helpers for tests/test_jobs.py and tests/test_tune.py.

* One local Ray per test session (:func:`ray_session`), fractional resources everywhere.
  With the dashboard: Ray 2.60 frees the placement group of a Train run whose controller was
  killed (a Tune trial stopped by ASHA) through the State API, which needs the dashboard —
  without it stopped trials keep their CPUs and the next trials never start (ray#54305).
* One tiny pipeline run per session (:func:`tiny_run`), reused by the rerun, two-node, job-submit
  and tune tests. Fixtures imported into two test modules would run twice; these memoise.
* Timeouts on everything: threads joined with a deadline, subprocesses with ``timeout=``.

Run as a script (``python tests/ray_helpers.py two-node OUT``) it runs the specialists of a
pipeline output on a two-node ``ray.cluster_utils.Cluster`` and prints JSON; it is its own
process because one process holds one Ray connection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tiny import DEFAULT_CONFIG, REPO  # noqa: F401 - REPO is the test modules' too
from tiny import TINY_RAY as TINY  # 240 images of 16 px, 2 superclasses, 2 epochs, resnet10 x 0.25

PYTHON = sys.executable

ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # A loaded 2-core machine starts a worker group slowly; the default 60 s is too tight there.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180",
    # and its dashboard, whose subprocess modules took over a minute (the default limit is 60 s)
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
    # and Serve's proxy, which its controller kills if not ready in 5 s (as python -m serve sets it)
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "OMP_NUM_THREADS": "1",
}
_CACHE: dict[str, Any] = {}


def ray_env() -> dict[str, str]:
    os.environ.update(ENV)
    if "RAY_TMPDIR" not in os.environ:
        # A short private temp dir: Ray's socket paths must stay under ~107 characters.
        os.environ["RAY_TMPDIR"] = _CACHE["tmpdir"] = tempfile.mkdtemp(prefix="ssjobs-", dir="/tmp")
    return dict(os.environ)


def start_session_ray() -> bool:
    """Starts the session's Ray unless another fixture (e.g. the Serve tests') already did."""
    import ray

    if ray.is_initialized():
        return False
    ray_env()
    import ray._private.ray_constants as constants

    constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = int(ENV["RAY_DASHBOARD_STARTUP_TIMEOUT_S"])  # read when ray was imported
    from jobs.cli import start_or_join_ray
    from jobs.console import set_verbose

    # As the jobs do: the address pinned for this process and its workers (a test may start a
    # second Ray on this host), RAY_ADDRESS and a bootstrap file of someone else's `ray start` ignored.
    os.environ.pop("RAY_ADDRESS", None)
    start_or_join_ray(runtime_env={"env_vars": set_verbose(False)}, num_cpus=2, include_dashboard=True,
                      object_store_memory=500_000_000, log_to_driver=False)
    return True


def stop_session_ray() -> None:
    import ray

    ray.shutdown()
    if "tmpdir" in _CACHE:
        shutil.rmtree(_CACHE.pop("tmpdir"), ignore_errors=True)


def tiny_config(out: Path, tracking_uri: str | None, *extra: str):
    from supersub.config import load_config
    from supersub.pipeline_config import PipelineConfig

    tracking = [f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else ["tracking.enabled=false"]
    return load_config(PipelineConfig, DEFAULT_CONFIG, [*TINY, *tracking, *extra])


def call_with_timeout(fn, timeout: float, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread; raises TimeoutError if it has not returned in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish in {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def tiny_run(root: Path) -> dict[str, Any]:
    """The default pipeline on tiny settings, once per session: out dir, metrics, log, timing."""
    if "tiny" not in _CACHE:
        from jobs.pipeline import run

        out = root / "tiny"
        uri = "sqlite:///" + str(root / "mlflow.db")
        lines: list[str] = []
        t0 = time.perf_counter()
        # A relative --out, as a user types it: Ray Train workers run in another directory.
        relative = Path(os.path.relpath(out))
        metrics = call_with_timeout(run, 900, tiny_config(out, uri), relative, log=lines.append)  # a loaded 2-core host
        _CACHE["tiny"] = {"out": out, "metrics": metrics, "log": lines, "uri": uri,
                          "seconds": time.perf_counter() - t0}
    return _CACHE["tiny"]


def copy_without_specialists(src: Path, dst: Path) -> Path:
    """A copy of a pipeline output whose specialists, bundle and metrics must be made again (task
    folders are named by fingerprint and their identities hold no paths, so the moved copy reuses
    its networks)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ray", "bundle", "predictions.parquet", "report"))
    (dst / "metrics.json").unlink(missing_ok=True)
    for folder in (dst / "tasks").glob("specialist_*"):
        shutil.rmtree(folder)
    return dst


def fail_once_after_epoch_1(task, epoch: int, rank: int) -> None:
    """An ``epoch_hook`` for the RayRunner: records every epoch a worker reports (in the task's
    folder), and the first time the vanilla network's rank-0 worker reports epoch 1 — after the
    controller has committed that epoch's checkpoint (a report is registered asynchronously) —
    the process exits, as a lost worker would. Train's FailureConfig restarts the worker group."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    log = Path(task.out_dir) / "epochs.log"
    with open(log, "a") as f:
        f.write(f"{epoch}\n")
    marker = Path(task.out_dir) / "failed_once"
    if rank != 0 or task.name != "vanilla" or epoch != 1 or marker.exists():
        return
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    marker.write_text("failure injected after epoch 1\n")
    print("injected failure: worker process exits after epoch 1", flush=True)
    os._exit(1)


def parquet_source(root: Path, superclasses: int = 2, subclasses: int = 3, per_class: int = 40, size: int = 16):
    """The tiny synthetic images as a Parquet image source (``train-00000.parquet``: ``image:
    struct<bytes, path>``, ``label``, ``wnid``; PNG bytes, row groups of 64) and its hierarchy
    file: (source folder, hierarchy.json)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from supersub.data import SyntheticSpec, render, synthetic_hierarchy
    from supersub.data.synthetic import class_id

    spec = SyntheticSpec(superclasses, subclasses, per_class, size=size)
    idx = list(range(spec.num_train))
    fine = spec.class_of(idx)
    blobs = []
    for arr in render(spec, idx):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table({
        "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
        "label": fine.astype("int64"),
        "wnid": [class_id(c // subclasses, c % subclasses) for c in fine],
    })
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "parquet" / "train-00000.parquet", row_group_size=64)
    (root / "hierarchy.json").write_text(synthetic_hierarchy(superclasses, subclasses).to_json())
    return root / "parquet", root / "hierarchy.json"


# ----------------------------------------------------------------------------- ray start
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_using(marker: str) -> list[int]:
    """Processes that mention ``marker`` (a cluster's private temp dir) in their command line,
    environment or open files. Ray renames some processes (``ray::DashboardAgent``) and starts
    some with a reduced environment, but every one keeps a log file under the temp dir open."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
            if marker.encode() in text or any(marker in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def stop_cluster(temp_dir: str, timeout: float = 20.0) -> None:
    """Stops the processes of one ``ray start`` cluster by pid and removes its temp dir.
    (``ray stop`` would stop every Ray on the host: the session's, and other people's.)"""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_using(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not pids_using(temp_dir):
            break
    shutil.rmtree(temp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- two nodes
def two_node_main(out: str) -> None:
    """Runs the pipeline's specialists in ``out`` on a simulated two-node cluster, 1 CPU a node
    and 1 CPU a specialist, so that two concurrent specialists need both nodes. Prints the node
    each specialist ran on, as the runner recorded it, and the runner's log."""
    ray_env()
    import ray
    from ray.cluster_utils import Cluster

    from jobs.runner import RayRunner
    from supersub.pipeline import run_pipeline

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=False)
        # Storage as a URI (pyarrow's filesystem), as a cluster's shared storage would be.
        storage = (Path(out) / "ray-storage").resolve().as_uri()
        cfg = tiny_config(Path(out), None, "resources.specialist_cpus=1.0", f"resources.storage_path={storage}")
        lines: list[str] = []
        metrics = run_pipeline(cfg, Path(out), RayRunner(cfg.resources, out, log=lines.append), log=lines.append)
        placed = {name: json.loads((Path(folder) / "metrics.json").read_text()).get("node_id")
                  for name, folder in metrics["tasks"].items() if name.startswith("specialist_")}
        print("RESULT " + json.dumps({
            "nodes": [cluster.head_node.node_id, worker.node_id], "specialist_nodes": placed, "log": lines,
        }), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "two-node":
        two_node_main(sys.argv[2])
    else:
        sys.exit("usage: python tests/ray_helpers.py two-node OUT")
