"""``supersub report``: the page's numbers against the metrics it was built from, one self-contained file.

Most tests build a pipeline output by hand: a synthetic manifest whose class names need HTML
escaping, seeded predictions of eight models, and a metrics.json in the pipeline's current format
(models scored by the pipeline's own ``score_models``: intervals against vanilla, stage one; cost
fields, compact routing strings, the served model). A study folder is made of copies of that run.
Two report on real runs: the session's tiny pipeline run (tests/conftest.py) and, slow, an MLflow run.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
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
from supersub.evaluation import save_predictions, score_models
from supersub.hierarchy import Hierarchy
from supersub.hierarchy.core import Subclass, Superclass
from supersub.metrics import confusion, most_confused_pairs
from supersub.plots import LABELS
from supersub.report import read_tune, write_report
from supersub.study import ORDER, summarise

REPO = Path(__file__).resolve().parents[1]
# Names that break a page unless escaped: tags, an attribute-ending quote, an ampersand.
EVIL_SUPER = '<script>alert("s{}")</script> & co'
EVIL_SUB = "c{}{} <img src=x onerror='y'> $^$"
# How a model's predictions are drawn: logits N(0, 1) plus this much on the true class. Written in
# an order that is not ORDER's: the report must sort them.
STRENGTH = {"two_stage_soft_pooled": 2.3, "vanilla": 1.5, "vanilla_long": 1.7, "vanilla_scaled": 1.8,
            "delta_all_pooled": 1.9, "two_stage_hard": 2.0, "two_stage_soft": 2.2, "two_stage_oracle": 3.0}
SERVED = "two_stage_soft_pooled"
ROUTING = {"hard": "hard", "soft": "soft:2@0.8", "hard_pooled": "hard+0.25", "soft_pooled": "soft:2@0.8+0.25"}
# Any element that carries a printed number: <td class="n" data-key=.. data-fmt=..>, <span ..>, <b ..>.
CELL = re.compile(r'<(?:td|span|b)(?: class="n")? data-key="([^"]+)" data-fmt="([^"]+)">([^<]*)<')
IMG = re.compile(r'<img [^>]*src="([^"]*)"')


def _evil_hierarchy() -> Hierarchy:
    base = synthetic_hierarchy(3, 4)
    return Hierarchy("evil <h>", tuple(
        Superclass(s.id, EVIL_SUPER.format(i), tuple(Subclass(c.id, EVIL_SUB.format(i, j)) for j, c in enumerate(s.subclasses)))
        for i, s in enumerate(base.superclasses)))


def _costs(name: str, total: float) -> dict[str, Any]:
    """The cost fields evaluation.py adds to a model (made-up numbers of the right kinds)."""
    two_stage = name.startswith("two_stage")
    out = {"bytes_in_networks": {"vanilla_scaled": 1.56, "delta_all_pooled": 1.04}.get(name, total if two_stage else 1.0),
           "train_images": 1344 if name != "vanilla" else 576, "flops_per_image": 2_000_000 * (2 if two_stage else 1),
           "flops_ratio": 2.0 if two_stage else 1.0, "latency_ratio": None if name == "two_stage_oracle" else 1.25}
    if two_stage:
        family = name.removeprefix("two_stage_")
        out |= {"routing": ROUTING.get(family, "oracle"), "specialist_passes_per_image": 1.5}
    return out


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
    super_probs = torch.randn(len(labels), h.num_superclasses, generator=gen).softmax(1)
    models, per_super = score_models(probs, labels, h, SimpleNamespace(super_probs=super_probs), bootstrap=200)
    net = 1_000_000
    per_spec = {s.id: 40_000 + 1_000 * i for i, s in enumerate(h.superclasses)}
    total = 1 + sum(per_spec.values()) / net
    for name, m in models.items():
        if "top1" in m:
            m.update(_costs(name, total))
    metrics = {
        "name": "fake <run>", "seed": 0, "test_split": "test", "manifest_dir": str(root / "data"),
        "hierarchy": {"name": h.name, "superclasses": [s.name for s in h.superclasses], "sizes": [4, 4, 4]},
        "models": models, "routing": ROUTING, "serves": {"model": SERVED, "routing": ROUTING["soft_pooled"]},
        "per_superclass": per_super,
        "bytes": {"network": net, "base_file": net + 1000, "per_specialist": per_spec,
                  "specialists_total": sum(per_spec.values()),
                  "mean_specialist_ratio": sum(per_spec.values()) / len(per_spec) / net, "total_in_networks": total},
        "specialists": [{"superclass": i, "val_acc": 40.0 + i, "delta_bytes": b, "delta_ratio": b / net,
                         "delta_density": 0.05, "wall_seconds": 1.0, "train_images": 256}
                        for i, b in enumerate(per_spec.values())],
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


def _check_cells(page: str, report: dict[str, Any]) -> set[str]:
    """Every printed number is report.json's at its printed precision; returns the keys."""
    cells = CELL.findall(page)
    assert cells and len(cells) == page.count("data-key=")  # the pattern misses no keyed element
    for key, spec, text in cells:
        assert text == _printed(_lookup(report, key), spec), key
    return {k for k, _, _ in cells}


