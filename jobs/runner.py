"""``RayRunner``: every stage task is its own Ray Train run (``TorchTrainer``, Train V2).

The driver sizes and fits; the worker function (:func:`train_loop`) only wraps the core's stage
function in a :class:`supersub.stages.StageContext`.

* Concurrency: one driver thread per task calls ``fit()``. Never from actors that hold CPUs:
  their trainers would wait for the CPUs the actors keep (see ../shared/ray-notes.md). A
  semaphore lets as many runs start as the cluster's CPUs/GPUs hold, so that no run waits out
  Train's worker-group start timeout.
* Resumption: the run name is stable per output folder and task, and a Train V2 run restores
  its checkpoint list from ``storage_path/<name>`` — a rerun, a driver-level retry and a
  restarted worker group (``FailureConfig``) all continue from the last epoch.
* Failures: a task that fails after Train's own restarts is retried by the driver (same name,
  so from its checkpoint); the others are not touched. Tasks still failing are reported
  together at the end, after the rest have finished and saved their outputs.
* Outputs: the worker's last report carries the stage's output files as a checkpoint, which
  the driver copies into ``task.out_dir`` when the worker ran where that folder is not visible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from supersub.stages import (
    NetworkTask,
    SpecialistTask,
    StageContext,
    finetune_specialist,
    is_done,
    network_task_from_dict,
    specialist_task_from_dict,
    task_to_dict,
    train_network,
)
from supersub.train import load_checkpoint

# Test-only failure injection: "<task name>:<epoch>" makes that task's rank-0 worker process exit
# once, right after the given epoch's checkpoint is registered (see _maybe_fail).
FAIL_ONCE_ENV = "SUPERSUB_FAIL_ONCE"


class StageFailed(RuntimeError):
    """Some tasks failed after every retry; the others finished and were saved."""


class RayRunner:
    """Runs stage tasks as concurrent Ray Train runs (the :class:`supersub.pipeline.Runner` protocol)."""

    def __init__(
        self,
        resources: Any,  # supersub.pipeline.ResourcesConfig
        out_dir: str | Path,
        *,
        data_loader: str = "auto",
        retries: int = 1,
        log=print,
        progress_every: float = 15.0,
    ) -> None:
        self.res = resources
        self.out = Path(out_dir).resolve()
        self.storage = resources.storage_path or str(self.out / "ray")
        self.ray_data = data_loader == "ray_data"
        self.retries, self.log, self.progress_every = retries, log, progress_every
        self.fail_once = os.environ.get(FAIL_ONCE_ENV, "")
        nodes = [n for n in ray.nodes() if n["Alive"]]
        # With several nodes a worker may not see the driver's folders: inputs travel through the
        # object store and outputs come back as the final checkpoint (train_loop).
        self.multi_node = len(nodes) > 1
        if self.multi_node and "://" not in self.storage:
            self.log(f"warning: {len(nodes)} nodes but storage_path {self.storage} is a local path; "
                     "use shared storage (NFS, s3://, gs://) so that every node's checkpoints reach the driver")

    # ------------------------------------------------------------------ Runner protocol
    def run_networks(self, tasks: list[NetworkTask]) -> list[dict[str, Any]]:
        scaling = (self.res.num_workers, self.res.cpus_per_worker, self.res.gpus_per_worker)
        return self._run_all("network", tasks, scaling)

    def run_specialists(self, tasks: list[SpecialistTask]) -> list[dict[str, Any]]:
        scaling = (self.res.specialist_workers, self.res.specialist_cpus, self.res.specialist_gpus)
        return self._run_all("specialist", tasks, scaling)

    # ------------------------------------------------------------------ driver side
    def _slots(self, workers: int, cpus: float, gpus: float, tasks: int) -> int:
        """How many runs of this size the free resources hold at once (at least one)."""
        free = dict(ray.available_resources())
        if self.ray_data:  # Ray Data decodes in tasks that need CPUs beside the training workers
            from jobs.ray_data import DECODE_CPUS

            free["CPU"] = free.get("CPU", 0.0) - DECODE_CPUS
            if free["CPU"] < workers * cpus:
                self.log(f"warning: data.loader=ray_data: {workers} x {cpus:g} CPU of training workers leave "
                         f"less than {DECODE_CPUS} CPU for decoding; the run may wait forever")
        fits = [math.floor(free.get(k, 0.0) / (workers * need) + 1e-9) for k, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
        return max(1, min(fits, default=tasks))

    def _run_all(self, kind: str, tasks: list, scaling: tuple[int, float, float]) -> list[dict[str, Any]]:
        if not tasks:
            return []
        progress = Progress.remote()
        display = _Display(kind, [t.name for t in tasks], progress, self.log, self.progress_every)
        gate = threading.Semaphore(self._slots(*scaling, len(tasks)))
        results: dict[str, dict[str, Any]] = {}
        errors: dict[str, BaseException] = {}
        shipped = self._ship_inputs(tasks) if self.multi_node else {}

        def work(task) -> None:
            with gate:
                try:
                    results[task.name] = self._run_one(kind, task, scaling, progress, display, shipped)
                except BaseException as e:  # noqa: BLE001 - reported together below
                    errors[task.name] = e
                    display.set(task.name, "failed")

        threads = [threading.Thread(target=work, args=(t,), name=f"fit-{t.name}", daemon=True) for t in tasks]
        for t in threads:
            t.start()
        display.run_until(lambda: not any(t.is_alive() for t in threads))
        ray.kill(progress)
        if errors:
            lines = "\n".join(f"  {name}: {e!r}" for name, e in errors.items())
            raise StageFailed(f"{len(errors)} of {len(tasks)} {kind} task(s) failed after retries "
                              f"(the others are saved; rerun with the same --out to retry only these):\n{lines}")
        return [results[t.name] for t in tasks]

    def run_name(self, task) -> str:
        """Stable per output folder and task: a rerun finds its checkpoints under this name."""
        digest = hashlib.sha1(str(Path(task.out_dir).resolve()).encode()).hexdigest()[:10]
        return f"{task.name}-{digest}"

    def _run_one(self, kind, task, scaling, progress, display, shipped) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            display.set(task.name, "running" if attempt == 0 else f"retry {attempt}")
            try:
                result = self._fit(kind, task, scaling, progress, shipped)
                display.set(task.name, "done")
                return result
            except Exception as e:
                if attempt == self.retries:
                    raise
                self.log(f"{task.name}: run failed ({type(e).__name__}: {str(e)[:300]}); retrying from its checkpoint")
        raise AssertionError

    def _fit(self, kind, task, scaling, progress, shipped) -> dict[str, Any]:
        workers, cpus, gpus = scaling
        resources = {"CPU": cpus} | ({"GPU": gpus} if gpus > 0 else {})
        name = self.run_name(task)
        config = {
            "kind": kind,
            "task": task_to_dict(task),
            "progress": progress,
            "inputs": shipped,
            "scratch_outputs": self.multi_node,
            "fail_after_epoch": self._fail_epoch(task),
            "fail_marker": str(Path(self.storage) / f".{name}.failed_once") if "://" not in self.storage else None,
        }
        datasets = None
        if self.ray_data:
            from jobs.ray_data import build_datasets

            datasets, config["ray_data_specs"] = build_datasets(kind, task)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=self.storage,
                failure_config=ray.train.FailureConfig(max_failures=self.res.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
            datasets=datasets,
        )
        result = trainer.fit()
        if not is_done(task.out_dir):
            self._materialise(result.checkpoint, Path(task.out_dir))
        out = json.loads((Path(task.out_dir) / "metrics.json").read_text())
        state = ray.get(progress.get.remote(), timeout=30)["state"].get(task.name, {})
        out["ray"] = {"run_name": name, "storage_path": self.storage, "node_ids": state.get("node_ids", []),
                      "starts": state.get("starts", [])}
        return out

    def _fail_epoch(self, task) -> int | None:
        name, _, epoch = self.fail_once.partition(":")
        return int(epoch) if name == task.name and epoch.isdigit() else None

    @staticmethod
    def _materialise(checkpoint, out_dir: Path) -> None:
        """Copies the final checkpoint's files (the stage outputs) into ``out_dir``, metrics.json
        last: a folder with metrics.json is a finished stage."""
        if checkpoint is None:
            raise RuntimeError(f"{out_dir}: the run finished without reporting its outputs")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=out_dir))
        try:
            checkpoint.to_directory(str(tmp))
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            for p in sorted(files, key=lambda p: p.name == "metrics.json"):
                os.replace(p, out_dir / p.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _ship_inputs(self, tasks: list) -> dict[str, Any]:
        """Object refs of the folders the tasks read (manifest, resident/init/vanilla networks)."""
        folders = set()
        for t in tasks:
            folders.add(t.data.manifest_dir)
            folders.update(d for d in (getattr(t, "resident_dir", None), getattr(t, "init_dir", None),
                                       getattr(t, "vanilla_dir", None)) if d)
        shipped = {}
        for folder in sorted(f for f in folders if Path(f).is_dir()):
            files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
            shipped[folder] = ray.put(files)
        return shipped


# ----------------------------------------------------------------------------- progress
@ray.remote(num_cpus=0)
class Progress:
    """Where workers post epochs and node ids, and the driver's display reads them."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.lines: list[str] = []

    def update(self, name: str, node_id: str | None = None, line: str | None = None, start: int | None = None,
               **fields: Any) -> None:
        s = self.state.setdefault(name, {"node_ids": [], "starts": []})
        if node_id and node_id not in s["node_ids"]:
            s["node_ids"].append(node_id)
        if start is not None:  # the first epoch of a worker group (a restarted one resumes later)
            s["starts"].append(start)
        s.update(fields)
        if line:
            self.lines.append(line)

    def get(self, since: int = 0) -> dict[str, Any]:
        return {"state": self.state, "lines": self.lines[since:]}


