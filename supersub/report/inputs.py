"""Finding a run (folder, study, MLflow) and reading its models, hierarchy, images and predictions.

A pipeline run folder holds ``metrics.json``, ``predictions.parquet``, ``bundle/manifest.json`` and
``config.yaml``. A study folder holds ``study.json`` = ``{study, config, results: {variant: {seed:
{dir, metrics}}}, rows}``; each variant is reported from its lowest seed's run folder, and ``rows``
(:func:`supersub.study.summarise`) is the study table over all seeds. An MLflow run's artifacts
are downloaded into a scratch folder that then reads as a run folder.

Which models a section shows is read from ``metrics["models"]``: those with a top-1, in
:data:`supersub.study.ORDER` (models the order does not know after it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supersub.config import ConfigError
from supersub.errors import DataError
from supersub.hierarchy import Hierarchy
from supersub.study import ORDER

# What report.json keeps of each model's metrics.json entry (the rest is the pipeline's own).
METRIC_KEYS = ("top1", "top5", "superclass_acc", "stage1_superclass_acc", "crossing_error_share",
               "crossing_error_chance", "mistake_severity", "mean_lca_height", "images", "delta_vs_vanilla",
               "bytes_in_networks", "train_images", "flops_per_image", "flops_ratio", "latency_ratio", "routing",
               "specialist_passes_per_image")
# Recomputed from predictions.parquet and compared with metrics.json.
CHECKED_KEYS = ("top1", "superclass_acc", "crossing_error_share", "mistake_severity")
ORACLE = "two_stage_oracle"  # routed by the true superclass: never crosses, so left out of error splits
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def fine_models(models: dict[str, Any]) -> list[str]:
    """The models with a fine prediction (a ``top1``), in :data:`supersub.study.ORDER`."""
    have = [k for k, v in models.items() if "top1" in v]
    return [k for k in ORDER if k in have] + [k for k in have if k not in ORDER]


def error_models(models: dict[str, Any]) -> list[str]:
    """The fine models whose errors are split into within / crossing (all but oracle routing)."""
    return [k for k in fine_models(models) if k != ORACLE]


def ordered(models: dict[str, Any]) -> list[str]:
    """Every model: the fine ones in order, then the superclass-only ones (stage1, generalist)."""
    fine = fine_models(models)
    return fine + [k for k in models if k not in fine]


@dataclass
class RunSource:
    """What one report section is built from: a run's metrics and the folder holding its files."""

    name: str
    metrics: dict[str, Any]
    folder: Path | None  # predictions.parquet, bundle/, tune/ (local, or downloaded from MLflow)
    mlflow_run_id: str | None = None
    seed: str | None = None  # a study variant's: the seed its section shows
    seeds: list[str] | None = None  # ... of the seeds the study finished


# ----------------------------------------------------------------------------- finding the run
def resolve_run(run: str, variant: str | None, scratch: Path, tracking_uri: str | None = None
                ) -> tuple[str, list[RunSource], dict[str, Any] | None]:
    """``(kind, sources, study)``: kind is ``run``, ``study`` or ``mlflow``; one source per
    section; ``study`` (for a study folder) is ``{"file", "rows"}``, the rows of the variants shown."""
    path = Path(run)
    if path.is_dir():
        if (path / "study.json").is_file() and not (path / "metrics.json").is_file():
            return ("study", *_study_sources(path, variant))
        if variant:
            raise ConfigError(f"--variant {variant}: {path} is not a study folder (no study.json)")
        if not (path / "metrics.json").is_file():
            raise DataError(f"{path}: not a pipeline output (no metrics.json) nor a study folder (no study.json)")
        metrics = read_json(path / "metrics.json")
        return "run", [RunSource(str(metrics.get("name") or path.name), metrics, path)], None
    if run.startswith("runs:/") or _RUN_ID.fullmatch(run):
        return "mlflow", [_mlflow_source(run, scratch, tracking_uri)], None
    raise DataError(f"--run {run}: no such folder, and not an MLflow run (runs:/<id> or a run id)")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from e


def _study_sources(study: Path, variant: str | None) -> tuple[list[RunSource], dict[str, Any]]:
    """One source per variant, from its lowest seed; the study table's rows of those variants."""
    doc = read_json(study / "study.json")
    results = doc.get("results") or {}
    if variant is not None and variant not in results:
        raise ConfigError(f"--variant {variant}: the study has {sorted(results) or 'no variants'}")
    sources = []
    for name, by_seed in results.items():
        if variant is not None and name != variant:
            continue
        if not isinstance(by_seed, dict) or "models" in by_seed or \
                not all(isinstance(r, dict) and "metrics" in r for r in by_seed.values()):
            raise DataError(f"{study / 'study.json'}: results[{name!r}] is not {{seed: {{dir, metrics}}}} "
                            "(written by an older jobs.study)")
        if not by_seed:
            continue
        seeds = sorted(by_seed, key=int)
        entry = by_seed[seeds[0]]
        # The study folder may have moved since: its own <variant>/seed<k> first, then the recorded dir.
        folder = next((f for f in (study / name / f"seed{seeds[0]}", Path(entry.get("dir") or study / name))
                       if f.is_dir()), None)
        metrics = read_json(folder / "metrics.json") if folder and (folder / "metrics.json").is_file() \
            else entry["metrics"]
        sources.append(RunSource(name, metrics, folder, seed=seeds[0], seeds=seeds))
    if not sources:
        raise DataError(f"{study / 'study.json'}: no finished variant")
    rows = doc.get("rows")
    if rows is None:  # a study still running: the table from the finished seeds
        from supersub.study import summarise

        rows = summarise(results)
    names = {s.name for s in sources}
    return sources, {"file": str(study / "study.json"), "rows": [r for r in rows if r.get("variant") in names]}


