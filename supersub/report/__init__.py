"""``supersub report``: ONE self-contained HTML page of a run's models and misclassification patterns.

    supersub report --run runs/default --out report/ [--model two_stage_soft] [--gallery 48]
    supersub report --run runs/study --out report/ [--variant ours]
    supersub report --run runs:/<mlflow run id> --out report/ [--mlflow-log]

``--run`` is a pipeline output folder (``metrics.json``, ``predictions.parquet``, ``bundle/``), a
study folder (``study.json``: the study table over all seeds at the top, then one section per
variant built from its lowest seed's run folder, or only ``--variant NAME``), or an MLflow run
(``runs:/<id>`` or a bare run id) whose artifacts are downloaded. ``--out`` receives
``index.html`` (every figure and gallery image inlined as a data URI: the file alone is the whole
page, as MLflow's artifact preview shows it), ``report.json`` (every number the page shows; a
page element's ``data-key`` is its path there) and the PNGs, for whoever wants them as files.

A section shows every model ``metrics.json`` has, in :data:`supersub.study.ORDER`: its top-1
with the difference to vanilla and its 95 % interval, and what it costs (stored bytes, training
images, FLOPs, latency, routing). The numbers the pipeline measured come from ``metrics.json`` as
written. What it lacks (confusion matrices, error counts, LCA heights, galleries) is recomputed
from ``predictions.parquet`` with :mod:`supersub.metrics`, which also checks that the two files
agree. Confusions and galleries are those of ``--model`` (default: the model the bundle serves).
Images for the galleries come from the manifest the run recorded; when it is not on this
machine the galleries are left out with a note.
"""


from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from supersub import atomic
from supersub.config import ConfigError
from supersub.report.html import render_html
from supersub.report.inputs import resolve_run
from supersub.report.sections import Section, clean, read_tune

# 2: models from metrics.json (not a fixed list), costs and intervals, study rows, one inlined page.
FORMAT_VERSION = 2
__all__ = ["read_tune", "register", "write_report"]


def _slug(name: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "run"
    while slug in taken:
        slug += "_"
    taken.add(slug)
    return slug


def write_report(run: str, out: str | Path, *, model: str | None = None, gallery: int = 48, per_pair: int = 4,
                 variant: str | None = None, tune: str | Path | None = None, tracking_uri: str | None = None
                 ) -> dict[str, Any]:
    """Writes ``out/index.html`` (self-contained), ``out/report.json`` and the PNGs; returns the
    report's data. ``model`` None: each section's served model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="supersub-report-") as scratch:
        kind, sources, study = resolve_run(run, variant, Path(scratch), tracking_uri)
        many, taken = kind == "study" and variant is None, set()
        sections = [Section(src, out, _slug(src.name, taken) if many else "", model)
                    .build(gallery, per_pair, Path(tune) if tune else None) for src in sources]
    report = clean({"format_version": FORMAT_VERSION, "run": run, "kind": kind, "model": model,
                    "title": sources[0].name if len(sources) == 1 else Path(run).name, "study": study,
                    "sections": sections, "mlflow_run_id": sources[0].mlflow_run_id})
    atomic.write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False))
    atomic.write_text(out / "index.html", render_html(report, out))  # UTF-8
    return report


def log_to_mlflow(out: Path, run_id: str, tracking_uri: str | None = None) -> None:
    """Logs the page and report.json as the ``report/`` artifacts of an MLflow run (the page is
    self-contained: its PNGs are not needed there)."""
    from mlflow.tracking import MlflowClient

    from supersub.remote import default_tracking_uri

    client = MlflowClient(default_tracking_uri(tracking_uri))
    for name in ("index.html", "report.json"):
        client.log_artifact(run_id, str(out / name), "report")


def _run(args: argparse.Namespace) -> int:
    report = write_report(args.run, args.out, model=args.model, gallery=args.gallery, per_pair=args.per_pair,
                          variant=args.variant, tune=args.tune, tracking_uri=args.tracking_uri)
    figures = sum(len(s["figures"]) for s in report["sections"])
    images = sum(len(g["images"]) for s in report["sections"] for g in s.get("gallery", []))
    print(f"wrote {Path(args.out) / 'index.html'}: {len(report['sections'])} section(s), {figures} figures, "
          f"{images} gallery images")
    if args.mlflow_log:
        run_id = os.environ.get("MLFLOW_RUN_ID") or report["mlflow_run_id"]
        if not run_id:
            raise ConfigError("--mlflow-log needs an MLflow RUN or the MLFLOW_RUN_ID environment variable")
        log_to_mlflow(Path(args.out), run_id, args.tracking_uri)
        print(f"logged {Path(args.out) / 'index.html'} and report.json as artifacts report/ of MLflow run {run_id}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="static HTML report of a run's misclassification patterns",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="RUN", help="pipeline output folder, study folder, runs:/<id> or an MLflow run id")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (index.html, self-contained; report.json; the PNGs)")
    p.add_argument("--model", metavar="MODEL", help="the model whose confusions and misclassified images are shown: "
                   "any model of metrics.json with a top-1 (default: the model the bundle serves)")
    p.add_argument("--gallery", type=int, default=48, metavar="N", help="misclassified images per section (0: none)")
    p.add_argument("--per-pair", type=int, default=4, metavar="K", help="at most K images per confused pair")
    p.add_argument("--variant", help="a study's variant (default: one section per variant)")
    p.add_argument("--tune", help="a tune output folder or its pareto.json (default: RUN/tune/pareto.json)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ~/.supersub/mlflow.db)")
    p.add_argument("--mlflow-log", action="store_true",
                   help="log index.html and report.json as artifacts report/ of $MLFLOW_RUN_ID, else of the MLflow "
                   "RUN itself")
    p.set_defaults(func=_run)