class _Display:
    """Prints the workers' epoch lines as they come and, every ``every`` seconds or when a task
    changes state, one status line: stage, done/running/failed, epochs, images/s."""

    def __init__(self, kind: str, names: list[str], actor, log, every: float) -> None:
        self.kind, self.actor, self.log, self.every = kind, actor, log, every
        self.status = dict.fromkeys(names, "waiting")
        self.changed = True
        self.seen = 0
        self.t0 = time.monotonic()

    def set(self, name: str, status: str) -> None:
        self.status[name], self.changed = status, True

    def run_until(self, finished) -> None:
        last = 0.0
        while True:
            done = finished()
            try:
                snap = ray.get(self.actor.get.remote(self.seen), timeout=10)
            except Exception:  # noqa: BLE001 - the display never stops a run
                snap = {"state": {}, "lines": []}
            for line in snap["lines"]:
                self.log(line)
            self.seen += len(snap["lines"])
            now = time.monotonic()
            if done or self.changed or now - last >= self.every:
                self.log(self._line(snap["state"]))
                self.changed, last = False, now
            if done:
                return
            time.sleep(1.0)

    def _line(self, state: dict[str, Any]) -> str:
        counts = {k: sum(v == k for v in self.status.values()) for k in ("done", "failed", "waiting")}
        running = [n for n, v in self.status.items() if v not in counts]
        parts = []
        for n in running:
            s = state.get(n, {})
            epoch = f"epoch {s['epoch']}/{s['epochs']} {s['images_per_s']:.0f} img/s" if "epoch" in s else "starting"
            parts.append(f"{n} ({self.status[n]}) {epoch}")
        return (f"[{self.kind}s {time.monotonic() - self.t0:5.0f}s] done {counts['done']}/{len(self.status)}, "
                f"running {len(running)}, waiting {counts['waiting']}, failed {counts['failed']}"
                + (" | " + "; ".join(parts) if parts else ""))


