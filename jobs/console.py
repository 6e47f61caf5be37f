"""A console a person reads: the project's lines once each, Ray's chatter only with ``--verbose``.

Nothing is dropped from the logs on disk: everything filtered here is still in Ray's session
logs (``$RAY_TMPDIR/ray/session_latest/logs``: each worker's ``.out``/``.err``, the raylet's
log, Train's ``ray-train-sys-*`` files), and a job's own lines stay on the console.

Three places, because Ray's lines come from three kinds of process:

* **The job's process** (:func:`quiet_driver`): Ray's own INFO logging off, and the lines that
  Ray forwards from its workers (``log_to_driver``) and the GCS's error messages for the job
  filtered: the raylet's and autoscaler's lines, and known noise (PreemptionWatcher, the State API's "temporarily unavailable", library
  ``UserWarning`` lines), unless verbose.
* **Train workers** (:func:`quiet_worker`, called by the worker functions): Ray's records below
  WARNING kept off the console handlers (Train V2 logs each ``report`` as "Reporting training
  result N: TrainingReport(...)" under a logger named after its file,
  ``.../ray/train/v2/_internal/execution/context.py``, not under ``ray.train``); the file
  handlers still get them.
* **Train controllers**: ``RunConfig(logging_config=train_logging())`` — off the console unless
  verbose (errors too: the job reports each failed run in one line), everything in
  ``ray-train-sys-controller-*.log``.

Train V2 also patches ``print`` in its workers so that each line goes to the worker's stdout
*and* through the root logger to its stderr: every epoch line reached the console twice.
:data:`WORKER_ENV` turns that patch off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``) for the job's
workers; their lines still land in the workers' ``.out`` files.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "SUPERSUB_VERBOSE"
# For every worker of a job this process starts or joins (runtime_env env_vars).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# Forwarded lines dropped unless verbose (substrings); the raylet's and autoscaler's lines too.
NOISE = (
    "PreemptionWatcher",
    "State API may be temporarily unavailable",
    "UserWarning",
    "warnings.warn(",
    "Reporting training result",
    "Setting up process group for",
    "Started distributed worker processes",
    "Moving model to device",
    "Wrapping provided model in DistributedDataParallel",
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def set_verbose(on: bool) -> dict[str, str]:
    """Records the choice for this process and returns the env vars that carry it to workers."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    return {**WORKER_ENV, VERBOSE_ENV: os.environ[VERBOSE_ENV]}


# Ray messages that come with a traceback and that Ray itself calls harmless on a loaded machine:
# the message and its traceback are dropped together (unless verbose).
NOISY_TRACEBACKS = (
    "Failed to send resource request for train-",  # Train's autoscaling client, CPU overloaded
)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def keep_forwarded(line: str, pid) -> bool:
    """Whether a line a worker printed (forwarded to the driver by Ray) is shown, when not verbose."""
    if pid in ("raylet", "autoscaler", "gcs_server"):
        return False
    return not any(n in line for n in NOISE)


def filter_lines(lines: list[str], pid) -> list[str]:
    """The lines of one forwarded batch that are shown: :func:`keep_forwarded`, and the known
    harmless messages with their tracebacks (up to the exception's own line) left out."""
    kept, skipping = [], False
    for line in lines:
        if any(n in line for n in NOISY_TRACEBACKS):
            skipping = True
            continue
        if skipping:
            if line.startswith(("Traceback", " ", "\t")) or not line.strip():
                continue
            skipping = False
            if _EXCEPTION_LINE.match(line):
                continue  # the traceback's last line
        if line.strip() and keep_forwarded(line, pid):  # a worker's blank line says nothing
            kept.append(line)
    return kept


def quiet_driver() -> None:
    """Filters the worker lines Ray forwards to this process (after ``ray.init``), unless verbose.
    Uses Ray's stdstream dispatcher (a private API of 2.60): if it moves, the console is just
    louder."""
    logging.getLogger("ray").setLevel(logging.WARNING if not verbose() else logging.INFO)
    if verbose():
        return
    # "Creating initial MLflow database tables...": MLflow sets its logger's level when imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow's advice to its own users (type hints on predict, ambiguous dataset sources). Not a
    # filter: MLflow's log_model sets its own ("once") around the call, which would win.
    earlier = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and "/mlflow/" in str(filename).replace("\\", "/"):
            return
        earlier(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        import functools

        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        show = functools.partial(ray_worker.print_worker_logs, ignore_prefix=ignore_prefix)
    except (ImportError, AttributeError):
        return

    def filtered(data: dict) -> None:
        # Straight to the console, without Ray's de-duplication: it folds lines that differ only
        # in their numbers — two specialists' epoch lines — into one "[repeated 2x]", later.
        lines = filter_lines(data.get("lines", []), data.get("pid"))
        if lines:
            sink = sys.stderr if data.get("is_err") else sys.stdout
            show({**data, "lines": lines}, sink)
            sink.flush()  # a console piped to a file (tee, a job log) gets each epoch as it ends

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)

    # The job's error messages from the GCS ("N PYTHON worker processes have been started", "a
    # worker died") reach the console through print_to_stdstream directly, as pid "raylet".
    original = ray_worker.print_to_stdstream
    if not getattr(original, "_supersub_quiet", False):
        def print_to_stdstream(data, ignore_prefix: bool) -> None:
            lines = filter_lines(data.get("lines", []), data.get("pid"))
            if lines:
                original({**data, "lines": lines}, ignore_prefix)

        print_to_stdstream._supersub_quiet = True
        ray_worker.print_to_stdstream = print_to_stdstream


class _RayBelowWarning(logging.Filter):
    """Drops Ray's own records below WARNING (by logger name or source file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        name, path = record.name, record.pathname.replace("\\", "/")
        return not (name == "ray" or name.startswith("ray.") or "/ray/" in name or "/site-packages/ray/" in path)


def quiet_worker() -> None:
    """In a Train worker: Ray's records below WARNING off the console handlers (not the files)."""
    if verbose():
        return
    for logger in (logging.getLogger(), logging.getLogger("ray.train"), logging.getLogger("ray")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and not any(isinstance(f, _RayBelowWarning) for f in handler.filters):
                handler.addFilter(_RayBelowWarning())


def train_logging():
    """``ray.train.LoggingConfig`` for a Train run: the controller's lines on the console only when
    verbose (its ``ray-train-sys-controller-*.log`` keeps them all). Its errors too: each is raised
    to the job, which says in one line which run failed and why — the controller's own report of
    an out-of-memory kill is ~90 lines, once per restart."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "CRITICAL")


def quiet_tune() -> None:
    """Tune's report of a failed trial (a traceback on the console) off unless verbose: the job
    prints a line with the reason and the error file, which keeps the traceback."""
    if not verbose():
        logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
