"""jobs.study: variants × seeds over shared tasks, the table of accuracy beside cost, intervals."""

import json
from pathlib import Path

import numpy as np
import pytest

from jobs.study import load_study
from supersub.stats import paired_bootstrap

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.source=synthetic:superclasses=3,subclasses=3,per_class=40,size=16,confusion=0.1", "data.image_size=16",
        "data.num_workers=0", "model.width=0.125", "train.epochs=2", "train.batch_size=32", "specialist.optim.epochs=2",
        "specialist.optim.batch_size=32", "report=false", "tracking.enabled=false", "evaluation.bootstrap=50"]


def test_study_files_name_variants_with_their_own_seeds(tmp_path):
    base = REPO / "jobs" / "configs" / "default.yaml"
    study = tmp_path / "s.yaml"
    study.write_text(f"config: {base}\nseeds: [0, 1]\nvariants:\n  a: [delta.bits=2, train.epochs=3]\n"
                     "  b: {overrides: [delta.bits=8], seeds: [5]}\n")
    path, variants, file_seeds = load_study(study)
    assert path == base and file_seeds == [0, 1]
    assert variants == {"a": {"overrides": ["delta.bits=2", "train.epochs=3"], "seeds": None},
                        "b": {"overrides": ["delta.bits=8"], "seeds": [5]}}
    from jobs.study import parse_args, plan_runs

    def planned(*argv):
        runs, _ = plan_runs(parse_args(["--study", str(study), "--out", str(tmp_path / "o"), *argv]))
        return {(name, seed, cfg.train.epochs, cfg.delta.bits) for name, seed, cfg in runs}

    assert planned("train.epochs=1") == {
        ("a", 0, 1, 2), ("a", 1, 1, 2), ("b", 5, 1, 8)}  # the command line wins over a variant's own
    # --seeds wins over the file's seeds, not over a variant's own
    assert planned("--seeds", "2,3") == {("a", 2, 3, 2), ("a", 3, 3, 2), ("b", 5, 15, 8)}
    study.write_text(f"config: {base}\nvariants:\n  a: {{overrides: [], seed: 3}}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_study(study)


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.6
    b = a.copy()
    b[:100] = ~b[:100]  # b differs from a on 100 of 2000 images
    out = paired_bootstrap(a, b, resamples=500)
    assert out["delta"] == pytest.approx(100 * (a.mean() - b.mean()))
    assert out["low"] < out["delta"] < out["high"]
    assert out["high"] - out["low"] < 3.0  # paired: far narrower than two independent 2000-image accuracies
    same = paired_bootstrap(a, a, resamples=100)
    assert same["low"] == same["high"] == same["delta"] == 0.0


@pytest.mark.slow
def test_study_writes_rows_with_the_controls_and_their_costs(tmp_path, capsys):
    from jobs.study import main

    out = tmp_path / "study"
    argv = ["--study", str(REPO / "jobs" / "configs" / "study_default.yaml"), "--out", str(out), "--variants",
            "ours", "--seeds", "0,1", *TINY]
    assert main(argv) == 0
    doc = json.loads((out / "study.json").read_text())
    assert set(doc["results"]["ours"]) == {"0", "1"}
    rows = {r["model"]: r for r in doc["rows"] if r["variant"] == "ours"}
    for name in ("vanilla", "vanilla_long", "delta_all", "ensemble", "two_stage_hard", "two_stage_soft"):
        for key in ("top1", "bytes_in_networks", "train_images", "flops_per_image"):
            assert rows[name][key] is not None, (name, key)
        assert rows[name]["seeds"] == [0, 1] and len(rows[name]["top1_by_seed"]) == 2
    assert rows["two_stage_hard"]["top1"] == pytest.approx(np.mean(rows["two_stage_hard"]["top1_by_seed"]))
    d = rows["two_stage_soft"]["delta_vs_vanilla"]
    assert d["low"] <= d["delta"] <= d["high"]
    assert "stage1" in rows and 0 < rows["stage1"]["superclass_acc"] <= 100
    # shared tasks: seed 1's vanilla network is also seed 0's second ensemble member, trained once
    assert len(list((out / "shared" / "tasks").glob("vanilla_seed1-*"))) == 1
    assert "| vanilla_long |" in (out / "study.md").read_text()
    # the regime map: each two-stage model against the best control whose FLOPs it pays for
    cells = {r["model"]: r for r in doc["regime_map"] if r["variant"] == "ours"}
    assert "two_stage_hard" in cells and (out / "regime_map.png").is_file() and (out / "regime_map.md").is_file()
    for name, cell in cells.items():
        eligible = [c for c in ("vanilla", "vanilla_long", "delta_all", "delta_all_pooled", "ensemble")
                    if c in rows and rows[c]["flops_ratio"] <= rows[name]["flops_ratio"] + 0.02]
        assert sorted(cell["controls_considered"]) == sorted(eligible)
        assert cell["best_control_top1"] == pytest.approx(max(rows[c]["top1"] for c in cell["controls_considered"]))
        d = cell["minus_best_control"]
        assert d["low"] <= d["delta"] <= d["high"]
        assert d["delta"] == pytest.approx(cell["top1"] - cell["best_control_top1"], abs=1e-4)
        assert cell["images_per_class"] == "all" and cell["width"] == 0.125


def test_concurrent_study_processes_keep_each_others_results(tmp_path, monkeypatch):
    """Two study processes on one folder (other runs side by side) both end up in study.json."""
    import jobs.study as study

    def fake_run(cfg, out, runner, shared_dir, log):
        if cfg.name == "b":  # the other process finished variant "c" while this one ran "b"
            summary = out.parents[1] / "study.json"
            doc = json.loads(summary.read_text())
            doc["results"]["c"] = {"0": {"dir": str(out.parents[1] / "c" / "seed0"), "metrics": metrics()}}
            summary.write_text(json.dumps(doc))
        return metrics()

    def metrics():
        top = {"top1": 1.0, "crossing_error_share": 0.0}
        return {"models": {"vanilla": top, "two_stage_hard": top, "stage1": {"superclass_acc": 1.0}}}

    base = REPO / "jobs" / "configs" / "default.yaml"
    spec = tmp_path / "s.yaml"
    spec.write_text(f"config: {base}\nvariants:\n  a: [delta.bits=2]\n  b: [delta.bits=8]\n  c: [delta.bits=3]\n")
    monkeypatch.setattr(study, "run_pipeline", fake_run)
    assert study.main(["--study", str(spec), "--out", str(tmp_path / "out"), "--variants", "a,b"]) == 0
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    assert set(doc["results"]) == {"a", "b", "c"}
    assert {r["variant"] for r in doc["rows"]} == {"a", "b", "c"}


def test_a_bad_study_is_refused_before_anything_runs(tmp_path, capsys):
    from jobs.study import main

    spec = tmp_path / "s.yaml"
    spec.write_text(f"config: {REPO / 'jobs' / 'configs' / 'default.yaml'}\nvariants:\n  a: [delta.bits=5]\n")
    assert main(["--study", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "delta.bits" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigint_ends_the_study_in_one_line_and_a_rerun_continues(tmp_path):
    """Ctrl-C in a study's first epoch: exit 130, one line on stderr, no traceback; the rerun
    with the same --out finishes and writes study.json."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "study"
    argv = [sys.executable, "-m", "jobs.study", "--study", str(REPO / "jobs" / "configs" / "study_default.yaml"),
            "--out", str(out), "--variants", "ours", *TINY, "train.epochs=4"]
    log = tmp_path / "study.log"
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        while "vanilla epoch 1/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, (log.read_text()[-2000:], err)
    assert err.strip().startswith("jobs.study: interrupted (SIGINT)") and len(err.strip().splitlines()) == 1, err
    assert not (out / "study.json").exists()
    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed after epoch" in rerun.stdout and (out / "study.json").is_file()
