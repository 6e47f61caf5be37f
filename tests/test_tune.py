"""jobs.tune: the search space, the Pareto front, and a tiny Tune run (ASHA, Train V2 trials)
over the session's tiny pipeline output, with MLflow runs per trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_helpers import (
    ENV,
    PYTHON,
    REPO,
    call_with_timeout,
    stop_cluster,
    tiny_run,
)

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


@pytest.mark.mlflow
@pytest.mark.parametrize("interrupted", [False, True])
def test_the_job_ends_its_trial_runs(tmp_path: Path, interrupted: bool) -> None:
    """A trial ends its own run only when it finishes; the job ends the rest from Tune's results:
    a failure FAILED (and a completed trial's retried attempt), ASHA's stop FINISHED, the others
    KILLED — and after a signal all of them KILLED, a failure keeping its reason."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from jobs.tune import _end_trial_runs

    client = MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    exp = client.create_experiment("t")
    parent = client.create_run(exp, run_name="tune:x").info.run_id

    def trial(name: str, finished: bool = False) -> str:
        run = client.create_run(exp, run_name=f"trial {name}", tags={"mlflow.parentRunId": parent}).info.run_id
        if finished:
            client.set_terminated(run, "FINISHED")
        return run

    runs = {"failed": trial("a"), "early": trial("b"), "cut": trial("c"), "retried": trial("d"),
            "done": trial("d", finished=True)}
    trials = [{"trial_id": "a", "status": "error", "error": "ValueError: x"}, {"trial_id": "b", "status": "stopped early"},
              {"trial_id": "c", "status": "interrupted"}, {"trial_id": "d", "status": "completed"}]
    _end_trial_runs(SimpleNamespace(client=client, run_id=parent, experiment_id=exp), trials, interrupted=interrupted)
    status = {k: client.get_run(r).info.status for k, r in runs.items()}
    if interrupted:
        assert status == {"failed": "KILLED", "early": "KILLED", "cut": "KILLED", "retried": "KILLED", "done": "FINISHED"}
    else:
        assert status == {"failed": "FAILED", "early": "FINISHED", "cut": "KILLED", "retried": "FAILED", "done": "FINISHED"}
        assert client.get_run(runs["early"]).data.tags["stopped_early"] == "true"
    assert client.get_run(runs["failed"]).data.tags["supersub.failure"] == "ValueError: x"


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
    parent = next(r for r in runs if r.info.run_name == "tune:default (study)")
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


@pytest.mark.parametrize("settings,message", [
    ("scheduler: {grace_period: 20}", "scheduler.grace_period must be an integer from 1 to the trials' epochs (2)"),
    ("scheduler: {reduction_factor: 1}", "scheduler.reduction_factor must be a number > 1"),
    ("scheduler: {max_t: 3}", "scheduler: unknown keys ['max_t']"),
    ("num_samples: 0", "num_samples must be an integer >= 1"),
    ("max_concurrent_trials: 1.5", "max_concurrent_trials must be null or an integer >= 1"),
    ("stall_timeout_s: -1", "stall_timeout_s must be a number of seconds > 0"),
    ("overrides: [generalist.kind=trunk_router, 'delta.stages=[layer4]', generalist.router_trunk=joint]",
     "generalist.router_trunk=joint trains every expert in one task"),
])
def test_space_settings_are_checked_before_ray_starts(tmp_path: Path, capsys, settings: str, message: str) -> None:
    from jobs.tune import main

    space = tmp_path / "bad.yaml"
    overrides = "" if settings.startswith("overrides:") else "overrides: [specialist.optim.epochs=2]\n"
    space.write_text(f"{settings}\n{overrides}space:\n  delta.bits: {{choice: [2, 8]}}\n")
    code = main(["--space", str(space), "--config", str(REPO / "jobs" / "configs" / "default.yaml"),
                 "--out", str(tmp_path / "out"), "tracking.enabled=false"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "ray:" not in out and not (tmp_path / "out").exists()  # before Ray started or anything was written


def _tune_subprocess(argv: list[str], out_file: Path, temp_dir: str) -> subprocess.Popen:
    """``python -m jobs.tune`` / ``jobs.pipeline`` in a process of its own, which starts its own
    local Ray (private temp dir) beside the test session's: two Rays on this host."""
    env = {**os.environ, **ENV, "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)  # the session's, pinned in this process
    return subprocess.Popen([PYTHON, "-m", *argv], cwd=REPO, env=env, stdout=out_file.open("w"),
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_tune_interrupted_by_sigint_ends_killed(tiny: dict, tmp_path: Path) -> None:
    """SIGINT during the first trial's training: exit 130, the parent and trial runs KILLED,
    pareto.json partial listing the trials that never ran, no best.yaml."""
    from mlflow.tracking import MlflowClient

    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    space = tmp_path / "two.yaml"
    space.write_text("num_samples: 1\nmax_concurrent_trials: 1\noverrides: [specialist.optim.epochs=2]\n"
                     "space:\n  delta.bits: {grid: [2, 8]}\n")
    out = tmp_path / "out"
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "best.yaml").write_text("# from an earlier search\n")
    log = tmp_path / "tune.log"
    temp_dir = tempfile.mkdtemp(prefix="ssint-", dir="/tmp")
    try:
        proc = _tune_subprocess(["jobs.tune", "--space", str(space), "--from", str(tiny["out"]), "--out", str(out),
                                 "--superclasses", "0", f"tracking.tracking_uri={uri}"], log, temp_dir)
        try:
            deadline = time.monotonic() + 600
            # the first trial's first epoch: its MLflow run exists, the second trial has not run
            while "epoch 1/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=180)
        finally:
            proc.kill()
    finally:
        call_with_timeout(stop_cluster, 60, temp_dir)
    text = log.read_text()
    assert code == 130, text[-5000:]
    assert "interrupted (SIGINT)" in text and "Traceback" not in text, text[-5000:]
    summary = json.loads((out / "tune" / "pareto.json").read_text())
    assert summary["partial"] and summary["interrupted"] == "SIGINT" and summary["best"] is None
    assert len(summary["not_run"]) + summary["not_created"] >= 1, summary  # the second trial never ran
    assert not (out / "tune" / "best.yaml").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    parent = next(r for r in runs if r.info.run_name.startswith("tune:"))
    assert parent.info.status == "KILLED"
    trials = [r for r in runs if r.data.tags.get("supersub.kind") == "tune_trial"]
    assert trials and all(r.info.status == "KILLED" for r in trials), [
        (r.info.run_name, r.info.status, r.data.tags.get("supersub.failure"), r.info.end_time, parent.info.end_time)
        for r in trials]
