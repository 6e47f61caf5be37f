"""Crashes and damage: atomic outputs, verified reuse, the task lock, a full disk,
leftovers, error lines that name their cause, Ctrl-C / SIGTERM, the runner in a task's identity.

In-process (the local runner) on tiny synthetic data; the Ray runner's lock and run-state
recovery are tested in tests/test_crash_ray.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny import TINY as TINY_BASE

from supersub import atomic
from supersub.config import load_config
from supersub.pipeline import data_options, network_task, prepare_data, specialist_task
from supersub.pipeline_config import PipelineConfig
from supersub.runner import LocalRunner, TaskFailed, error_line, remove_leftovers, run_tasks, task_lock

REPO = Path(__file__).resolve().parents[1]
# The smallest run with a specialist: two superclasses of 30 images a class, one specialist epoch.
TINY = [*TINY_BASE, "data.source=synthetic:superclasses=2,subclasses=3,per_class=30,size=16", "specialist.optim.epochs=1"]


def tiny(*overrides: str) -> PipelineConfig:
    return load_config(PipelineConfig, REPO / "jobs" / "configs" / "default.yaml", [*TINY, *overrides])


def tasks_in(cfg: PipelineConfig, data, root: Path):
    vanilla = network_task("vanilla", "fine", cfg, data, root)
    if not (Path(vanilla.out_dir) / "model.safetensors").is_file():
        return vanilla, None
    return vanilla, specialist_task(cfg, 0, data, root, vanilla.out_dir, vanilla.out_dir)


def run_both(cfg, data, root: Path, log) -> tuple:
    vanilla, _ = tasks_in(cfg, data, root)
    run_tasks(LocalRunner("cpu", log=log), [vanilla], cfg.resources, log)
    vanilla, spec = tasks_in(cfg, data, root)
    run_tasks(LocalRunner("cpu", log=log), [spec], cfg.resources, log)
    return vanilla, spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The vanilla network and specialist_0, trained once; tests damage copies of them."""
    base = tmp_path_factory.mktemp("crash")
    cfg = tiny()
    data = data_options(cfg, prepare_data(cfg, base, log=lambda s: None))
    run_both(cfg, data, base / "tasks", lambda s: None)
    return cfg, data, base


def copy_tasks(trained, dst: Path) -> Path:
    cfg, data, base = trained
    shutil.copytree(base / "tasks", dst / "tasks", ignore=shutil.ignore_patterns(".lock"))
    return dst / "tasks"


# ----------------------------------------------------------------------------- damaged outputs
@pytest.mark.parametrize("task, file", [("vanilla", "model.safetensors"), ("specialist_0", "delta.safetensors"),
                                        ("vanilla", "metrics.json")])
