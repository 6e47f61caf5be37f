"""Running tasks: which to run, where, and who hears about them.

* :func:`run_tasks` is what a job calls: it reuses the tasks that finished earlier with the same
  fingerprint and whose recorded outputs check out (a damaged one is retrained, with one line
  saying which file), hands the others to a runner, and returns every task's result in order.
  A runner runs a task under its lock (:func:`task_lock`) and stamps its folder (:func:`begin`)
  there, so two jobs on one folder train each task once.
* A *runner* has one method, ``run(tasks, resources)``. :class:`LocalRunner` (here) runs them
  in this process, one after another — a GPU machine without Ray. ``jobs.runner.RayRunner``
  runs each as a Ray Train run, concurrently. Both finish every task they can and then raise
  :class:`TaskFailed` naming the ones that failed after their retries.
* A *tracker* is told about each task as it runs (:class:`Tracker`): ``jobs.tracking`` logs to
  MLflow; :class:`NullTracker` (here) records nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from supersub import atomic
from supersub.config import dotted_keys
from supersub.epoch import pick_device
from supersub.tasks import Task, TaskContext
from supersub.tasks.base import LOCK_FILE, RESULT_FILE, TASK_FILE


class TaskFailed(RuntimeError):
    """Some tasks failed after every retry; the others finished and were saved. Each is named
    with its cause (:func:`error_line`); ``folders`` (task name → folder) names the place of a
    full disk when the error itself does not."""

    def __init__(self, failures: dict[str, BaseException], total: int, folders: dict[str, str] | None = None) -> None:
        self.failures = failures
        folders = folders or {}
        causes = {name: error_line(e, folders.get(name)) for name, e in failures.items()}
        lines = "\n".join(f"  {name}: {cause}" for name, cause in causes.items())
        super().__init__(
            f"{len(failures)} of {total} task(s) failed after retries (the others are saved; rerun with the same "
            f"--out to retry only these):\n{lines}"
        )
        first_name = next(iter(failures))
        self.first_line = f"{first_name} failed: {causes[first_name]}"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the job stops; what finished stays, a rerun continues."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
        super().__init__(signal.Signals(signum).name)


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it wraps: ``__cause__`` / ``__context__``, a Ray error's ``cause``, a Ray
    Train worker group's per-rank errors."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        yield x
        failures = getattr(x, "worker_failures", None)
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
        todo += list(failures.values()) if isinstance(failures, dict) else []


_NO_SPACE = re.compile(r"No space left on device(?::? '([^']+)')?|StorageFull")
_EXC_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit|Failure)\b[^:]*:")


def _real_name(path: str | Path | None) -> str:
    """A file's own name for its temporary one (``model.safetensors.tmp123`` → ``model.safetensors``)."""
    if path is None:
        return "the device"
    m = atomic.temp_pattern.match(Path(path).name)
    return str(Path(path).with_name(m["stem"])) if m else str(path)


def error_line(e: BaseException, where: str | Path | None = None) -> str:
    """The cause of a failure in one line: ``no space left on <path>`` for a full disk (``where``
    when the error names no path), else the exception's own message — the last line of a
    worker's traceback, where the exception that ended it is — never a cut-off first part."""
    texts = []
    for x in _causes(e):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return f"no space left on {_real_name(x.filename or where)}"
        texts.append(str(x))
    for text in texts:
        m = _NO_SPACE.search(text)
        if m:
            return f"no space left on {_real_name(m.group(1) or where)}"
    if where is not None and Path(where).exists() and atomic.disk_full(where):  # an error that hides it
        return f"no space left on {where} ({type(e).__name__} while it was full)"
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if _EXC_LINE.match(last) and len(lines) > 1 else f"{type(e).__name__}: {last}".rstrip(": ")


class TaskLogger(Protocol):
    """What a tracker records about one task, called by the job's own process (never a worker):
    one run per task, however many attempts it takes."""

    def started(self) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def retrying(self, attempt: int, reason: str) -> None: ...

    def finished(self, result: dict[str, Any], reused_from: str | None = None) -> None: ...

    def failed(self, reason: str) -> None: ...


class Tracker(Protocol):
    def task_logger(self, task: Task) -> TaskLogger | None:
        """The logger of ``task``'s run."""

    def summary(self, metrics: dict[str, Any], artifacts: list[Any]) -> None: ...


class NullTracker:
    def task_logger(self, task: Task) -> None:
        return None

    def summary(self, metrics: dict[str, Any], artifacts: list[Any]) -> None:
        pass


class Runner(Protocol):
    def run(self, tasks: list[Task], resources: Any = None) -> list[dict[str, Any]]: ...