# ----------------------------------------------------------------------------- worker side
def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: one core stage function inside a :class:`StageContext`."""
    kind, progress = config["kind"], config["progress"]
    from_dict = network_task_from_dict if kind == "network" else specialist_task_from_dict
    scratch: list[str] = []  # this worker's temporary folders, removed when it is done
    try:
        _train_loop(config, kind, progress, _localise(from_dict(config["task"]), config, scratch), scratch)
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def _train_loop(config: dict[str, Any], kind: str, progress, task, scratch: list[str]) -> None:
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    progress.update.remote(task.name, node_id=ray.get_runtime_context().get_node_id())

    resume_dir, start = None, 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix="supersub-resume-"))
        scratch.append(str(resume_dir))
        checkpoint.to_directory(str(resume_dir))
        if (resume_dir / "metrics.json").is_file():
            return  # finished earlier: its outputs are the latest checkpoint, which the driver reads
        start = load_checkpoint(resume_dir / "checkpoint.pt")["epoch"] + 2  # saved after epoch index k
    if rank == 0:
        progress.update.remote(task.name, start=start)

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            epochs = task.optim.epochs
            line = (f"{task.name} epoch {metrics['epoch']}/{epochs}: loss {metrics['train_loss']:.3f} "
                    f"val acc {metrics['val_acc']:.1f}% {metrics['images_per_s']:.0f} img/s")
            progress.update.remote(task.name, line=line, epoch=metrics["epoch"], epochs=epochs,
                                   images_per_s=metrics["images_per_s"])
        _maybe_fail(config, metrics["epoch"], rank)

    device = ray.train.torch.get_device()
    make_loader = None
    if config.get("ray_data_specs"):
        from jobs.ray_data import worker_loader_factory

        make_loader = worker_loader_factory(config["ray_data_specs"], task, device, world)
    ctx = StageContext(
        device=device, rank=rank, world_size=world, prepare_model=ray.train.torch.prepare_model, report=report,
        log=lambda s: print(f"[{task.name} rank {rank}] {s}", flush=True), make_loader=make_loader,
        resume_dir=resume_dir,
    )
    result = (train_network if kind == "network" else finetune_specialist)(task, ctx)
    # The outputs as the last checkpoint: the driver copies them into task.out_dir when this
    # worker ran where that folder is not visible. Every rank reports (report is a barrier).
    final = {"final": 1, "val_acc": result["val_acc"], "epoch": len(result["history"])}
    if rank != 0:
        ray.train.report(final)
        return
    with tempfile.TemporaryDirectory(prefix="supersub-outputs-") as tmp:
        for p in Path(task.out_dir).iterdir():
            if p.is_file():
                shutil.copy2(p, tmp)
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _localise(task, config: dict[str, Any], scratch: list[str]):
    """On a multi-node cluster: the task's input folders fetched from the object store into a
    local folder, and its outputs written to a local scratch folder."""
    import dataclasses

    shipped = config.get("inputs") or {}
    root = Path(tempfile.mkdtemp(prefix="supersub-inputs-")) if shipped else None
    if root is not None:
        scratch.append(str(root))

    def local(folder: str | None) -> str | None:
        if folder is None or folder not in shipped:
            return folder
        target = root / hashlib.sha1(folder.encode()).hexdigest()[:12]
        target.mkdir(exist_ok=True)
        for name, data in ray.get(shipped[folder], timeout=300).items():
            (target / name).write_bytes(data)
        return str(target)

    task.data = dataclasses.replace(task.data, manifest_dir=local(task.data.manifest_dir))
    if isinstance(task, SpecialistTask):
        task.resident_dir, task.init_dir, task.vanilla_dir = map(local, (task.resident_dir, task.init_dir, task.vanilla_dir))
    if config.get("scratch_outputs"):
        task.out_dir = tempfile.mkdtemp(prefix=f"supersub-{task.name}-")
        scratch.append(task.out_dir)
    return task


def _maybe_fail(config: dict[str, Any], epoch: int, rank: int) -> None:
    """Test-only failure injection (``SUPERSUB_FAIL_ONCE=<task>:<epoch>``): the rank-0 worker
    process exits once, as a lost worker would, after waiting until the controller has
    committed this epoch's checkpoint (a report is registered asynchronously). Train's
    FailureConfig then restarts the worker group, which resumes from that checkpoint."""
    if rank != 0 or config.get("fail_after_epoch") != epoch or not config.get("fail_marker"):
        return
    marker = Path(config["fail_marker"])
    if marker.exists():
        return
    from ray.train import CheckpointConsistencyMode

    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failure injected after epoch {epoch}\n")
    print(f"injected failure: worker process exits after epoch {epoch}", flush=True)
    os._exit(1)