def _png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:60]
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
    assert img.format == "PNG"
    return img


def _check_self_contained(page: str) -> list[str]:
    """No file beside the page is needed: every image is an inlined PNG, nothing else is linked."""
    sources = IMG.findall(page)
    assert sources
    for src in sources:
        _png(src).verify()
    links = re.findall(r'\b(?:href|src)="([^"]*)"', page)
    assert all(x.startswith(("data:image/png;base64,", "#")) for x in links), [x[:40] for x in links]
    assert "<script" not in page and "url(" not in page and "srcset" not in page and "<link" not in page
    return sources


# ----------------------------------------------------------------------------- the numbers
def test_printed_numbers_are_the_metrics(fake_run: Path, fake_report: tuple[Path, dict[str, Any]]) -> None:
    out, report = fake_report
    page = (out / "index.html").read_text()
    assert json.loads((out / "report.json").read_text()) == report
    metrics = json.loads((fake_run / "metrics.json").read_text())
    keys = _check_cells(page, report)
    assert len(keys) > 200
    sec = report["sections"][0]
    for name, m in metrics["models"].items():  # ... and report.json's are metrics.json's
        for metric in ("top1", "top5", "superclass_acc", "crossing_error_share", "crossing_error_chance",
                       "bytes_in_networks", "train_images", "flops_ratio", "latency_ratio", "specialist_passes_per_image"):
            if m.get(metric) is not None:
                assert f"sections.0.models.{name}.{metric}" in keys, (name, metric)
                assert sec["models"][name][metric] == m[metric]
        if "delta_vs_vanilla" in m:
            assert {f"sections.0.models.{name}.delta_vs_vanilla.{x}" for x in ("delta", "low", "high")} <= keys
            assert sec["models"][name]["delta_vs_vanilla"] == m["delta_vs_vanilla"]
        assert sec["models"][name].get("routing") == m.get("routing")
    assert "sections.0.models.vanilla.delta_vs_vanilla.delta" not in keys  # vanilla has no difference to itself
    assert "sections.0.models.two_stage_oracle.latency_ratio" not in keys  # null: a dash
    b = metrics["bytes"]
    assert {"sections.0.storage.mean_ratio", "sections.0.storage.total_networks", "sections.0.storage.network"} <= keys
    assert sec["storage"]["mean_ratio"] == b["mean_specialist_ratio"]
    assert sec["storage"]["total_networks"] == b["total_in_networks"]
    assert [p["bytes"] for p in sec["storage"]["per_specialist"]] == list(b["per_specialist"].values())
    # accuracy at equal bytes: each model's own bytes_in_networks (oracle routing is no deployable model)
    assert {p["model"]: (p["networks"], p["top1"]) for p in sec["storage"]["points"]} == {
        k: (m["bytes_in_networks"], m["top1"]) for k, m in metrics["models"].items()
        if "top1" in m and k != "two_stage_oracle"}
    for j, row in enumerate(sec["per_superclass"]):
        assert f"sections.0.per_superclass.{j}.specialist" in keys
        assert row["vanilla"] == metrics["per_superclass"]["vanilla"][j]
        assert row["vanilla_within"] == metrics["per_superclass"]["vanilla_within"][j]
        assert row["specialist"] == metrics["per_superclass"]["two_stage_oracle"][j]
        assert row["two_stage"] == metrics["per_superclass"][SERVED][j]
    assert sec["notes"] == []  # predictions.parquet and metrics.json agree, the manifest was found