def adopt_finished(task: Task, roots: Sequence[str | Path], log: Callable[[str], None] = print) -> bool:
    """Copies ``task`` into its folder from the first of ``roots`` (other runs' ``tasks/``
    folders) where the same task (the same fingerprint, so the same inputs and settings) finished
    with its outputs intact. Only into a folder that does not exist yet: a folder of this run is
    never replaced. Files are hard-linked where the filesystem allows (tasks write by rename, so
    the two runs never see each other's later writes), else copied."""
    out = Path(task.out_dir)
    if out.exists():
        return False
    for root in roots:
        src = Path(root) / out.name
        if not src.is_dir() or dataclasses.replace(task, out_dir=str(src)).damage() is not None:
            continue
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # a leftover if we die (remove_leftovers)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=_link_or_copy,
                        ignore=lambda _, names: [n for n in names if n == LOCK_FILE or atomic.temporary(n)])
        try:
            os.rename(tmp, out)
        except OSError:  # another job made the folder meanwhile: its copy, or its run, stands
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        log(f"{task.name}: finished in {src} with the same inputs and settings, reused (linked into {out})")
        return True
    return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def run_tasks(runner: Runner, tasks: list[Task], resources: Any = None, log: Callable[[str], None] = print,
              reuse_from: Sequence[str | Path] = ()) -> list[dict[str, Any]]:
    """Each task's result, in order: read back when it finished earlier with the same fingerprint
    (here, or in one of ``reuse_from``'s task folders: :func:`adopt_finished`), else run (all
    pending tasks in one call, so the runner may run them concurrently)."""
    pending = []
    for t in tasks:
        if adopt_finished(t, reuse_from, log):
            continue
        why = t.damage()
        if why is None:
            log(f"{t.name}: done earlier with the same inputs and settings, reused ({t.out_dir})")
            continue
        if why != "not finished":  # finished once, but its outputs are not what it recorded
            log(f"{t.name}: {why} in {t.out_dir}; training it again (from its last checkpoint)")
        else:
            changed = _changed_since(t)
            if changed:
                log(f"{t.name}: {changed}; training anew in {t.out_dir} (the earlier one stays)")
        pending.append(t)
    if pending:
        runner.run(pending, resources)
        for t in pending:
            if not t.done():
                raise RuntimeError(f"{t.name} returned but left no result in {t.out_dir}")
    return [t.result() for t in tasks]


@contextlib.contextmanager
def task_lock(task: Task, log: Callable[[str], None] = print, stop: Callable[[], bool] = lambda: False,
              poll: float = 0.5) -> Iterator[None]:
    """An exclusive lock on the task's folder (``.lock``), held while it runs — by every runner
    (the Ray runner's driver holds it around the task's Train run): two processes, or two jobs in
    one process, that need the same task train it once; the second waits, then finds it done.

    ``flock``: the kernel drops the lock when its holder dies, however it dies, so a lock is
    never stale (the pid and host written into the file only say who holds it). A lock file
    removed while we waited (a cleaned leftover folder) is detected by its inode and taken anew.
    ``stop()`` true while waiting raises :class:`Interrupted` (the job was stopped)."""
    out = Path(task.out_dir)
    path = out / LOCK_FILE
    waited = False
    while True:
        out.mkdir(parents=True, exist_ok=True)
        try:
            f = open(path, "a+")
        except FileNotFoundError:  # the folder was removed as a leftover just now: make it again
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if not waited:
                log(f"{task.name}: being trained by {holder}; waiting for it")
                waited = True
            if stop():
                raise Interrupted(signal.SIGINT) from None
            time.sleep(poll)
            continue
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the file we locked was removed meanwhile: lock the one there now
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def remove_leftovers(root: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """At the start of a job on a folder: the temporary files and folders of processes that are
    gone (``bundle.tmp<pid>/``, ``*.tmp<pid>``; :func:`supersub.atomic.remove_leftovers`) and the
    task folders that hold nothing but ``task.json`` (stamped, then killed before any output) —
    each removed under its lock, so a folder another job is about to use is left alone."""
    root = Path(root)
    removed = atomic.remove_leftovers(root) if root.is_dir() else []
    for folder in sorted((root / "tasks").glob("*")) if (root / "tasks").is_dir() else []:
        if not folder.is_dir() or {p.name for p in folder.iterdir()} - {TASK_FILE, LOCK_FILE}:
            continue
        try:
            f = open(folder / LOCK_FILE, "a+")
        except FileNotFoundError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another job holds it: its folder, in use
            if not {p.name for p in folder.iterdir()} - {TASK_FILE, LOCK_FILE}:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        names = [p.relative_to(root).as_posix() for p in removed]
        log(f"removed {len(names)} leftover(s) of an interrupted run: {', '.join(names[:4])}"
            + (", ..." if len(names) > 4 else ""))
    return removed


def begin(task: Task) -> None:
    """Under the task's lock, before it runs: ``task.json`` written, an untrusted
    ``metrics.json`` (its outputs damaged) removed, so the folder reads "not finished" until the
    task's own last rename."""
    (Path(task.out_dir) / RESULT_FILE).unlink(missing_ok=True)
    task.stamp()


def run_attempt(task: Task, ctx: TaskContext, logger: TaskLogger | None) -> dict[str, Any]:
    """One attempt of ``task`` in ``ctx``, its logger (if this process tracks it) told how it went."""
    try:
        result = task.run(ctx)
    except KeyboardInterrupt:
        raise  # the job was stopped: it marks its runs KILLED, this attempt did not fail
    except BaseException as e:
        if logger:
            logger.failed(error_line(e, task.out_dir))
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

    kind = "local"  # what a task's identity names when this runner trains it (see stages.network_task)

    def _attempt(self, task: Task) -> dict[str, Any]:
        with task_lock(task, self.log):  # another process (a study's runs side by side) may be at it
            if task.done():
                self.log(f"{task.name}: finished meanwhile by another process, reused ({task.out_dir})")
                return task.result()
            begin(task)
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
                        self.log(f"{task.name} failed ({error_line(e, task.out_dir)}); retrying from its last checkpoint")
        if failures:
            raise TaskFailed(failures, len(tasks), {t.name: t.out_dir for t in tasks})
        return [results[t.out_dir] for t in tasks]
