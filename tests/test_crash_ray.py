"""Issue 20 under the Ray runner: two jobs on one folder train a task once (the driver holds the
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
    assert "runner" not in task.identity()  # Ray: the identity (and folder) of before issue 20

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
