"""MLflow tracking: one parent run per job, one nested run per task, logged live by the driver.

* **Only the driver talks to the store.** A task's nested run is created by the driver when the
  task starts; its workers, on whatever node, report each epoch through Ray Train and the driver
  logs the row as it arrives (:mod:`jobs.epoch_relay`; ``step`` = epoch). No worker needs the
  store's address or credentials. Retries and restarts on another node log into the same run,
  which ends FINISHED with the task's final numbers, or FAILED with the reason as the
  ``supersub.failure`` tag; a task restored finished from another job's Ray state is FINISHED
  with its recorded curve and tagged ``supersub.reused_from``.
* **What a person reads first.** The parent run's metrics are the headline numbers under short
  names (``top1_vanilla``, ``top1_served``, ``delta_served``, ``flops_ratio_served``,
  ``bytes_in_networks``, …) and, grouped under ``models/<name>/``, every model's metrics; every
  setting is a param (the resolved config) and every routing a tag, never a metric.
* **Data.** The manifest is the run's dataset input (name, source, digest = the manifest
  fingerprint, split counts), so runs on different data are told apart.
* **Model.** The bundle is logged as an MLflow pyfunc model (:mod:`jobs.mlflow_model`) and, with
  ``tracking.register_as``, registered (``models:/supersub/N``) with the headline metrics as
  version tags. The report is one self-contained HTML file that MLflow's preview shows whole.

Tracking URI: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite at
``~/.supersub/mlflow.db`` (:func:`supersub.remote.default_tracking_uri`), with artifacts beside it.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supersub.config import dotted_keys, to_dict
from supersub.remote import default_tracking_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_KEY_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")
_BATCH = 100  # MLflow's limit of params (and our chunk of metrics) per log_batch call
HEADLINE_MODELS = {"vanilla": "vanilla", "vanilla_long": "vanilla_long", "ensemble": "ensemble",
                   "delta_all_pooled": "delta_all", "two_stage_hard": "hard", "two_stage_soft": "soft",
                   "two_stage_oracle": "oracle"}


def numeric(data: dict[str, Any]) -> dict[str, float]:
    """The entries of a flat dict that are numbers (lists of numbers become ``key.i``), keys cleaned,
    values to 7 significant digits: float32 arithmetic's noise (54.00000214576721) is not a result."""
    out: dict[str, float] = {}
    for k, v in data.items():
        if isinstance(v, (list, tuple)):
            out.update(numeric({f"{k}.{i}": x for i, x in enumerate(v)}))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[_KEY_BAD.sub("_", k)] = float(v) if isinstance(v, int) else float(f"{v:.7g}")
    return out


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers a person reads first, under short names."""
    models, out = metrics["models"], {}
    for name, short in HEADLINE_MODELS.items():
        if "top1" in models.get(name, {}):
            out[f"top1_{short}"] = models[name]["top1"]
    served = models.get(metrics["serves"]["model"], {})
    out["top1_served"] = served.get("top1", math.nan)
    if served.get("delta_vs_vanilla"):
        out["delta_served"] = served["delta_vs_vanilla"]["delta"]
    for k in ("flops_ratio", "latency_ratio", "bytes_in_networks", "specialist_passes_per_image"):
        if served.get(k) is not None:
            out[f"{k}_served"] = served[k]
    out["superclass_acc_stage1"] = models["stage1"]["superclass_acc"]
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _log(client, run_id: str, *, params=None, metrics=None, steps=(), lock=None) -> None:
    """Params, final metrics (step 0) and per-step rows of a run, batched, timestamped now."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    p = [Param(_KEY_BAD.sub("_", k), str(v)[:6000]) for k, v in (params or {}).items()]
    m = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    m += [Metric(k, v, now, step) for step, row in steps for k, v in row.items()]
    with lock or threading.Lock():
        for i in range(0, max(len(p), len(m)), _BATCH):
            client.log_batch(run_id, metrics=m[i : i + _BATCH], params=p[i : i + _BATCH], synchronous=True)


