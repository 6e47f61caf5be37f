"""jobs.tune: the search space, the Pareto front, and a tiny Tune run (ASHA, Train V2 trials)
over the session's tiny pipeline output, with MLflow runs per trial."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from ray_helpers import REPO, call_with_timeout, tiny_run

from jobs.pipeline import overrides_from
from jobs.tune import apply_params, load_space, pareto_front
from supersub.config import ConfigError, load_config
from supersub.pipeline_config import PipelineConfig


@pytest.fixture(scope="session")
def tiny(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_run(tmp_path_factory.mktemp("tune"))


def test_space_files_parse() -> None:
    from jobs.tune import parse_space

    for path in (REPO / "tune_spaces").glob("*.yaml"):
        spec = load_space(path)
        assert parse_space(spec["space"]), path
    with pytest.raises(ConfigError, match="searchable"):
        parse_space({"train.lr": {"choice": [0.1]}})
    with pytest.raises(ConfigError, match="expected one of"):
        parse_space({"delta.bits": [2, 4]})


def test_apply_params_validates_the_task_and_pareto_front(tmp_path: Path) -> None:
    from supersub.pipeline import specialist_task
    from supersub.tasks import DataOptions

    cfg = load_config(PipelineConfig, REPO / "jobs" / "configs" / "default.yaml", [])
    net = tmp_path / "net"
    net.mkdir()
    (net / "model.safetensors").write_bytes(b"weights")  # only hashed here
    task = specialist_task(cfg, 0, DataOptions("m", "fp", 32), tmp_path, str(net), str(net)).to_dict()
    changed = apply_params(task, {"delta.keep": 0.1, "specialist.optim.lr": 0.5})
    assert changed["delta"]["keep"] == 0.1 and changed["optim"]["lr"] == 0.5 and task["delta"]["keep"] == 0.05
    with pytest.raises(ValueError, match="delta.bits"):
        apply_params(task, {"delta.bits": 5})  # an impossible value fails here, not in a worker
    trials = [{"trial_id": i, "delta_ratio": r, "val_acc": a}
              for i, (r, a) in enumerate([(0.01, 50), (0.02, 40), (0.03, 60), (0.04, 60), (0.05, 70)])]
    assert [t["trial_id"] for t in pareto_front(trials)] == [0, 2, 4]


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_tune_writes_pareto_front_and_mlflow_runs(tiny: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.tune import main

    out = tmp_path / "study"
    # --budget 0.2: every completed trial fits, so best.yaml is written whatever ASHA stops.
    # --from as a user types it: relative to the working directory (Train workers run elsewhere).
    argv = ["--space", str(REPO / "tune_spaces" / "tiny.yaml"), "--from", os.path.relpath(tiny["out"]), "--out", str(out),
            "--budget", "0.2"]
    assert call_with_timeout(main, 480, argv) == 0
    summary = json.loads((out / "tune" / "pareto.json").read_text())
    assert len(summary["trials"]) == 4 and summary["front"]
    completed = [t for t in summary["trials"] if t["status"] == "completed"]
    assert completed and all(t["delta_bytes"] > 0 and 0 < t["delta_ratio"] < 1 for t in completed)
    assert (out / "tune" / "pareto.png").stat().st_size > 1000
    best = yaml.safe_load((out / "tune" / "best.yaml").read_text())
    assert set(best["overrides"]) == {"delta.keep", "delta.bits", "specialist.optim.lr"}
    cfg = load_config(PipelineConfig, tiny["out"] / "config.yaml", overrides_from(out / "tune" / "best.yaml"))
    assert cfg.delta.keep == best["overrides"]["delta.keep"]

    client = MlflowClient(tiny["uri"])
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tune:default")
    assert parent.info.status == "FINISHED"
    assert {"pareto.json", "pareto.png", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and r.info.run_name.startswith("trial ")]
    assert len(trials) == 4 and all(r.info.status in ("FINISHED", "FAILED", "KILLED", "RUNNING") for r in trials)
    for run in trials:
        assert {"delta.keep", "delta.bits", "specialist.optim.lr"} <= set(run.data.params)
        assert client.get_metric_history(run.info.run_id, "val_acc")  # per-epoch, step = iteration


@pytest.mark.ray
@pytest.mark.slow
def test_tune_whose_every_trial_fails_exits_non_zero(tiny: dict, tmp_path: Path, capsys) -> None:
    from jobs.tune import main

    space = tmp_path / "failing.yaml"  # keep is a fraction: every sample of [1.5, 2] fails in its trial
    space.write_text("num_samples: 2\nmax_concurrent_trials: 2\noverrides: [specialist.optim.epochs=1]\n"
                     "space:\n  delta.keep: {uniform: [1.5, 2.0]}\n")
    argv = ["--space", str(space), "--from", str(tiny["out"]), "--out", str(tmp_path / "out"), "tracking.enabled=false"]
    assert call_with_timeout(main, 480, argv) == 1
    err = capsys.readouterr().err
    assert "all 2 trials failed" in err and "delta.keep must be in (0, 1]" in err
    # discrete values are checked before any trial starts
    space.write_text("num_samples: 1\nspace:\n  delta.keep: {grid: [0.05, 1.5]}\n")
    assert main(argv) == 2
    assert "delta.keep=1.5" in capsys.readouterr().err