def test_a_changed_number_is_caught(fake_report: tuple[Path, dict[str, Any]]) -> None:
    """The cell check itself: a printed number that is not report.json's fails it."""
    out, report = fake_report
    page = (out / "index.html").read_text()
    top1 = report["sections"][0]["models"]["vanilla"]["top1"]
    cell = f'data-key="sections.0.models.vanilla.top1" data-fmt=".2f">{top1:.2f}<'
    assert cell in page
    with pytest.raises(AssertionError, match="vanilla.top1"):
        _check_cells(page.replace(cell, f'data-key="sections.0.models.vanilla.top1" data-fmt=".2f">{top1 + 1:.2f}<'),
                     report)


def test_models_are_those_of_metrics_json_in_study_order(fake_report: tuple[Path, dict[str, Any]]) -> None:
    out, report = fake_report
    sec = report["sections"][0]
    fine = [k for k in ORDER if k in STRENGTH]
    assert sec["fine_models"] == fine and fine[0] == "vanilla" and fine[-1] == "two_stage_oracle"
    assert list(sec["errors"]) == fine[:-1]  # oracle routing never crosses: no error split
    assert list(sec["severity"]) == fine
    page = (out / "index.html").read_text()
    table = page[page.index("<h3>Models"):page.index("<h3>Errors")]
    names = [n.strip() for n in re.findall(r"<tr(?: class='served')?><td>([^<]+)", table)]
    assert names == [LABELS[k] for k in [*fine, "stage1"]]
    assert all(k in LABELS for k in ORDER)
    # the served model: its confusions and gallery by default, its row set off
    assert report["model"] is None and sec["model"] == SERVED and sec["confusion"]["models"] == ["vanilla", SERVED]
    assert re.findall(r"<tr class='served'><td>([^<]+) <b>\(served\)</b>", table) == [LABELS[SERVED]]
    for name in fine:  # each two-stage model's routing, as metrics.json spells it
        routing = sec["models"][name].get("routing")
        assert (f"<code>{routing}</code>" in table) == name.startswith("two_stage")
    intro = page[page.index("<section"):page.index("<h3>Models")]
    assert "resident weight" not in intro and all(f"<code>{r}</code>" in intro for r in ROUTING.values())
    assert f"serves <b>{LABELS[SERVED]}</b> (routing <code>{ROUTING['soft_pooled']}</code>)" in intro


def test_confusions_and_error_counts_match_predictions(fake_run: Path, fake_report: tuple[Path, dict[str, Any]]) -> None:
    _, report = fake_report
    sec = report["sections"][0]
    t = pq.read_table(fake_run / "predictions.parquet").to_pydict()
    h = load_manifest(fake_run.parent / "data").hierarchy
    coarse = torch.tensor(h.fine_to_coarse)
    labels = torch.tensor(t["label"]).long()
    metrics = json.loads((fake_run / "metrics.json").read_text())
    for name in ("vanilla", SERVED):
        pred = torch.tensor(t[f"pred_{name}"]).long()
        sup = confusion(coarse[pred], coarse[labels], h.num_superclasses)
        assert sec["confusion"]["superclass"][name] == sup.tolist()
        fine = confusion(pred, labels, h.num_subclasses)
        for block in sec["confusion"]["within"]:
            members = h.coarse_to_fine[block["superclass"]]
            counts = np.array(block["counts"][name])
            assert (counts[:, :-1] == fine[np.ix_(members, members)]).all()
            assert (counts.sum(1) == fine[members].sum(1)).all()  # the last column: errors that left
    for name in sec["errors"]:
        pred = torch.tensor(t[f"pred_{name}"]).long()
        errors = int((pred != labels).sum())
        crossing = int(((pred != labels) & (coarse[pred] != coarse[labels])).sum())
        assert sec["errors"][name] == pytest.approx({"errors": errors, "within": errors - crossing, "crossing": crossing,
                                                     "crossing_share": metrics["models"][name]["crossing_error_share"]})
        assert crossing > 0 and errors - crossing > 0  # the fixture exercises both kinds
    fine = confusion(torch.tensor(t[f"pred_{SERVED}"]), labels, h.num_subclasses)
    assert [(p["true"], p["pred"], p["count"]) for p in sec["pairs"]] == most_confused_pairs(fine, top=20)


