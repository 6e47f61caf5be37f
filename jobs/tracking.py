"""MLflow tracking: one parent run per job, one nested run per stage, specialist or trial.

Everything is logged from the driver, through one :class:`~mlflow.tracking.MlflowClient` and one
lock: Ray workers never talk to MLflow. That is what makes several specialists finishing at once
lose nothing (SQLite allows one writer; the fluent ``mlflow.start_run`` API keeps its active run
per thread), and it keeps the tracking store reachable from the driver only.

Per-epoch metrics come from a stage result's ``history`` (``step`` = epoch), final metrics are
the result's numbers flattened to dotted keys (``models.two_stage_hard.top1``; ``final_val_acc``
where a per-epoch metric has the same name).

Tracking URI: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite at
``~/.supersub/mlflow.db`` (absolute: a relative ``sqlite:///mlflow.db`` would be relative to
each process's working directory), with artifacts in ``~/.supersub/mlartifacts``.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_HOME = Path("~/.supersub").expanduser()
_KEY_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")
_BATCH = 100  # MLflow's limit of params (and our chunk of metrics) per log_batch call


def default_tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        DEFAULT_HOME.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + str(DEFAULT_HOME / "mlflow.db")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` → ``{"a.b.0": 1, "a.b.1": 2}``."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)) and data and all(isinstance(v, (dict, list, tuple)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out


def numeric(data: dict[str, Any]) -> dict[str, float]:
    """The entries of a flat dict that are numbers (lists of numbers become ``key.i``)."""
    out: dict[str, float] = {}
    for k, v in data.items():
        if isinstance(v, (list, tuple)):
            out.update(numeric({f"{k}.{i}": x for i, x in enumerate(v)}))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[_KEY_BAD.sub("_", k)] = float(v)
    return out


class MlflowTracker:
    """A parent run for one job; :meth:`stage` adds a finished nested run.

    Use as a context manager: the parent run ends FINISHED, or FAILED when the job raises.
    """

    def __init__(
        self,
        run_name: str,
        params: dict[str, Any],
        *,
        tracking_uri: str | None = None,
        experiment: str = "supersub",
        tags: dict[str, str] | None = None,
        log_bundle: bool = True,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = default_tracking_uri(tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        self.log_bundle = log_bundle
        self._lock = threading.Lock()
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns
                location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self._log(self.run_id, params=flatten(params))

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        with self._lock:
            self.client.set_terminated(self.run_id, status)

    # ------------------------------------------------------------------ Tracker protocol
    def stage(self, name: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        """A nested run for a finished stage: its task as params, its history per epoch, its
        final numbers as metrics."""
        run_id = self.nested(name, params)
        history = result.get("history") or []
        steps = [(int(row.get("epoch", i + 1)), numeric(row)) for i, row in enumerate(history)]
        per_epoch = {k for _, row in steps for k in row}
        final = numeric(flatten({k: v for k, v in result.items() if k != "history"}))
        # A final number named like a per-epoch one (val_acc of the exported delta, mean images/s)
        # gets a prefix: under the same key it would read as one more point of the epoch curve.
        final = {(f"final_{k}" if k in per_epoch else k): v for k, v in final.items()}
        self._log(run_id, metrics=final, steps=steps)
        self.end(run_id)

    def summary(self, metrics: dict[str, Any], artifacts: list[Path]) -> None:
        """Final metrics and artifacts of the parent run (the bundle only with ``log_bundle``)."""
        self._log(self.run_id, metrics=numeric(flatten(metrics)))
        for path in artifacts:
            if path.name == "bundle" and not self.log_bundle:
                continue
            self.artifact(path, run_id=self.run_id)

    # ------------------------------------------------------------------ building blocks
    def nested(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
        with self._lock:
            run = self.client.create_run(
                self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id, **(tags or {})}
            )
        self._log(run.info.run_id, params=flatten(params or {}))
        return run.info.run_id

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        with self._lock:
            self.client.set_terminated(run_id, status)

    def metrics(self, values: dict[str, Any], run_id: str | None = None, step: int = 0) -> None:
        self._log(run_id or self.run_id, steps=[(step, numeric(flatten(values)))])

    def artifact(self, path: Path, run_id: str | None = None, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            return
        with self._lock:
            if path.is_dir():
                self.client.log_artifacts(run_id or self.run_id, str(path), artifact_path or path.name)
            else:
                self.client.log_artifact(run_id or self.run_id, str(path), artifact_path)

    def _log(
        self,
        run_id: str,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        steps: Iterable[tuple[int, dict[str, float]]] = (),
    ) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        p = [Param(_KEY_BAD.sub("_", k), str(v)[:6000]) for k, v in (params or {}).items()]
        m = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
        m += [Metric(k, v, now, step) for step, row in steps for k, v in row.items()]
        with self._lock:
            for i in range(0, max(len(p), len(m)), _BATCH):
                self.client.log_batch(run_id, metrics=m[i : i + _BATCH], params=p[i : i + _BATCH], synchronous=True)
