"""Crashes under the Ray runner: two jobs on one folder train a task once (the driver holds the
task's lock around its Train run), and Ray's own damaged run state (an empty
``checkpoint_manager_snapshot.json``, as a full disk leaves it) is set aside for the task's own
checkpoint. One tiny network task, one epoch, on the session's Ray."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ray_helpers import call_with_timeout, tiny_config

from supersub.atomic import sha256_file


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_jobs_train_a_task_once_and_a_damaged_run_state_falls_back(ray_session, tmp_path: Path) -> None:
    from jobs.runner import RayRunner
    from supersub.pipeline import data_options, network_task, prepare_data
    from supersub.runner import run_tasks

    cfg = tiny_config(tmp_path, None, "train.epochs=2")
    data = data_options(cfg, prepare_data(cfg, tmp_path, log=lambda s: None))
    task = network_task("vanilla", "fine", cfg, data, tmp_path / "tasks")
    assert task.identity()["runner"] == "ray"  # Ray and local runs never share a folder

    logs: list[list[str]] = [[], []]
    started = threading.Event()

    def first_log(line: str) -> None:
        logs[0].append(line)
        if "as Ray Train run" in line:
            started.set()

    first = threading.Thread(target=call_with_timeout, daemon=True,
                             args=(run_tasks, 400, RayRunner(cfg.resources, tmp_path, log=first_log), [task],
                                   cfg.resources, first_log))
    first.start()
    assert started.wait(300), logs[0]
    second = RayRunner(cfg.resources, tmp_path, log=logs[1].append)
    call_with_timeout(run_tasks, 400, second, [task], cfg.resources, logs[1].append)
    first.join(400)
    both = logs[0] + logs[1]
    assert sum("as Ray Train run" in line for line in both) == 1, both
    assert any(line.startswith("vanilla: being trained by pid ") for line in logs[1]), logs[1]
    assert any(line.startswith("vanilla: finished meanwhile by another process, reused") for line in logs[1]), logs[1]
    assert task.done()

    # Ray's run state damaged (empty snapshot) and the task's weights truncated: the rerun says
    # both, in one line each, and writes the very same weights from the task's own checkpoint.
    snapshot = tmp_path / "ray" / Path(task.out_dir).name / "checkpoint_manager_snapshot.json"
    assert snapshot.is_file()
    snapshot.write_text("")
    weights = Path(task.out_dir) / "model.safetensors"
    before = sha256_file(weights)
    weights.write_bytes(weights.read_bytes()[:1000])
    lines: list[str] = []
    call_with_timeout(run_tasks, 400, RayRunner(cfg.resources, tmp_path, log=lines.append), [task], cfg.resources,
                      lines.append)
    assert any(line.startswith("vanilla: model.safetensors is damaged (1,000 bytes") for line in lines), lines
    assert any(line.startswith(f"vanilla: Ray's run state {snapshot} is unreadable (empty)") and
               "resumes from its own last checkpoint" in line for line in lines), lines
    assert sha256_file(weights) == before and task.done()

    # The weights alone truncated, Ray's run state intact: Train restores the finished run, whose
    # last checkpoint holds the outputs, and the driver copies them back — checked again.
    weights.write_bytes(b"")
    lines.clear()
    call_with_timeout(run_tasks, 400, RayRunner(cfg.resources, tmp_path, log=lines.append), [task], cfg.resources,
                      lines.append)
    assert any(line.startswith("vanilla: model.safetensors is damaged (0 bytes") for line in lines), lines
    assert not any("run state" in line for line in lines), lines
    assert sha256_file(weights) == before and task.done()


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_ray_job_starts_nothing_after_it_and_ends_every_run_killed(tmp_path: Path, signame) -> None:
    """``python -m jobs.pipeline`` on its own local Ray, SIGINT (SIGTERM) while the vanilla network
    trains: exit 130 (143) with one line and no traceback, no Train run started after the signal,
    every MLflow run of the job KILLED. (SIGTERM: ray.init installs its own handler, which exits
    without any of that unless the job takes the signal back.)"""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    from mlflow.tracking import MlflowClient
    from ray_helpers import DEFAULT_CONFIG, ENV, PYTHON, REPO, TINY, stop_cluster

    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    ray_tmp = tempfile.mkdtemp(prefix="ssint-", dir="/tmp")  # its own Ray, stopped by pid below
    env = {**os.environ, **ENV, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [PYTHON, "-m", "jobs.pipeline", "--config", str(DEFAULT_CONFIG), "--out", str(tmp_path / "run"), *TINY,
           "train.epochs=40", f"tracking.tracking_uri={uri}", "report=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "vanilla epoch 2/" in line:
                proc.send_signal(getattr(signal, signame))
                signalled = time.monotonic()
                break
        else:
            pytest.fail("the vanilla network never reached epoch 2")
        rest, err = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        stop_cluster(ray_tmp)
    lines += rest.splitlines()
    assert proc.returncode == 128 + getattr(signal, signame), (lines[-10:], err[-3000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"jobs.pipeline: interrupted ({signame})"), err
    started = [line for line in lines if "as Ray Train run" in line]
    assert len(started) == 1 and started[0].startswith("vanilla: started"), started
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"pipeline:default (run)": "KILLED", "vanilla": "KILLED"}
    print(f"stopped {stopped_in:.1f} s after {signame}")


def test_outputs_copied_back_from_a_ray_checkpoint_leave_the_lock_and_temp_files(tmp_path: Path) -> None:
    """The driver's copy of a run's last checkpoint into the task folder (a worker on another
    node, or a finished run restored): the lock another process holds stays the same file, a
    temporary file in the checkpoint is not copied."""
    import os

    from jobs.runner import RayRunner

    src, out = tmp_path / "ckpt", tmp_path / "task"
    src.mkdir()
    out.mkdir()
    for name in ("model.safetensors", "metrics.json", ".lock", "checkpoint.pt.tmp123"):
        (src / name).write_text(name)
    (out / ".lock").write_text("held")
    inode = os.stat(out / ".lock").st_ino

    class Checkpoint:
        def to_directory(self, path: str) -> None:
            for p in src.iterdir():
                (Path(path) / p.name).write_bytes(p.read_bytes())

    RayRunner._materialise(Checkpoint(), out)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.json", "model.safetensors"]
    assert os.stat(out / ".lock").st_ino == inode and (out / ".lock").read_text() == "held"
