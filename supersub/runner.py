"""Running tasks: which to run, where, and who hears about them.

* :func:`run_tasks` is what a job calls: it stamps each task's folder, reuses the tasks that
  finished earlier with the same fingerprint, hands the others to a runner, and returns every
  task's result in order.
* A *runner* has one method, ``run(tasks, resources)``. :class:`LocalRunner` (here) runs them
  in this process, one after another — a GPU machine without Ray. ``jobs.runner.RayRunner``
  runs each as a Ray Train run, concurrently. Both finish every task they can and then raise
  :class:`TaskFailed` naming the ones that failed after their retries.
* A *tracker* is told about each task as it runs (:class:`Tracker`): ``jobs.tracking`` logs to
  MLflow; :class:`NullTracker` (here) records nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from supersub.config import dotted_keys
from supersub.tasks import Task, TaskContext
from supersub.tasks.base import TASK_FILE
from supersub.train import pick_device


class TaskFailed(RuntimeError):
    """Some tasks failed after every retry; the others finished and were saved."""

    def __init__(self, failures: dict[str, BaseException], total: int) -> None:
        self.failures = failures
        first_name, first = next(iter(failures.items()))
        lines = "\n".join(f"  {name}: {type(e).__name__}: {str(e)[:500]}" for name, e in failures.items())
        super().__init__(
            f"{len(failures)} of {total} task(s) failed after retries (the others are saved; rerun with the same "
            f"--out to retry only these):\n{lines}"
        )
        self.first_line = f"{first_name} failed: {type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"


class TaskLogger(Protocol):
    """What a tracker records about one attempt of one task, called where the task runs."""

    def started(self) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def finished(self, result: dict[str, Any]) -> None: ...

    def failed(self, reason: str) -> None: ...


class Tracker(Protocol):
    def task_logger(self, task: Task) -> TaskLogger | None:
        """A logger for one attempt of ``task`` (picklable: a Ray worker calls it)."""

    def task_failed(self, task: Task, reason: str) -> None:
        """The task's attempt died where its own logger could not say so."""

    def summary(self, metrics: dict[str, Any], artifacts: list[Any]) -> None: ...


class NullTracker:
    def task_logger(self, task: Task) -> None:
        return None

    def task_failed(self, task: Task, reason: str) -> None:
        pass

    def summary(self, metrics: dict[str, Any], artifacts: list[Any]) -> None:
        pass


class Runner(Protocol):
    def run(self, tasks: list[Task], resources: Any = None) -> list[dict[str, Any]]: ...


def run_tasks(runner: Runner, tasks: list[Task], resources: Any = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Each task's result, in order: read back when it finished earlier with the same fingerprint,
    else run (all pending tasks in one call, so the runner may run them concurrently)."""
    pending = []
    for t in tasks:
        if t.done():
            log(f"{t.name}: done earlier with the same inputs and settings, reused ({t.out_dir})")
            continue
        changed = _changed_since(t)
        if changed:
            log(f"{t.name}: {changed}; training anew in {t.out_dir} (the earlier one stays)")
        t.stamp()
        pending.append(t)
    if pending:
        runner.run(pending, resources)
        for t in pending:
            if not t.done():
                raise RuntimeError(f"{t.name} returned but left no result in {t.out_dir}")
    return [t.result() for t in tasks]


@contextlib.contextmanager
def task_lock(task: Task) -> Iterator[None]:
    """An exclusive lock on the task's folder (``.lock``), held while it runs: two processes that
    need the same task train it once; the second waits, then finds it done."""
    Path(task.out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(task.out_dir) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_attempt(task: Task, ctx: TaskContext, logger: TaskLogger | None) -> dict[str, Any]:
    """One attempt of ``task`` in ``ctx``, its logger told how it went (where the task runs)."""
    try:
        result = task.run(ctx)
    except BaseException as e:
        if logger:
            logger.failed(f"{type(e).__name__}: {e}")
        raise
    if logger:
        logger.finished(result)
    return result


def _changed_since(task: Task) -> str | None:
    """What differs from the latest earlier task of the same name beside it, if any."""
    out = Path(task.out_dir)
    earlier = sorted((p for p in out.parent.glob(f"{task.name}-*") if p != out and (p / TASK_FILE).is_file()),
                     key=lambda p: p.stat().st_mtime)
    if not earlier:
        return None
    old = json.loads((earlier[-1] / TASK_FILE).read_text()).get("identity", {})
    new = task.identity()
    flat_old, flat_new = dotted_keys(old), dotted_keys(new)
    diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    return f"{', '.join(diff[:4]) + (', ...' if len(diff) > 4 else '')} changed since {earlier[-1].name}"


class LocalRunner:
    """Runs every task in this process, one after another (no Ray)."""

    def __init__(self, device: str = "auto", retries: int = 1, log: Callable[[str], None] = print,
                 tracker: Tracker | None = None, epoch_hook: Callable[[Task, int], None] | None = None) -> None:
        self.device, self.retries, self.log = pick_device(device), retries, log
        self.tracker = tracker or NullTracker()
        self.epoch_hook = epoch_hook  # tests inject failures here

    def _attempt(self, task: Task) -> dict[str, Any]:
        with task_lock(task):  # another process (a study's runs side by side) may be at it
            if task.done():
                self.log(f"{task.name}: finished meanwhile by another process, reused ({task.out_dir})")
                return task.result()
            self.log(f"{task.name}: running in {task.out_dir}")
            return self._run_here(task)

    def _run_here(self, task: Task) -> dict[str, Any]:
        logger = self.tracker.task_logger(task)
        if logger:
            logger.started()

        def report(row: dict[str, Any], ckpt: Any) -> None:
            if logger:
                logger.epoch(row)
            if self.epoch_hook:
                self.epoch_hook(task, int(row["epoch"]))

        return run_attempt(task, TaskContext(device=self.device, log=self.log, report=report), logger)

    def run(self, tasks: list[Task], resources: Any = None) -> list[dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        failures: dict[str, BaseException] = {}
        for task in tasks:
            for attempt in range(self.retries + 1):
                try:
                    results[task.out_dir] = self._attempt(task)
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # a failed task is retried from its checkpoint, then reported
                    if attempt == self.retries:
                        failures[task.name] = e
                    else:
                        self.log(f"{task.name} failed ({type(e).__name__}: {e}); retrying from its last checkpoint")
        if failures:
            raise TaskFailed(failures, len(tasks))
        return [results[t.out_dir] for t in tasks]