def _mlflow_source(run: str, scratch: Path, tracking_uri: str | None) -> RunSource:
    # mlflow (and the bundle code remote imports) only on this path: the report never needs them otherwise.
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from supersub.remote import default_tracking_uri

    run_id, _, sub = run.removeprefix("runs:/").strip("/").partition("/")
    uri = default_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        names = {Path(a.path).name for a in client.list_artifacts(run_id, sub or None)}
    except Exception as e:  # noqa: BLE001 - MLflow raises its own types for unknown runs and stores
        raise DataError(f"MLflow run {run_id} in {uri}: {e}") from e
    if "metrics.json" not in names:
        raise DataError(f"MLflow run {run_id} has no {sub + '/' if sub else ''}metrics.json artifact")
    folder = scratch / "mlflow" / run_id
    for name in ("metrics.json", "predictions.parquet", "hierarchy.json", "config.yaml", "bundle/manifest.json"):
        if name.split("/")[0] in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{sub}/{name}" if sub else name,
                                                      dst_path=str((folder / name).parent), tracking_uri=uri)
            if Path(got) != folder / name:  # a single file lands by its base name: put it where a run has it
                shutil.move(got, folder / name)
    metrics = read_json(folder / "metrics.json")
    return RunSource(str(metrics.get("name") or run_id), metrics, folder, run_id)


# ----------------------------------------------------------------------------- hierarchy, images, predictions
def find_data(src: RunSource, notes: list[str]) -> tuple[Hierarchy, Any]:
    """The run's hierarchy and, when it is on this machine, its manifest (for images)."""
    from supersub.data import load_manifest

    m = src.metrics
    expected = None  # the hierarchy the run itself recorded, to recognise the right manifest
    for f in ("bundle/manifest.json", "hierarchy.json"):
        if src.folder and (src.folder / f).is_file():
            data = read_json(src.folder / f)
            expected = Hierarchy.from_dict(data.get("hierarchy", data))
            break
    candidates = [m.get("manifest_dir")]
    if src.folder:  # where the pipeline and a study put it, should the recorded path be gone
        candidates += [src.folder / "data", *sorted(src.folder.parent.glob("shared/data*")),
                       *sorted(src.folder.parent.parent.glob("shared/data*"))]
    for c in candidates:
        if c and (Path(c) / "manifest.parquet").is_file():
            man = load_manifest(c)
            if expected is None and _names_match(man.hierarchy, m) or man.hierarchy == expected:
                return man.hierarchy, man
    if expected is not None:
        notes.append("the run's image manifest is not on this machine: galleries are left out")
        return expected, None
    notes.append("neither the manifest nor the bundle's hierarchy was found: class names are placeholders")
    return _placeholder_hierarchy(m), None


def _names_match(h: Hierarchy, metrics: dict[str, Any]) -> bool:
    info = metrics.get("hierarchy", {})
    return [s.name for s in h.superclasses] == info.get("superclasses") and \
        [len(s.subclasses) for s in h.superclasses] == info.get("sizes")


def _placeholder_hierarchy(metrics: dict[str, Any]) -> Hierarchy:
    from supersub.hierarchy.core import Subclass, Superclass

    info = metrics["hierarchy"]
    return Hierarchy(info.get("name", "unknown"), tuple(
        Superclass(f"s{i}", name, tuple(Subclass(f"s{i}c{j}", f"{name} #{j}") for j in range(size)))
        for i, (name, size) in enumerate(zip(info["superclasses"], info["sizes"]))))


def load_predictions(path: Path) -> dict[str, Any]:
    """``predictions.parquet``: ``uri`` (list), ``label`` ``[N]``, and per model ``pred``, ``prob``
    (of the prediction) and ``true_prob`` (of the true class)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    cols = set(t.column_names)
    models = [c[5:] for c in t.column_names if c.startswith("pred_")]
    return {
        "uri": t.column("uri").to_pylist(),
        "label": t.column("label").to_numpy().astype(np.int64),
        "pred": {n: t.column(f"pred_{n}").to_numpy().astype(np.int64) for n in models},
        "prob": {n: t.column(f"prob_{n}").to_numpy() if f"prob_{n}" in cols else None for n in models},
        "true_prob": {n: t.column(f"true_prob_{n}").to_numpy() if f"true_prob_{n}" in cols else None for n in models},
    }


def thumbnail(image: Any, path: Path) -> None:
    """Small images (32 px synthetic, 64 px Tiny-ImageNet) are enlarged with visible pixels;
    large photos shrunk, so a gallery stays a few hundred kB (it is inlined into the page)."""
    from PIL import Image

    image = image.convert("RGB")
    side = max(image.size)
    if side < 96:
        k = math.ceil(96 / side)
        image = image.resize((image.width * k, image.height * k), Image.NEAREST)
    elif side > 160:
        image.thumbnail((160, 160))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
