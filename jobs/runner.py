"""``RayRunner``: every task is its own Ray Train run (``TorchTrainer``, Train V2).

The driver sizes and fits; the worker function (:func:`train_loop`) only runs the core task
inside a :class:`supersub.tasks.TaskContext`.

* Concurrency: one driver thread per task calls ``fit()``. Never from actors that hold CPUs:
  their trainers would wait for the CPUs the actors keep (see ../shared/ray-notes.md). A
  semaphore lets as many runs start as the cluster's CPUs/GPUs hold, so that no run waits out
  Train's worker-group start timeout.
* Resumption: the run name is the task's folder name (its fingerprint), and a Train V2 run
  restores its checkpoint list from ``storage_path/<name>`` — a rerun, a driver-level retry and
  a restarted worker group (``FailureConfig``) all continue from the last epoch.
* Progress: each worker prints its epoch lines, which reach the driver's console through Ray's
  own log forwarding. Tracking happens in the driver only (:mod:`jobs.epoch_relay`): rank 0's
  reports come back to it, and it logs them live to the task's one run — the same run across
  retries and restarts on other nodes, ended FINISHED, FAILED with the reason, or reused.
* Failures: a task that fails after Train's own restarts is retried by the driver (same name,
  so from its checkpoint); the others are not touched. Tasks still failing are reported
  together at the end (:class:`supersub.runner.TaskFailed`), after the rest have finished.
* Crashes: the driver holds the task's lock (:func:`supersub.runner.task_lock`) around
  its Train run, so a second job on the folder waits and reuses; Ray's run state that cannot be
  read is removed with a line and the task resumes from its own checkpoint; :meth:`RayRunner.stop`
  (SIGINT/SIGTERM) lets no run start after it.
* Outputs: the worker's last report carries the task's output files as a checkpoint, which the
  driver copies into ``task.out_dir`` when the worker ran where that folder is not visible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray._raylet import RAY_NODE_ID_KEY
from ray.train.torch import TorchTrainer

from jobs.epoch_relay import EpochPump
from jobs.visibility import alive_nodes, blind_nodes, node_label
from supersub import atomic
from supersub.config import ConfigError
from supersub.runner import (
    Interrupted,
    NullTracker,
    TaskFailed,
    Tracker,
    begin,
    error_line,
    run_attempt,
    task_lock,
)
from supersub.tasks import SpecialistTask, Task, TaskContext, task_from_dict


def fit_slots(free: dict[str, float], workers: int, cpus: float, gpus: float, reserve_cpus: float = 0.0) -> int:
    """How many runs of ``workers x (cpus, gpus)`` the ``free`` resources hold at once (>= 1);
    ``reserve_cpus`` stay free for other work (Ray Data decoding)."""
    free = {**free, "CPU": free.get("CPU", 0.0) - reserve_cpus}
    fits = [math.floor(free.get(k, 0.0) / (workers * need) + 1e-9) for k, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
    return max(1, min(fits, default=1 << 30))


class RayRunner:
    """Runs tasks as concurrent Ray Train runs (the :class:`supersub.runner.Runner` protocol).

    ``epoch_hook(task, epoch, rank)`` runs in the worker after every epoch's report (tests inject
    failures there); it must be picklable. :meth:`stop` (the job got SIGINT/SIGTERM): no Train
    run starts after it; the running ones end with the driver's Ray connection."""

    kind = "ray"  # what a task's identity names when this runner trains it (see stages.network_task)

    def __init__(
        self,
        resources: Any,  # supersub.pipeline_config.ResourcesConfig
        out_dir: str | Path,
        *,
        data_loader: str = "auto",
        retries: int = 1,
        log=print,
        tracker: Tracker | None = None,
        epoch_hook: Callable[[Task, int, int], None] | None = None,
    ) -> None:
        self.res = resources
        self.out = Path(out_dir).resolve()
        self.storage = resources.storage_path or str(self.out / "ray")
        self.ray_data = data_loader == "ray_data"
        self.retries, self.log = retries, log
        self.tracker = tracker or NullTracker()
        self.epoch_hook = epoch_hook
        self._stop = threading.Event()
        self._log_lock = threading.Lock()
        self._pump: EpochPump | None = None
        nodes = alive_nodes()
        # With several nodes a worker may not see the driver's folders: inputs travel through the
        # object store and outputs come back as the final checkpoint (train_loop).
        self.multi_node = len(nodes) > 1
        self.placement = self._check_visibility(nodes) if self.multi_node else None

    def _check_visibility(self, nodes: list[dict]) -> dict[str, str] | None:
        """Every node must see the storage path (Train persists checkpoints there and the driver
        reads them back): refused, or with ``resources.unshared_paths=pin`` training is kept to
        the nodes that see it (returned as the workers' label selector). ``--out`` is only the
        driver's to write, so a node that cannot see it gets a warning (its bundle cannot be
        served from that path there)."""
        blind = blind_nodes([self.storage, str(self.out)], nodes)
        unseen = blind.get(str(self.out)) or []
        if unseen:
            self.log(f"warning: --out {self.out} is not visible on node(s) {', '.join(map(node_label, unseen))}: "
                     "tasks come back through Ray's checkpoints, but a replica there cannot read its bundle "
                     "(python -m serve ships it; or put --out on a folder every node mounts)")
        cut = blind.get(self.storage) or []
        if not cut:
            return None
        where = f"storage_path {self.storage} is not visible on node(s) {', '.join(map(node_label, cut))}"
        if self.res.unshared_paths == "refuse":
            raise ConfigError(f"{where}: Ray Train's checkpoints written there never reach this driver; use a "
                              "folder every node mounts, s3:// or gs://, or resources.unshared_paths=pin to train "
                              "only on the nodes that see it")
        keep = [n for n in nodes if n not in cut]
        self.log(f"{where}: training only on the {len(keep)} node(s) that see it (resources.unshared_paths=pin)")
        return {RAY_NODE_ID_KEY: f"in({','.join(n['NodeID'] for n in keep)})"}

    # ------------------------------------------------------------------ Runner protocol
    def run(self, tasks: list[Task], resources: Any = None) -> list[dict[str, Any]]:
        res = resources or self.res
        results: dict[str, dict[str, Any]] = {}
        failures: dict[str, BaseException] = {}
        for group in dict.fromkeys(t.resources for t in tasks):  # networks, then specialists
            batch = [t for t in tasks if t.resources == group]
            done, failed = self._run_all(batch, res.scaling(group))
            results.update(done)
            failures.update(failed)
        if failures:
            raise TaskFailed(failures, len(tasks), {t.name: t.out_dir for t in tasks})
        return [results[t.out_dir] for t in tasks]

    def stop(self) -> None:
        """No Train run starts after this; a driver thread waiting for a lock or a slot gives up."""
        self._stop.set()

    def _say(self, line: str) -> None:
        with self._log_lock:  # one whole line at a time from the concurrent driver threads
            self.log(line)

    # ------------------------------------------------------------------ driver side
    def _run_all(self, tasks: list[Task], scaling: tuple[int, float, float]):
        reserve = 0.0
        if self.ray_data:  # Ray Data decodes in tasks that need CPUs beside the training workers
            from jobs.ray_data import DECODE_CPUS

            reserve = DECODE_CPUS
        gate = threading.Semaphore(fit_slots(dict(ray.available_resources()), *scaling, reserve_cpus=reserve))
        results: dict[str, dict[str, Any]] = {}
        errors: dict[str, BaseException] = {}
        shipped = self._ship_inputs(tasks) if self.multi_node else {}

        def work(task: Task) -> None:
            try:
                # The lock before a slot: a task another job is training holds no slot here.
                with task_lock(task, self._say, stop=self._stop.is_set):
                    if task.done():
                        self._say(f"{task.name}: finished meanwhile by another process, reused ({task.out_dir})")
                        results[task.out_dir] = task.result()
                        return
                    with gate:
                        if self._stop.is_set():
                            return  # stopped while waiting for a slot: never started
                        begin(task)
                        results[task.out_dir] = self._run_one(task, scaling, shipped)
            except Interrupted:
                pass
            except BaseException as e:  # noqa: BLE001 - reported together by run()
                errors[task.name] = e

        threads = [threading.Thread(target=work, args=(t,), name=f"fit-{t.name}", daemon=True) for t in tasks]
        # The pump lives while these runs do: a thread still waiting on Ray after the job's
        # ray.shutdown() would bring Ray up again, or kill the process.
        self._pump = EpochPump(self._say)
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            self._pump.close()
        if self._stop.is_set():
            raise Interrupted(2)
        return results, errors

    def _run_one(self, task: Task, scaling, shipped) -> dict[str, Any]:
        """The task's Train run, retried from its checkpoint; its one tracker run (in this
        driver) gets every attempt's epochs and ends with how the last one went."""
        logger = self.tracker.task_logger(task)
        if logger:
            logger.started()
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise Interrupted(2)
            self._check_run_state(task)
            self._say(f"{task.name}: {'started' if attempt == 0 else f'retry {attempt}'} as Ray Train run {Path(task.out_dir).name}")
            try:
                result, reused_from = self._fit(task, scaling, shipped, logger)
            except Exception as e:
                if self._stop.is_set():  # the job was stopped under it: the job marks its runs KILLED
                    raise Interrupted(2) from e
                reason = error_line(e, task.out_dir)
                if attempt == self.retries:
                    if logger:
                        logger.failed(reason)
                    raise
                if logger:
                    logger.retrying(attempt + 1, reason)
                self._say(f"{task.name}: run failed ({reason}); retrying from its checkpoint")
                continue
            if reused_from:
                self._say(f"{task.name}: reused from {reused_from} (a finished run of the same task in the storage path)")
            else:
                self._say(f"{task.name}: done")
            if logger:
                logger.finished(result, reused_from=reused_from)
            return result
        raise AssertionError

    def _check_run_state(self, task: Task) -> None:
        """Ray's run state of the task (``<storage>/<run name>``) readable, or removed with a line
        saying so: Train V2 cannot restore from an unreadable ``checkpoint_manager_snapshot.json``
        (a full disk leaves it empty), and would fail every rerun. Without it the run starts
        afresh and the task resumes from its own last checkpoint (``<task>/checkpoint``)."""
        if "://" in self.storage:
            return  # remote storage: Ray's to read
        state = Path(self.storage) / Path(task.out_dir).name
        for p in sorted(state.glob("*.json")) if state.is_dir() else []:
            try:
                json.loads(p.read_text())
                continue
            except (ValueError, OSError) as e:
                why = "empty" if p.stat().st_size == 0 else f"{type(e).__name__}: {e}"
            own = Path(task.out_dir) / "checkpoint" / "checkpoint.pt"
            since = f"its own last checkpoint ({own})" if own.is_file() else "the start (it has no checkpoint of its own)"
            self._say(f"{task.name}: Ray's run state {p} is unreadable ({why}); removed it, the task resumes from {since}")
            shutil.rmtree(state, ignore_errors=True)
            return

    def _fit(self, task: Task, scaling, shipped, logger) -> tuple[dict[str, Any], str | None]:
        """The task's result, and the folder of the earlier job whose finished run it restored
        (same name in a shared storage path), if it did."""
        from jobs.console import train_logging

        workers, cpus, gpus = scaling
        resources = {"CPU": cpus} | ({"GPU": gpus} if gpus > 0 else {})
        name = Path(task.out_dir).name  # <task name>-<fingerprint>: stable across reruns
        config = {
            "task": task.to_dict(),
            "epoch_hook": self.epoch_hook,
            "inputs": shipped,
            "scratch_outputs": self.multi_node,
        }
        datasets = None
        if self.ray_data:
            from jobs.ray_data import build_datasets

            datasets, config["ray_data_specs"] = build_datasets(task)
        callbacks = [self._pump.relay(task.out_dir, logger.epoch)] if logger else []
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources,
                                                   label_selector=self.placement),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=self.storage,
                # controller_failure_limit: a worker group that cannot start (Train's start
                # timeout) is retried a bounded number of times, not forever (the default).
                failure_config=ray.train.FailureConfig(max_failures=self.res.max_failures,
                                                       controller_failure_limit=self.res.max_failures),
                logging_config=train_logging(),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
            ),
            datasets=datasets,
        )
        result = trainer.fit()
        self._pump.flush()
        reused_from = None
        if not task.done():
            reused_from = self._materialise(result.checkpoint, Path(task.out_dir))
            why = task.damage()
            if why is not None:
                raise RuntimeError(f"{task.name}: {why} in {task.out_dir} after its Ray run")
        out = task.result()
        out["ray"] = {"run_name": name, "storage_path": self.storage, "node_id": out.get("node_id")}
        return out, reused_from

    @staticmethod
    def _materialise(checkpoint, out_dir: Path) -> str | None:
        """Copies the final checkpoint's files (the task's outputs) into ``out_dir``, metrics.json
        last: a folder with metrics.json is a finished task. Returns the folder the checkpoint's
        task was written for when that is another one: a run restored from another job's state."""
        if checkpoint is None:
            raise RuntimeError(f"{out_dir}: the run finished without reporting its outputs")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=out_dir))
        try:
            checkpoint.to_directory(str(tmp))
            origin = _written_for(tmp / "metrics.json")
            files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != "task.json" and _output_copy(p))
            for p in sorted(files, key=lambda p: p.name == "metrics.json"):
                os.replace(p, out_dir / p.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        origin = os.path.normpath(origin) if origin else None  # a relative --out joined to the cwd holds ".."
        return origin if origin and origin != os.path.normpath(out_dir) else None

    def _ship_inputs(self, tasks: list[Task]) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- worker side
def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: one core task inside a :class:`TaskContext`."""
    scratch: list[str] = []  # this worker's temporary folders, removed when it is done
    try:
        _train_loop(config, _localise(task_from_dict(config["task"]), config, scratch), scratch)
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def _train_loop(config: dict[str, Any], task: Task, scratch: list[str]) -> None:
    import ray.train.torch

    from jobs.console import quiet_worker

    # The task prints one line an epoch; Ray Train's own per-report INFO lines would bury them.
    quiet_worker()

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix="supersub-resume-"))
        scratch.append(str(resume_dir))
        checkpoint.to_directory(str(resume_dir))
        if (resume_dir / "metrics.json").is_file():
            return  # finished earlier: its outputs are the latest checkpoint, which the driver reads
    hook = config.get("epoch_hook")

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)  # rank 0's row reaches the driver's tracker
        if hook:
            hook(task, int(metrics["epoch"]), rank)

    make_loader = None
    if config.get("ray_data_specs"):
        from jobs.ray_data import worker_loader_factory

        make_loader = worker_loader_factory(config["ray_data_specs"], task, ray.train.torch.get_device(), world)
    ctx = TaskContext(
        device=ray.train.torch.get_device(), rank=rank, world_size=world, prepare_model=ray.train.torch.prepare_model,
        report=report, log=lambda s: print(s if world == 1 else f"[rank {rank}] {s}", flush=True),
        make_loader=make_loader, resume_dir=resume_dir,
    )
    result = run_attempt(task, ctx, None)  # the driver tracks it
    # The outputs as the last checkpoint: the driver copies them into task.out_dir when this
    # worker ran where that folder is not visible. Every rank reports (report is a barrier).
    final = {"final": 1, "val_acc": result.get("val_acc"), "epoch": len(result.get("history", []))}
    if rank != 0:
        ray.train.report(final)
        return
    result_file = Path(task.out_dir) / "metrics.json"
    if result_file.is_file():  # where it ran and for which job's folder, for the record
        doc = json.loads(result_file.read_text())
        doc["node_id"] = ray.get_runtime_context().get_node_id()
        doc["trained_for"] = config["task"]["out_dir"]
        atomic.write_text(result_file, json.dumps(doc, indent=2))
    with tempfile.TemporaryDirectory(prefix="supersub-outputs-") as tmp:
        for p in Path(task.out_dir).iterdir():
            if p.is_file() and _output_copy(p):
                shutil.copy2(p, tmp)
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _written_for(result_file: Path) -> str | None:
    """The folder a task's ``metrics.json`` says it was trained for (``trained_for``)."""
    try:
        return json.loads(result_file.read_text()).get("trained_for")
    except (OSError, ValueError, AttributeError):
        return None


def _output_copy(p: Path) -> bool:
    """Whether a file of a task's folder travels with its outputs (not the lock, not a temp file)."""
    return not p.name.startswith(".") and not atomic.temp_pattern.match(p.name)


def _localise(task: Task, config: dict[str, Any], scratch: list[str]) -> Task:
    """On a multi-node cluster: the task's input folders fetched from the object store into a
    local folder, and its outputs written to a local scratch folder."""
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


__all__ = ["RayRunner", "TaskContext", "fit_slots", "train_loop"]