# ----------------------------------------------------------------------------- one self-contained page
def test_page_is_one_self_contained_file(fake_report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, report = fake_report
    page = (out / "index.html").read_text()
    sources = _check_self_contained(page)
    figures = report["sections"][0]["figures"]
    assert set(figures) >= {"models", "errors", "confusion_superclass", "confusion_000", "per_superclass", "bytes",
                            "accuracy_vs_bytes", "pareto", "severity"}
    for rel in figures.values():  # each figure inlined byte for byte; a drawn figure, not an empty canvas
        data = (out / rel).read_bytes()
        assert "data:image/png;base64," + base64.b64encode(data).decode() in sources
        img = _png("data:image/png;base64," + base64.b64encode(data).decode()).convert("L")
        assert min(img.size) > 200 and len(set(img.getdata())) > 16 and len(data) > 5_000
    # the page alone, away from its PNGs, still has every image
    alone = tmp_path / "index.html"
    shutil.copy(out / "index.html", alone)
    assert IMG.findall(alone.read_text()) == sources


def test_self_contained_check_catches_a_file_reference(fake_report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = fake_report
    page = (out / "index.html").read_text()
    with pytest.raises(AssertionError):
        _check_self_contained(page.replace("<h3>Models", '<img class="fig" src="models.png"><h3>Models', 1))
    with pytest.raises(AssertionError):
        _check_self_contained(page.replace("<h3>Models", '<a href="models.png">x</a><h3>Models', 1))


def test_gallery_holds_misclassified_images_most_confused_pairs_first(
    fake_run: Path, fake_report: tuple[Path, dict[str, Any]]
) -> None:
    out, report = fake_report
    sec = report["sections"][0]
    t = pq.read_table(fake_run / "predictions.parquet").to_pydict()
    labels, pred, prob = t["label"], t[f"pred_{SERVED}"], t[f"prob_{SERVED}"]
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
            data = (out / im["file"]).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                assert img.format == "PNG" and min(img.size) >= 96
            assert f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page
            assert f'"{im["file"]}"' not in page


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
def _fake_study(fake_run: Path, root: Path) -> Path:
    """A study folder as jobs.study writes it: <variant>/seed<k>/ run folders, study.json with
    results {variant: {seed: {dir, metrics}}} and the summarised rows. Variant "a" has seeds 2 and
    10 (the lowest is 2, not "10" < "2"); its recorded dirs are stale (the study was moved)."""
    study = _mk(root / "study")
    results: dict[str, dict[str, Any]] = {}
    for variant, seeds in (("a", ("10", "2")), ("b <x>", ("0",))):
        for seed in seeds:
            run = _mk(study / variant / f"seed{seed}")
            metrics = json.loads((fake_run / "metrics.json").read_text())
            metrics |= {"name": variant, "seed": int(seed)}
            if variant == "b <x>":  # another served model, and one model fewer
                metrics["serves"] = {"model": "two_stage_hard", "routing": "hard"}
                del metrics["models"]["vanilla_long"]
            (run / "metrics.json").write_text(json.dumps(metrics))
            shutil.copy(fake_run / "predictions.parquet", run)
            results.setdefault(variant, {})[seed] = {"dir": str(run), "metrics": metrics}
    rows = summarise(results, bootstrap=50)
    for by_seed in results.values():
        for seed, r in by_seed.items():
            r["dir"] = f"/elsewhere/{seed}"
    (study / "study.json").write_text(json.dumps({"study": "s.yaml", "config": "c.yaml", "results": results,
                                                  "rows": rows}))
    return study


def test_study_folder_one_section_per_variant_and_the_rows_table(fake_run: Path, tmp_path: Path) -> None:
    study = _fake_study(fake_run, tmp_path)
    doc = json.loads((study / "study.json").read_text())
    report = write_report(str(study), tmp_path / "out", gallery=4)
    assert report["kind"] == "study" and [s["name"] for s in report["sections"]] == ["a", "b <x>"]
    assert [s["slug"] for s in report["sections"]] == ["a", "b__x_"]
    assert [(s["seed"], s["seeds"]) for s in report["sections"]] == [("2", ["2", "10"]), ("0", ["0"])]
    assert [s["model"] for s in report["sections"]] == [SERVED, "two_stage_hard"]  # each variant's served model
    assert "vanilla_long" not in report["sections"][1]["fine_models"]
    assert all(s["notes"] == [] for s in report["sections"])  # each from its own run folder, found under the study
    assert report["study"]["rows"] == doc["rows"]
    page = (tmp_path / "out" / "index.html").read_text()
    keys = _check_cells(page, report)
    _check_self_contained(page)
    table = page[page.index("<h2>Study"):page.index("<section")]
    fine_rows = [r for r in doc["rows"] if r["model"] != "stage1"]
    assert table.count("<tr>") == 1 + len(fine_rows) and len(fine_rows) == 8 + 7
    for j, r in enumerate(doc["rows"]):
        if r["model"] == "stage1":
            assert f"study.rows.{j}.superclass_acc" in keys
            continue
        assert {f"study.rows.{j}.{c}" for c in ("top1", "top1_sd", "bytes_in_networks", "train_images")} <= keys
        assert (f"study.rows.{j}.delta_vs_vanilla.low" in keys) == (r["model"] != "vanilla")
    assert 'href="#b__x_"' in page and "b &lt;x&gt;" in page and page.count("<section ") == 2
    for s in report["sections"]:
        assert all(f.startswith(s["slug"] + "/") and (tmp_path / "out" / f).is_file() for f in s["figures"].values())
    one = write_report(str(study), tmp_path / "one", variant="b <x>", gallery=0)
    assert [s["name"] for s in one["sections"]] == ["b <x>"] and (tmp_path / "one" / "models.png").is_file()
    assert one["sections"][0]["gallery"] == [] and {r["variant"] for r in one["study"]["rows"]} == {"b <x>"}
    _check_cells((tmp_path / "one" / "index.html").read_text(), one)
    with pytest.raises(ConfigError, match="the study has"):
        write_report(str(study), tmp_path / "bad", variant="nope")
    with pytest.raises(ConfigError, match="--model vanilla_long"):  # variant b has none
        write_report(str(study), tmp_path / "bad", model="vanilla_long")
    doc["results"] = {"a": doc["results"]["a"]["2"]["metrics"]}  # the older layout: {variant: metrics}
    (study / "study.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="older jobs.study"):
        write_report(str(study), tmp_path / "old")


def test_cli_writes_the_report(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", "--run", str(fake_run), "--out", str(tmp_path), "--model", "vanilla_long",
                     "--gallery", "3", "--tune", str(fake_run / "tune" / "pareto.json")]) == 0
    assert "index.html" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    sec = report["sections"][0]
    assert report["model"] == sec["model"] == "vanilla_long" and sec["confusion"]["models"] == ["vanilla", "vanilla_long"]
    assert sum(len(g["images"]) for g in sec["gallery"]) == 3
    assert sec["per_superclass"][0]["two_stage"] == json.loads((fake_run / "metrics.json").read_text())[
        "per_superclass"]["vanilla_long"][0]


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
    for model in ("vanilla_scaled", "stage1"):  # absent, and present without a fine prediction
        assert cli_main(["report", "--run", str(run), "--out", str(tmp_path / "o"), "--model", model]) == 2
        assert f"--model {model}" in capsys.readouterr().err
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
    page = (tmp_path / "a" / "index.html").read_text()
    _check_cells(page, report)
    _check_self_contained(page)
    assert "no predictions.parquet" in page
    m = metrics["models"]["vanilla"]  # still shown, from metrics.json
    for key in ("crossing_error_share", "crossing_error_chance"):
        assert f'data-key="sections.0.models.vanilla.{key}" data-fmt=".1f">{m[key]:.1f}<' in page
    shutil.copy(fake_run / "predictions.parquet", run)
    sec = write_report(str(run), tmp_path / "b")["sections"][0]
    assert sec["gallery"] == [] and sec["errors"]["vanilla"]["errors"] > 0


def test_report_module_imports_no_heavy_frameworks() -> None:
    code = ("import sys, supersub.report, supersub.plots, supersub.cli; supersub.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="session")
def pipeline_run(tiny_pipeline_run) -> Path:
    return tiny_pipeline_run[0]


def test_report_of_a_real_pipeline_run(pipeline_run: Path, tmp_path: Path) -> None:
    assert cli_main(["report", "--run", str(pipeline_run), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    sec = report["sections"][0]
    assert sec["notes"] == [] and sec["gallery"] and sec["model"] == metrics["serves"]["model"]
    page = (tmp_path / "index.html").read_text()
    keys = _check_cells(page, report)
    _check_self_contained(page)
    fine = [k for k in ORDER if "top1" in metrics["models"].get(k, {})]
    assert sec["fine_models"] == fine and {"vanilla_long", "delta_all", "two_stage_oracle"} <= set(fine)
    for name in fine:
        assert sec["models"][name]["top1"] == metrics["models"][name]["top1"]
        assert f'data-key="sections.0.models.{name}.top1" data-fmt=".2f">{metrics["models"][name]["top1"]:.2f}<' in page
        assert f"sections.0.models.{name}.bytes_in_networks" in keys
    assert sec["storage"]["total_networks"] == metrics["bytes"]["total_in_networks"]
    assert {p["model"] for p in sec["storage"]["points"]} == set(fine) - {"two_stage_oracle"}
    # the pipeline's own report (report=true): the same page, self-contained
    _check_self_contained((pipeline_run / "report" / "index.html").read_text())


@pytest.mark.slow
@pytest.mark.mlflow
def test_report_of_an_mlflow_run(fake_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    import supersub.report.sections as sections

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the default store, through supersub.remote.default_tracking_uri
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = MlflowClient(uri)
    exp = client.create_experiment("report", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    for name in ("metrics.json", "predictions.parquet"):
        client.log_artifact(run_id, str(fake_run / name))
    extra = _mk(tmp_path / "extra")
    (extra / "config.yaml").write_text("name: fake\n")
    h = load_manifest(fake_run.parent / "data").hierarchy
    (_mk(extra / "bundle") / "manifest.json").write_text(json.dumps({"hierarchy": h.to_dict()}))
    (extra / "bundle" / "base.safetensors").write_bytes(b"not needed")
    client.log_artifact(run_id, str(extra / "config.yaml"))
    client.log_artifacts(run_id, str(extra / "bundle"), "bundle")
    seen: list[list[str]] = []
    find_data = sections.find_data

    def spy(src: Any, notes: list[str]) -> Any:
        seen.append(sorted(p.relative_to(src.folder).as_posix() for p in src.folder.rglob("*") if p.is_file()))
        return find_data(src, notes)

    monkeypatch.setattr(sections, "find_data", spy)
    out = tmp_path / "report"
    assert cli_main(["report", "--run", f"runs:/{run_id}", "--out", str(out), "--gallery", "4", "--mlflow-log"]) == 0
    assert seen == [["bundle/manifest.json", "config.yaml", "metrics.json", "predictions.parquet"]]
    report = json.loads((out / "report.json").read_text())
    sec = report["sections"][0]
    assert report["kind"] == "mlflow" and sec["mlflow_run_id"] == run_id and sec["notes"] == []
    assert sum(len(g["images"]) for g in sec["gallery"]) == 4  # images from the manifest metrics.json names
    _check_self_contained((out / "index.html").read_text())
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert logged == {"report/index.html", "report/report.json"}  # the page needs nothing beside it
    assert write_report(run_id, tmp_path / "bare")["sections"][0]["models"] == sec["models"]
    with pytest.raises(DataError, match="not found"):
        write_report("runs:/" + "0" * 32, tmp_path / "unknown")
