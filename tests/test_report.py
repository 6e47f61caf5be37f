"""``supersub report``: the page's numbers against the metrics it was built from.

The fast tests build a pipeline output by hand (a synthetic manifest whose class names need
HTML escaping, seeded predictions of five models, metrics.json computed from them by the
pipeline's own metric functions); the slow ones report on a real tiny pipeline run and on an
MLflow run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from supersub.cli import main as cli_main
from supersub.config import ConfigError
from supersub.data import build_manifest, load_manifest, synthetic_hierarchy
from supersub.errors import DataError
from supersub.evaluation import save_predictions
from supersub.hierarchy import Hierarchy
from supersub.hierarchy.core import Subclass, Superclass
from supersub.metrics import (
    classification_metrics,
    confusion,
    most_confused_pairs,
    per_superclass_accuracy,
    within_superclass_accuracy,
)
from supersub.report import read_tune, write_report

REPO = Path(__file__).resolve().parents[1]
# Names that break a page unless escaped: tags, an attribute-ending quote, an ampersand.
EVIL_SUPER = '<script>alert("s{}")</script> & co'
EVIL_SUB = "c{}{} <img src=x onerror='y'> $^$"
# How a model's predictions are drawn: logits N(0, 1) plus this much on the true class.
STRENGTH = {"vanilla": 1.5, "vanilla_scaled": 1.8, "two_stage_hard": 2.0, "two_stage_soft": 2.2, "two_stage_oracle": 3.0}
CELL = re.compile(r'<(?:td|b) class="n" data-key="([^"]+)" data-fmt="([^"]+)">([^<]*)<|'
                  r'<b data-key="([^"]+)" data-fmt="([^"]+)">([^<]*)<')


def _evil_hierarchy() -> Hierarchy:
    base = synthetic_hierarchy(3, 4)
    return Hierarchy("evil <h>", tuple(
        Superclass(s.id, EVIL_SUPER.format(i), tuple(Subclass(c.id, EVIL_SUB.format(i, j)) for j, c in enumerate(s.subclasses)))
        for i, s in enumerate(base.superclasses)))


def _write_fake_run(root: Path) -> Path:
    """A pipeline output folder written directly: known content, no training."""
    h = _evil_hierarchy()
    build_manifest("synthetic:superclasses=3,subclasses=4,per_class=30,size=16", h, root / "data",
                   val_fraction=0.2, test_fraction=0.4, num_workers=0, progress=False)
    man = load_manifest(root / "data")
    rows = man.indices("test")
    labels = torch.from_numpy(man.subclass[rows]).long()
    gen = torch.Generator().manual_seed(0)
    probs = {}
    for name, strength in STRENGTH.items():
        logits = torch.randn(len(labels), h.num_subclasses, generator=gen)
        logits[torch.arange(len(labels)), labels] += strength
        probs[name] = logits.softmax(1)
    save_predictions(_mk(root / "run") / "predictions.parquet", [man.uris[i] for i in rows], labels, probs, h)
    models = {n: classification_metrics(p, labels, h) for n, p in probs.items()}
    models["stage1"] = {"superclass_acc": 91.5}
    per_super = {n: per_superclass_accuracy(p, labels, h) for n, p in probs.items()}
    per_super |= {f"{n}_within": within_superclass_accuracy(probs[n], labels, h) for n in ("vanilla", "vanilla_scaled")}
    net = 1_000_000
    per_spec = {s.id: 40_000 + 1_000 * i for i, s in enumerate(h.superclasses)}
    metrics = {
        "name": "fake <run>", "test_split": "test", "manifest_dir": str(root / "data"), "stages_dir": str(root),
        "hierarchy": {"name": h.name, "superclasses": [s.name for s in h.superclasses], "sizes": [4, 4, 4]},
        "models": models,
        "routing": {"hard": {"mode": "hard", "k": 1, "threshold": 1.0, "resident_weight": 0.5, "calibrate": False},
                    "soft": {"mode": "soft", "k": 2, "threshold": 0.8, "resident_weight": 0.5, "calibrate": False}},
        "per_superclass": per_super,
        "bytes": {"network": net, "base_file": net + 1000, "per_specialist": per_spec,
                  "specialists_total": sum(per_spec.values()),
                  "mean_specialist_ratio": sum(per_spec.values()) / len(per_spec) / net,
                  "total_in_networks": 1 + sum(per_spec.values()) / net, "baselines": {"vanilla_scaled": 1_560_000}},
        "specialists": [{"superclass": i, "val_acc": 40.0 + i, "delta_bytes": b, "delta_ratio": b / net,
                         "delta_density": 0.05, "wall_seconds": 1.0} for i, b in enumerate(per_spec.values())],
        "timings": {},
    }
    (root / "run" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # The tune job's pareto.json (jobs/tune.py `summarise`): one trial stopped early.
    trials = [{"trial_id": f"t{i}", "status": "completed", "params": {"delta.keep": k, "delta.bits": b},
               "val_acc": acc, "iterations": 3, "delta_bytes": r * net, "delta_ratio": r, "delta_density": k}
              for i, (k, b, acc, r) in enumerate([(0.02, 2, 30.0, 0.01), (0.05, 4, 35.0, 0.03), (0.1, 8, 34.0, 0.08),
                                                  (0.1, 4, 38.0, 0.06)])]
    trials.append({"trial_id": "t9", "status": "stopped early", "params": {"delta.keep": 0.5}, "val_acc": 1.0})
    _mk(root / "run" / "tune")
    (root / "run" / "tune" / "pareto.json").write_text(json.dumps(
        {"budget": 0.05, "trials": trials, "front": ["t0", "t1", "t3"], "best": trials[1]}))
    return root / "run"


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_fake_run(tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="session")
def fake_report(fake_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    return out, write_report(str(fake_run), out, gallery=10, per_pair=3)


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _printed(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cells(page: str) -> list[tuple[str, str, str]]:
    return [(m[0] or m[3], m[1] or m[4], m[2] or m[5]) for m in CELL.findall(page)]


# ----------------------------------------------------------------------------- the numbers
def test_printed_numbers_are_the_metrics(fake_run: Path, fake_report: tuple[Path, dict[str, Any]]) -> None:
    out, report = fake_report
    page = (out / "index.html").read_text()
    assert json.loads((out / "report.json").read_text()) == report
    metrics = json.loads((fake_run / "metrics.json").read_text())
    cells = _cells(page)
    assert len(cells) > 100
    for key, spec, text in cells:  # every printed number is report.json's, at the printed precision
        assert text == _printed(_lookup(report, key), spec), key
    keys = {k for k, _, _ in cells}
    sec = report["sections"][0]
    for name, m in metrics["models"].items():  # ... and report.json's are metrics.json's
        for metric in ("top1", "top5", "superclass_acc", "crossing_error_share", "mistake_severity"):
            if metric in m:
                assert f"sections.0.models.{name}.{metric}" in keys
                assert sec["models"][name][metric] == m[metric]
    b = metrics["bytes"]
    assert {"sections.0.storage.mean_ratio", "sections.0.storage.total_networks"} <= keys
    assert sec["storage"]["mean_ratio"] == b["mean_specialist_ratio"]
    assert sec["storage"]["total_networks"] == b["total_in_networks"]
    assert [p["bytes"] for p in sec["storage"]["per_specialist"]] == list(b["per_specialist"].values())
    assert {p["model"]: p["networks"] for p in sec["storage"]["points"]} == pytest.approx(
        {"vanilla": 1.0, "vanilla_scaled": 1.56, "two_stage_hard": b["total_in_networks"],
         "two_stage_soft": b["total_in_networks"]})
    for j, row in enumerate(sec["per_superclass"]):
        assert f"sections.0.per_superclass.{j}.specialist" in keys
        assert row["vanilla"] == metrics["per_superclass"]["vanilla"][j]
        assert row["vanilla_within"] == metrics["per_superclass"]["vanilla_within"][j]
        assert row["specialist"] == metrics["per_superclass"]["two_stage_oracle"][j]
        assert row["two_stage"] == metrics["per_superclass"]["two_stage_soft"][j]
    assert sec["notes"] == []  # predictions.parquet and metrics.json agree, the manifest was found


def test_confusions_and_error_counts_match_predictions(fake_run: Path, fake_report: tuple[Path, dict[str, Any]]) -> None:
    _, report = fake_report
    sec = report["sections"][0]
    t = pq.read_table(fake_run / "predictions.parquet").to_pydict()
    h = load_manifest(fake_run.parent / "data").hierarchy
    coarse = torch.tensor(h.fine_to_coarse)
    labels = torch.tensor(t["label"]).long()
    metrics = json.loads((fake_run / "metrics.json").read_text())
    for name in ("vanilla", "two_stage_soft"):
        pred = torch.tensor(t[f"pred_{name}"]).long()
        sup = confusion(coarse[pred], coarse[labels], h.num_superclasses)
        assert sec["confusion"]["superclass"][name] == sup.tolist()
        fine = confusion(pred, labels, h.num_subclasses)
        for block in sec["confusion"]["within"]:
            members = h.coarse_to_fine[block["superclass"]]
            counts = np.array(block["counts"][name])
            assert (counts[:, :-1] == fine[np.ix_(members, members)]).all()
            assert (counts.sum(1) == fine[members].sum(1)).all()  # the last column: errors that left
        errors = int((pred != labels).sum())
        crossing = int(((pred != labels) & (coarse[pred] != coarse[labels])).sum())
        assert sec["errors"][name] == pytest.approx({"errors": errors, "within": errors - crossing, "crossing": crossing,
                                                     "crossing_share": metrics["models"][name]["crossing_error_share"]})
        assert crossing > 0 and errors - crossing > 0  # the fixture exercises both kinds
    assert set(sec["errors"]) == {"vanilla", "vanilla_scaled", "two_stage_hard", "two_stage_soft"}
    fine = confusion(torch.tensor(t["pred_two_stage_soft"]), labels, h.num_subclasses)
    assert [(p["true"], p["pred"], p["count"]) for p in sec["pairs"]] == most_confused_pairs(fine, top=20)


def test_gallery_holds_misclassified_images_most_confused_pairs_first(
    fake_run: Path, fake_report: tuple[Path, dict[str, Any]]
) -> None:
    out, report = fake_report
    sec = report["sections"][0]
    t = pq.read_table(fake_run / "predictions.parquet").to_pydict()
    labels, pred, prob = t["label"], t["pred_two_stage_soft"], t["prob_two_stage_soft"]
    fine = confusion(torch.tensor(pred), torch.tensor(labels), 12)
    pairs = most_confused_pairs(fine, top=100)
    groups = sec["gallery"]
    assert [(g["true"], g["pred"], g["count"]) for g in groups] == pairs[: len(groups)]
    assert sum(len(g["images"]) for g in groups) == 10 and all(1 <= len(g["images"]) <= 3 for g in groups)
    page = (out / "index.html").read_text()
    for g in groups:
        probs = [im["prob"] for im in g["images"]]
        assert probs == sorted(probs, reverse=True)  # the most confident mistakes first
        for im in g["images"]:
            row = im["row"]
            assert t["uri"][row] == im["uri"] and labels[row] == g["true"] != pred[row] == g["pred"]
            assert im["prob"] == pytest.approx(prob[row])
            with Image.open(out / im["file"]) as img:
                assert img.format == "PNG" and min(img.size) >= 96
            assert f'src="{im["file"]}"' in page


def test_every_image_is_a_real_png(fake_report: tuple[Path, dict[str, Any]]) -> None:
    out, report = fake_report
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    figures = report["sections"][0]["figures"]
    assert set(figures) >= {"models", "errors", "confusion_superclass", "confusion_000", "per_superclass", "bytes",
                            "accuracy_vs_bytes", "pareto", "severity"}
    assert set(figures.values()) <= set(sources)
    for src in sources:
        path = out / src
        assert path.resolve().is_relative_to(out.resolve()) and path.is_file(), src
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG"
    for src in figures.values():
        with Image.open(out / src) as img:  # a drawn figure, not an empty canvas
            assert min(img.size) > 200 and len(set(img.convert("L").getdata())) > 16
        assert (out / src).stat().st_size > 5_000
    assert "http" not in " ".join(sources) and "<script" not in page


def test_class_names_are_escaped(fake_report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = fake_report
    page = (out / "index.html").read_text()
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;s0&quot;)&lt;/script&gt; &amp; co" in page
    assert "c01 &lt;img src=x onerror=&#x27;y&#x27;&gt;" in page
    assert "fake &lt;run&gt;" in page


def test_pareto_from_the_tune_job(fake_report: tuple[Path, dict[str, Any]]) -> None:
    _, report = fake_report
    tune = report["sections"][0]["pareto"]
    assert [t["trial_id"] for t in tune["trials"]] == ["t0", "t1", "t2", "t3"]  # the stopped trial is left out
    assert tune["front"] == ["t0", "t1", "t3"] and tune["best"] == "t1" and tune["budget"] == 0.05
    assert tune["run_point"] == pytest.approx({"val_acc": 41.0, "delta_ratio": 0.041})


def test_read_tune_accepts_plain_records(tmp_path: Path) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"delta.keep": 0.1, "val_acc": 30, "delta_bytes": 20_000},
                                {"delta.keep": 0.2, "val_acc": 25, "delta_ratio": 0.05},
                                {"delta.keep": 0.3, "val_acc": 40, "delta_ratio": 0.09},
                                {"delta.keep": 0.4, "val_acc": None}]))
    tune = read_tune(path, network_bytes=1_000_000)
    assert [t["delta_ratio"] for t in tune["trials"]] == [0.02, 0.05, 0.09]
    assert tune["trials"][0]["params"] == {"delta.keep": 0.1}
    assert tune["front"] == ["0", "2"]  # trial 1 is both bigger and worse than trial 0
    path.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(DataError, match="list of trials"):
        read_tune(path, None)


# ----------------------------------------------------------------------------- study, CLI, errors
def test_study_folder_one_section_per_variant(fake_run: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    metrics = json.loads((fake_run / "metrics.json").read_text())
    for name in ("a", "b <x>"):
        _mk(study / name)
        shutil.copy(fake_run / "predictions.parquet", study / name)
    (study / "study.json").write_text(json.dumps({"study": "s.yaml", "results": {"a": metrics, "b <x>": metrics}}))
    report = write_report(str(study), tmp_path / "out", gallery=4)
    assert report["kind"] == "study" and [s["name"] for s in report["sections"]] == ["a", "b <x>"]
    assert [s["slug"] for s in report["sections"]] == ["a", "b__x_"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<h2>Variants</h2>" in page and 'href="#b__x_"' in page and "b &lt;x&gt;" in page
    for s in report["sections"]:
        assert all(f.startswith(s["slug"] + "/") and (tmp_path / "out" / f).is_file() for f in s["figures"].values())
    one = write_report(str(study), tmp_path / "one", variant="b <x>", gallery=0)
    assert [s["name"] for s in one["sections"]] == ["b <x>"] and (tmp_path / "one" / "models.png").is_file()
    assert one["sections"][0]["gallery"] == []
    with pytest.raises(ConfigError, match="the study has"):
        write_report(str(study), tmp_path / "bad", variant="nope")


def test_cli_writes_the_report(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", "--run", str(fake_run), "--out", str(tmp_path), "--model", "vanilla",
                     "--gallery", "3", "--tune", str(fake_run / "tune" / "pareto.json")]) == 0
    assert "index.html" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "vanilla" and report["sections"][0]["confusion"]["models"] == ["vanilla"]
    assert sum(len(g["images"]) for g in report["sections"][0]["gallery"]) == 3


def test_clean_errors(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = _mk(tmp_path / "empty")
    assert cli_main(["report", "--run", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert cli_main(["report", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli_main(["report", "--run", str(fake_run), "--out", str(tmp_path / "o"), "--variant", "x"]) == 2
    assert "not a study folder" in capsys.readouterr().err
    run = _mk(tmp_path / "run")
    metrics = json.loads((fake_run / "metrics.json").read_text())
    del metrics["models"]["vanilla_scaled"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert cli_main(["report", "--run", str(run), "--out", str(tmp_path / "o"), "--model", "vanilla_scaled"]) == 2
    assert "--model vanilla_scaled" in capsys.readouterr().err
    (run / "metrics.json").write_text("{not json")
    assert cli_main(["report", "--run", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "not readable JSON" in capsys.readouterr().err


def test_without_predictions_or_images_the_report_says_what_is_missing(fake_run: Path, tmp_path: Path) -> None:
    run = _mk(tmp_path / "run")
    metrics = json.loads((fake_run / "metrics.json").read_text())
    metrics["manifest_dir"] = str(tmp_path / "gone")
    (run / "metrics.json").write_text(json.dumps(metrics))
    report = write_report(str(run), tmp_path / "a")
    sec = report["sections"][0]
    assert "errors" not in sec and "gallery" not in sec and any("predictions.parquet" in n for n in sec["notes"])
    assert any("placeholders" in n for n in sec["notes"])  # no manifest, no bundle: names from metrics.json
    assert sec["hierarchy"]["superclasses"] == metrics["hierarchy"]["superclasses"]
    shutil.copy(fake_run / "predictions.parquet", run)
    sec = write_report(str(run), tmp_path / "b")["sections"][0]
    assert sec["gallery"] == [] and sec["errors"]["vanilla"]["errors"] > 0
    page = (tmp_path / "a" / "index.html").read_text()
    assert "no predictions.parquet" in page
    share = metrics["models"]["vanilla"]["crossing_error_share"]  # still shown, from metrics.json
    assert f'data-key="sections.0.models.vanilla.crossing_error_share" data-fmt=".1f">{share:.1f}<' in page


def test_report_module_imports_no_heavy_frameworks() -> None:
    code = ("import sys, supersub.report, supersub.plots, supersub.cli; supersub.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from supersub.config import load_config
    from supersub.pipeline import PipelineConfig, run_pipeline

    out = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(PipelineConfig, REPO / "jobs" / "configs" / "default.yaml", [
        "resources.runner=local", "tracking.enabled=false", "train.epochs=1", "specialist.optim.epochs=1",
        "baselines.scaled=true", "data.source=synthetic:superclasses=3,subclasses=3,per_class=40,size=16",
        "data.image_size=16", "data.num_workers=0"])
    run_pipeline(cfg, out, log=lambda s: None)
    return out


@pytest.mark.slow
def test_report_of_a_real_pipeline_run(pipeline_run: Path, tmp_path: Path) -> None:
    assert cli_main(["report", "--run", str(pipeline_run), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    sec = report["sections"][0]
    assert sec["notes"] == [] and sec["gallery"]
    page = (tmp_path / "index.html").read_text()
    for key, spec, text in _cells(page):
        assert text == _printed(_lookup(report, key), spec), key
    for name in ("vanilla", "vanilla_scaled", "two_stage_hard", "two_stage_soft", "two_stage_oracle"):
        assert sec["models"][name]["top1"] == metrics["models"][name]["top1"]
        assert f'data-key="sections.0.models.{name}.top1" data-fmt=".2f">{metrics["models"][name]["top1"]:.2f}<' in page
    assert sec["storage"]["total_networks"] == metrics["bytes"]["total_in_networks"]
    assert {p["model"] for p in sec["storage"]["points"]} >= {"vanilla", "vanilla_scaled", "two_stage_soft"}


@pytest.mark.slow
@pytest.mark.mlflow
def test_report_of_an_mlflow_run(fake_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = MlflowClient(uri)
    exp = client.create_experiment("report", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    for name in ("metrics.json", "predictions.parquet"):
        client.log_artifact(run_id, str(fake_run / name))
    client.log_artifact(run_id, str(fake_run.parent / "data" / "hierarchy.json"))
    out = tmp_path / "report"
    assert cli_main(["report", "--run", f"runs:/{run_id}", "--out", str(out), "--gallery", "4", "--mlflow-log"]) == 0
    report = json.loads((out / "report.json").read_text())
    sec = report["sections"][0]
    assert report["kind"] == "mlflow" and sec["mlflow_run_id"] == run_id and sec["notes"] == []
    assert sum(len(g["images"]) for g in sec["gallery"]) == 4  # images from the manifest metrics.json names
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/index.html", "report/report.json", "report/models.png"} <= logged
    assert write_report(run_id, tmp_path / "bare")["sections"][0]["models"] == sec["models"]
    with pytest.raises(DataError, match="not found"):
        write_report("runs:/" + "0" * 32, tmp_path / "unknown")