def test_a_damaged_output_is_found_and_the_task_retrained_with_one_line(trained, tmp_path, task, file):
    cfg, data, _ = trained
    root = copy_tasks(trained, tmp_path)
    folder = next(root.glob(f"{task}-*"))
    before = {p.name: atomic.sha256_file(p) for p in folder.iterdir() if p.suffix == ".safetensors"}
    path = folder / file
    path.write_bytes(b"" if file == "metrics.json" else path.read_bytes()[: path.stat().st_size // 2])
    lines: list[str] = []
    vanilla, spec = run_both(cfg, data, root, lines.append)
    said = [line for line in lines if "training it again" in line]
    assert len(said) == 1 and said[0].startswith(f"{task}: {file} is "), lines
    assert ("is damaged (" if file != "metrics.json" else "is unreadable (empty)") in said[0]
    again = Path((vanilla if task == "vanilla" else spec).out_dir)
    assert again == folder  # the same folder: same identity
    # retrained from its last checkpoint: the very same weights as before
    assert {p.name: atomic.sha256_file(p) for p in folder.iterdir() if p.suffix == ".safetensors"} == before
    assert vanilla.done() and spec.done()
    # the other task was reused, not retrained
    other = "specialist_0" if task == "vanilla" else "vanilla"
    assert any(line.startswith(f"{other}: done earlier") for line in lines), lines


def test_sizes_first_then_hashes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    rec = atomic.record(tmp_path, ["a.bin"])
    assert atomic.damaged(tmp_path, rec) is None
    (tmp_path / "a.bin").write_bytes(b"y" * 10)  # same size, other bytes
    assert atomic.damaged(tmp_path, rec) == "a.bin is damaged (its sha256 differs from the one recorded)"
    (tmp_path / "a.bin").write_bytes(b"y")
    assert atomic.damaged(tmp_path, rec) == "a.bin is damaged (1 bytes, 10 recorded)"
    (tmp_path / "a.bin").unlink()
    assert atomic.damaged(tmp_path, rec) == "a.bin is missing"


# ----------------------------------------------------------------------------- full disk
def test_no_space_leaves_nothing_a_rerun_trusts_and_the_rerun_finishes(trained, tmp_path, monkeypatch):
    """A simulated ENOSPC while the weights are written (half the bytes land, then the write
    fails, as on a full disk): the failure says "no space left on <path>", the folder holds no
    result and no temporary file, and a rerun (space freed) finishes."""
    import supersub.networks as networks

    cfg, data, _ = trained
    root = tmp_path / "tasks"
    real = networks.save_file

    def full_disk(state, path):
        real(state, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(networks, "save_file", full_disk)
    vanilla, _ = tasks_in(cfg, data, root)
    with pytest.raises(TaskFailed) as e:
        run_tasks(LocalRunner("cpu", retries=0, log=lambda s: None), [vanilla], cfg.resources, lambda s: None)
    assert e.value.first_line == f"vanilla failed: no space left on {vanilla.out_dir}/model.safetensors"
    folder = Path(vanilla.out_dir)
    assert not (folder / "model.safetensors").exists() and not (folder / "metrics.json").exists()
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]
    assert vanilla.damage() == "not finished"
    monkeypatch.setattr(networks, "save_file", real)
    lines: list[str] = []
    run_tasks(LocalRunner("cpu", retries=0, log=lines.append), [vanilla], cfg.resources, lines.append)
    assert vanilla.done() and any("resumed after epoch 2" in line for line in lines), lines


def test_error_lines_name_the_cause():
    worker = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
              + "  File \"x.py\", line 1, in f\n" * 40 + "ValueError: delta.safetensors: header too large")
    assert error_line(RuntimeError(worker)) == "ValueError: delta.safetensors: header too large"
    died = RuntimeError("ActorDiedError: The actor died ... TrainController.__init__()\n"
                        "OSError: [Errno 28] No space left on device: '/out/ray/vanilla-1/x.json'")
    assert error_line(died) == "no space left on /out/ray/vanilla-1/x.json"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e
    except RuntimeError as e:
        assert error_line(e, "/out/tasks/vanilla-1") == "no space left on /out/tasks/vanilla-1"
    assert error_line(KeyError("x")) == "KeyError: 'x'"


# ----------------------------------------------------------------------------- lock
def test_two_jobs_on_one_folder_train_a_task_once(trained, tmp_path):
    cfg, data, _ = trained
    vanilla, _ = tasks_in(cfg, data, tmp_path / "tasks")
    logs: list[list[str]] = [[], []]
    first_holds, second_waits = threading.Event(), threading.Event()

    def hold(task, epoch: int) -> None:  # the first job trains until the second waits for it
        assert second_waits.wait(60), "the second job never waited for the lock"

    def log1(line: str) -> None:
        logs[0].append(line)
        if "running in" in line:  # logged with the lock held
            first_holds.set()

    def log2(line: str) -> None:
        logs[1].append(line)
        if "waiting for it" in line:
            second_waits.set()

    def job(i: int) -> None:
        log = log1 if i == 0 else log2
        run_tasks(LocalRunner("cpu", log=log, epoch_hook=hold if i == 0 else None), [vanilla], cfg.resources, log)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    threads[0].start()
    assert first_holds.wait(60), logs[0]  # the second job starts once the first holds the lock
    threads[1].start()
    for t in threads:
        t.join(300)
    text = "\n".join(logs[0] + logs[1])
    assert text.count("vanilla: running in") == 1, text
    assert logs[1][-1].startswith("vanilla: finished meanwhile by another process, reused"), text
    assert any(line.startswith("vanilla: being trained by pid ") for line in logs[1]), text


def test_a_dead_holders_lock_is_no_lock(tmp_path):
    """flock: the kernel drops the lock with its holder, however it dies (SIGKILL here)."""

    class T:
        name, out_dir = "t", str(tmp_path / "t")

    Path(T.out_dir).mkdir()
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(Path(T.out_dir) / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        waited: list[str] = []

        def log(line: str) -> None:  # the holder dies once we wait for it
            waited.append(line)
            holder.kill()

        t0 = time.monotonic()
        with task_lock(T, log, poll=0.1):
            assert time.monotonic() - t0 < 20
        assert waited and "waiting for it" in waited[0]
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- leftovers
def test_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tasks = tmp_path / "tasks"
        (tmp_path / f"bundle.tmp{pid}" / "deltas").mkdir(parents=True)
        (tasks / "vanilla-1" / "checkpoint").mkdir(parents=True)
        (tasks / "vanilla-1" / "checkpoint" / f"checkpoint.pt.tmp{pid}").write_bytes(b"")
        (tasks / "vanilla-1" / "model.safetensors").write_bytes(b"x")
        (tasks / "specialist_0-2").mkdir()
        (tasks / "specialist_0-2" / "task.json").write_text("{}")
        (tasks / "specialist_1-3").mkdir()
        (tasks / "specialist_1-3" / "task.json").write_text("{}")
        (tasks / "specialist_1-3" / f"delta.safetensors.tmp{live.pid}").write_bytes(b"")  # being written now
        removed = remove_leftovers(tmp_path, lambda s: None)
        assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
            f"bundle.tmp{pid}", "tasks/specialist_0-2", f"tasks/vanilla-1/checkpoint/checkpoint.pt.tmp{pid}"]
        assert (tasks / "vanilla-1" / "model.safetensors").is_file()
        assert (tasks / "specialist_1-3" / f"delta.safetensors.tmp{live.pid}").is_file()
    finally:
        live.kill()
        live.wait()


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_text(path, "old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM
def _job(out: Path, uri: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "jobs.pipeline", "--config", str(REPO / "jobs" / "configs" / "default.yaml"),
            "--out", str(out), *TINY, "tracking.enabled=true", f"tracking.tracking_uri={uri}", "train.epochs=60", *extra]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _interrupt_after(proc: subprocess.Popen, marker: str, signum: int, timeout: float = 240) -> tuple[list[str], str]:
    """Reads the job's lines until ``marker``, sends ``signum``, returns (stdout lines, stderr)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if marker in line:
            proc.send_signal(signum)
            break
    try:
        rest, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, err = proc.communicate()
        pytest.fail("the job did not stop within 120 s of the signal")
    return lines + rest.splitlines(), err


@pytest.mark.slow
@pytest.mark.mlflow
def test_sigint_and_sigterm_stop_the_job_mark_runs_killed_and_a_rerun_continues(tmp_path):
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "run", "sqlite:///" + str(tmp_path / "mlflow.db")
    proc = _job(out, uri)
    lines, err = _interrupt_after(proc, "vanilla epoch 2/", signal.SIGINT)
    assert proc.returncode == 130, (lines[-5:], err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("jobs.pipeline: interrupted (SIGINT)"), err
    assert [line for line in lines if ": running in" in line] == [lines[next(
        i for i, x in enumerate(lines) if x.startswith("vanilla: running in"))]], lines  # nothing after vanilla
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    assert {r.info.run_name for r in runs} == {"pipeline:default (run)", "vanilla"}
    # the rerun continues from the checkpoint; SIGTERM stops it with 143
    proc = _job(out, uri)
    lines, err = _interrupt_after(proc, "vanilla: resumed after epoch", signal.SIGTERM)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err.strip().splitlines()[-1], (lines[-5:], err[-2000:])
    assert any(x.startswith("vanilla: resumed after epoch") and not x.endswith("epoch 0") for x in lines), lines
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 4


# ----------------------------------------------------------------------------- runner identity
def test_the_runner_enters_a_task_identity_unless_it_is_local(trained, tmp_path):
    """The local runner and Ray Train workers do not compute bit for bit alike, so a folder
    continued with the other runner must train anew rather than mix their weights; tasks trained
    locally (every study) keep their fingerprints."""
    from supersub.pipeline import run_pipeline

    cfg, data, _ = trained
    local = network_task("vanilla", "fine", cfg, data, tmp_path)
    on_ray = network_task("vanilla", "fine", tiny("resources.runner=ray"), data, tmp_path)
    assert on_ray.identity()["runner"] == "ray" and "runner" not in local.identity()
    assert local.fingerprint() != on_ray.fingerprint() and local.out_dir != on_ray.out_dir
    # a task's runner survives the round trip to a worker
    assert type(local).from_dict(local.to_dict()).fingerprint() == local.fingerprint()
    # run_pipeline names the runner that actually trains (here the in-process default)
    cfg_ray = tiny("resources.runner=ray", "specialist.optim.epochs=1", "train.epochs=1", "baselines.vanilla_long=false",
                   "baselines.delta_all=false")
    metrics = run_pipeline(cfg_ray, tmp_path / "run", log=lambda s: None)
    assert load_config(PipelineConfig, tmp_path / "run" / "config.yaml").resources.runner == "local"
    assert all("-" in Path(f).name for f in metrics["tasks"].values())
    assert "runner" not in json.loads((Path(metrics["tasks"]["vanilla"]) / "task.json").read_text())["identity"]
