"""Finding a run (folder, study, MLflow) and reading its hierarchy, images and predictions."""


import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supersub.config import ConfigError
from supersub.errors import DataError
from supersub.hierarchy import Hierarchy

FORMAT_VERSION = 1
# Models with a fine prediction per image, in the order the page shows them.
FINE_MODELS = ("vanilla", "vanilla_scaled", "two_stage_hard", "two_stage_soft", "two_stage_oracle")
# The models whose errors are split into within / crossing (oracle routing never crosses).
ERROR_MODELS = ("vanilla", "vanilla_scaled", "two_stage_hard", "two_stage_soft")
METRIC_KEYS = ("top1", "top5", "superclass_acc", "stage1_superclass_acc", "crossing_error_share",
               "mistake_severity", "mean_lca_height", "specialist_passes_per_image", "images")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
CHECKED_KEYS = ("top1", "superclass_acc", "crossing_error_share", "mistake_severity")


@dataclass
class RunSource:
    """What one report section is built from: a run's metrics and the folder holding its files."""

    name: str
    metrics: dict[str, Any]
    folder: Path | None  # predictions.parquet, bundle/, tune/ (local, or downloaded from MLflow)
    mlflow_run_id: str | None = None


# ----------------------------------------------------------------------------- finding the run
def resolve_run(run: str, variant: str | None, scratch: Path, tracking_uri: str | None = None
                ) -> tuple[str, list[RunSource]]:
    """``(kind, sources)``: kind is ``run``, ``study`` or ``mlflow``; one source per section."""
    path = Path(run)
    if path.is_dir():
        if (path / "study.json").is_file() and not (path / "metrics.json").is_file():
            return "study", _study_sources(path, variant)
        if variant:
            raise ConfigError(f"--variant {variant}: {path} is not a study folder (no study.json)")
        if not (path / "metrics.json").is_file():
            raise DataError(f"{path}: not a pipeline output (no metrics.json) nor a study folder (no study.json)")
        metrics = read_json(path / "metrics.json")
        return "run", [RunSource(str(metrics.get("name") or path.name), metrics, path)]
    if run.startswith("runs:/") or _RUN_ID.fullmatch(run):
        return "mlflow", [_mlflow_source(run, scratch, tracking_uri)]
    raise DataError(f"--run {run}: no such folder, and not an MLflow run (runs:/<id> or a run id)")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from e


def _study_sources(study: Path, variant: str | None) -> list[RunSource]:
    results = read_json(study / "study.json").get("results") or {}
    if variant is not None and variant not in results:
        raise ConfigError(f"--variant {variant}: the study has {sorted(results) or 'no variants'}")
    sources = []
    for name, metrics in results.items():
        if variant is not None and name != variant:
            continue
        folder = study / name
        # The variant's own metrics.json, when there, is the one written with its predictions.
        if (folder / "metrics.json").is_file():
            metrics = read_json(folder / "metrics.json")
        sources.append(RunSource(name, metrics, folder if folder.is_dir() else None))
    if not sources:
        raise DataError(f"{study / 'study.json'}: no finished variant")
    return sources


def tracking_uri_or_default(uri: str | None) -> str:
    """The MLflow store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the jobs' default SQLite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(Path("~/.supersub/mlflow.db").expanduser())


def _mlflow_source(run: str, scratch: Path, tracking_uri: str | None) -> RunSource:
    # mlflow only on this path: the core never needs it otherwise.
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    run_id, _, sub = run.removeprefix("runs:/").strip("/").partition("/")
    uri = tracking_uri_or_default(tracking_uri)
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
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{sub}/{name}" if sub else name,
                                                dst_path=str(folder), tracking_uri=uri)
    folder = folder / sub if sub else folder
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
    if src.folder:  # older metrics.json had no manifest_dir: where the pipeline and a study put it
        candidates += [src.folder / "data", src.folder.parent / "shared" / "data_learned",
                       src.folder.parent / "shared" / "data"]
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
    large photos shrunk, so a gallery stays a few hundred kB."""
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