@dataclass
class MlflowTaskLogger:
    """One task's nested run. Picklable (a Tune trial takes one): it carries the store's URI and
    ids, and opens its own client on first use."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    name: str
    params: dict[str, Any]
    tags: dict[str, str]
    run_id: str | None = None
    _per_epoch: set[str] = field(default_factory=set)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_c"}

    @property
    def client(self):
        if "_c" not in self.__dict__:
            self.__dict__["_c"] = _client(self.tracking_uri)
        return self.__dict__["_c"]

    def started(self) -> None:
        run = self.client.create_run(self.experiment_id, start_time=int(time.time() * 1000), run_name=self.name,
                                     tags={"mlflow.parentRunId": self.parent_run_id, **self.tags})
        self.run_id = run.info.run_id
        _log(self.client, self.run_id, params=self.params)

    def epoch(self, row: dict[str, Any]) -> None:
        values = numeric(row)
        self._per_epoch.update(values)
        _log(self.client, self.run_id, steps=[(int(row.get("epoch", 0)), values)])

    def retrying(self, attempt: int, reason: str) -> None:
        """An attempt failed and the task runs again, into this run (its epochs continue)."""
        self.client.set_tag(self.run_id, "supersub.retries", str(attempt))
        self.client.set_tag(self.run_id, f"supersub.retry_{attempt}_reason", reason[:5000])

    def finished(self, result: dict[str, Any], reused_from: str | None = None) -> None:
        history = result.get("history") or []
        if not self._per_epoch and history:  # nothing came live (restored finished): its recorded curve
            for row in history:
                self.epoch(row)
        final = numeric(dotted_keys({k: v for k, v in result.items() if k != "history"}))
        # A final number named like a per-epoch one (val_acc of the exported delta, mean images/s)
        # gets a prefix: under the same key it would read as one more point of the epoch curve.
        final = {(f"final_{k}" if k in self._per_epoch else k): v for k, v in final.items()}
        _log(self.client, self.run_id, metrics=final)
        if reused_from:
            self.client.set_tag(self.run_id, "supersub.reused_from", reused_from)
        self.client.set_terminated(self.run_id, "FINISHED")

    def failed(self, reason: str) -> None:
        if self.run_id:
            self.client.set_tag(self.run_id, "supersub.failure", reason[:5000])
            self.client.set_terminated(self.run_id, "FAILED")


def runs_page(tracking_uri: str, experiment_id: str) -> str:
    """The page a person opens to see the experiment's runs: the server's runs table (an
    experiment's own page may open on MLflow 3's GenAI overview), or for a SQLite store the
    ``mlflow ui`` command that serves it and the same page there."""
    page = f"#/experiments/{experiment_id}/runs"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    if tracking_uri.startswith("sqlite:"):
        return f"`mlflow ui --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000/{page}"
    return page


class MlflowTracker:
    """A parent run for one job. Use as a context manager: the parent run ends FINISHED, or
    FAILED (with the reason as a tag) when the job raises."""

    def __init__(self, run_name: str, cfg: Any, out: Path, *, job: str = "pipeline") -> None:
        self.cfg = cfg
        self.tracking_uri = default_tracking_uri(cfg.tracking.tracking_uri)
        self.client = _client(self.tracking_uri)
        self._lock = threading.Lock()
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns
                location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        # MLflow 3's UI opens an experiment of this kind on its runs (not the GenAI overview) where
        # it reads the tag; where it follows its own "GenAI / Model training" switch, see README.
        if exp is None or exp.tags.get("mlflow.experimentKind") is None:
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        tags = {"supersub.job": job, "supersub.out_dir": str(out), "supersub.seed": str(cfg.seed)}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        _log(self.client, self.run_id, params=dotted_keys(to_dict(cfg), lists=True), lock=self._lock)

    def where(self) -> str:
        """The job's first tracking line: the run, the store, and the page to open."""
        line = (f"mlflow: run {self.run_id} in {self.tracking_uri} (experiment {self.cfg.tracking.experiment!r}); "
                f"runs: {runs_page(self.tracking_uri, self.experiment_id)}")
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not self.tracking_uri.startswith(("http://", "https://")):
            # A submitted job sees only the environment its runtime env gives it.
            line += ("\nmlflow: this job tracks on the head node's disk; to track on a server, submit with "
                     "--runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://...\"}}' "
                     "or tracking.tracking_uri=http://...")
        return line

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Ctrl-C / SIGTERM (KeyboardInterrupt, supersub.runner.Interrupted): KILLED, not FAILED.
        killed = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        if exc_type is not None:
            tag = "supersub.interrupted" if killed else "supersub.failure"
            self.client.set_tag(self.run_id, tag, f"{exc_type.__name__}: {exc}"[:5000])
        if killed:  # the task runs it stopped (their workers are gone, or never said so) end KILLED too
            self.end_children("KILLED", f"{exc_type.__name__}: {exc}")
        self.client.set_terminated(self.run_id, "KILLED" if killed else "FAILED" if exc_type else "FINISHED")

    def end_children(self, status: str, reason: str) -> None:
        """Ends this job's nested runs that are still RUNNING with ``status``."""
        query = f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000):
            self.client.set_tag(run.info.run_id, "supersub.interrupted", reason[:5000])
            self.client.set_terminated(run.info.run_id, status)

    # ------------------------------------------------------------------ Tracker protocol
    def task_logger(self, task) -> MlflowTaskLogger:
        params = dotted_keys({k: v for k, v in task.to_dict().items() if k not in ("out_dir",)}, lists=True)
        tags = {"supersub.task": task.name, "supersub.kind": task.kind, "supersub.fingerprint": task.fingerprint(),
                "supersub.task_dir": task.out_dir}
        return MlflowTaskLogger(self.tracking_uri, self.experiment_id, self.run_id, task.name, params, tags)

    def summary(self, metrics: dict[str, Any], artifacts: list[Path]) -> None:
        """The parent run's headline metrics, per-model metrics, routings as tags, the dataset,
        the artifacts and the bundle as a (registered) MLflow model."""
        models = {f"models/{name}/{k}": v for name, m in metrics["models"].items()
                  for k, v in numeric(dotted_keys({x: y for x, y in m.items() if x != "routing"})).items()}
        _log(self.client, self.run_id, metrics={**numeric(headline(metrics)), **models}, lock=self._lock)
        for family, routing in metrics["routing"].items():
            self.client.set_tag(self.run_id, f"routing.{family}", routing)
        self.client.set_tag(self.run_id, "routing.served", f"{metrics['serves']['model']} ({metrics['serves']['routing']})")
        self.client.set_tag(self.run_id, "hierarchy", f"{metrics['hierarchy']['name']}: "
                            + ", ".join(f"{n} ({k})" for n, k in zip(metrics["hierarchy"]["superclasses"], metrics["hierarchy"]["sizes"])))
        self.log_dataset(metrics)
        bundle = None
        for path in artifacts:
            path = Path(path)
            if not path.exists():
                continue
            if path.name == "bundle":
                bundle = path
            elif path.name == "report":  # one self-contained page (MLflow's preview shows it whole)
                for name in ("index.html", "report.json"):  # and every number it shows, as the page says
                    if (path / name).is_file():
                        self.client.log_artifact(self.run_id, str(path / name), "report")
            elif path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        if bundle is not None and self.cfg.tracking.log_bundle:
            from jobs.mlflow_model import log_bundle_model

            version = log_bundle_model(self, bundle, headline(metrics))
            if version:
                print(f"mlflow: registered models:/{self.cfg.tracking.register_as}/{version}", flush=True)

    def log_dataset(self, metrics: dict[str, Any]) -> None:
        """The manifest as the run's dataset input (MLflow's Dataset column)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        from supersub.data import load_manifest

        manifest = load_manifest(metrics["manifest_dir"])
        source = manifest.meta.get("source", {})
        name = f"{Path(str(source.get('root') or source.get('kind', 'data'))).name} ({manifest.hierarchy.name})"
        ds = MetaDataset(resolve_dataset_source(str(manifest.path)), name=name, digest=manifest.fingerprint[:16])
        counts = manifest.counts()
        tags = [InputTag("mlflow.data.context", "training"),
                InputTag("splits", ", ".join(f"{k}={v}" for k, v in counts.items()))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags)])

    # ------------------------------------------------------------------ for jobs.tune
    def nested_result(self, name: str, params: dict[str, Any], result: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """A nested run for something that finished elsewhere (a Tune trial): params, per-epoch
        history, final numbers."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id, **(tags or {})})
        history = result.get("history") or []
        steps = [(int(row.get("epoch", i + 1)), numeric(row)) for i, row in enumerate(history)]
        final = numeric(dotted_keys({k: v for k, v in result.items() if k != "history"}))
        _log(self.client, run.info.run_id, params=dotted_keys(params, lists=True), metrics=final, steps=steps, lock=self._lock)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id
