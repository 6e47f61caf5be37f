"""The tune job: ``python -m jobs.tune --space tune_spaces/FILE.yaml --from RUN [--budget 0.05]``.

Searches the specialists' delta settings (``delta.keep``, ``delta.bits``, ``specialist.optim.lr``,
optionally ``delta.mask``, ``delta.stages``, ...) with Ray Tune and ASHA, then writes
``OUT/tune/pareto.json``, ``pareto.png`` (mean accuracy vs mean delta size, as a fraction of one
network) and ``best.yaml``: the most accurate setting whose deltas fit ``--budget``, which
``python -m jobs.pipeline ... --overrides-from OUT/tune/best.yaml`` uses.

Ray 2.60 / Train V2 way of tuning: each Tune trial is a function that builds and fits its own
``TorchTrainer``. A trial's trainer has one worker per chosen superclass, each finetuning that
superclass's specialist (fractional CPUs/GPUs); every epoch all workers report (a report is a
barrier, so epochs stay in step) and :class:`MeanReport` hands Tune — and the trial's MLflow run,
live — the mean over superclasses, on which ASHA stops weak trials. The last report of a
completed trial carries the exported deltas' accuracy and bytes.

The resident network comes from the pipeline's own data and base-network tasks (reused when a
pipeline ran with the same settings: ``--from RUN`` reads RUN/config.yaml and RUN's tasks). The
job exits 1, naming the first error, when every trial failed.

It always ends, and says how:

* The space file's settings (``num_samples``, ``max_concurrent_trials``, ``scheduler``,
  ``stall_timeout_s``, ``max_failures``, the samplers) are checked before Ray starts: one line,
  exit 2 (ASHA's own check fired minutes later, as a traceback).
* Bounded waiting: a trial's worker group that cannot start is retried ``max_failures`` times
  (Train's default is forever), and a trial that reports nothing for ``stall_timeout_s`` is
  stopped and fails with that reason (:class:`TrialWatch`).
* SIGINT / SIGTERM: Tune stops its trials, the parent and the unfinished trials' MLflow runs end
  KILLED, ``pareto.json`` is written marked ``partial`` with the trials that never ran, no
  ``best.yaml``; exit 130 / 143. A second signal stops at once.
* Trials that ASHA stopped end FINISHED in MLflow with the tag ``stopped_early``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jobs.cli import fail
from jobs.pipeline import init_ray, make_tracker
from supersub.config import ConfigError, dotted_keys, load_config, to_dict
from supersub.errors import UserError
from supersub.pipeline_config import PipelineConfig, absolute_paths

# Keys a space may search, and where they live in a specialist task's dict.
SEARCHABLE = {"delta": ("delta",), "specialist.optim": ("optim",)}
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
SPACE_KEYS = {"space", "num_samples", "max_concurrent_trials", "scheduler", "overrides", "stall_timeout_s", "max_failures"}
SCHEDULER_KEYS = {"grace_period", "reduction_factor"}
STALL_TIMEOUT_S = 900.0  # default: a trial silent this long (no epoch reported) is stopped as failed
STATUS_EVERY_S = 60.0  # the one-line status of the search, at most this often


class AllTrialsFailed(RuntimeError):
    pass


def load_space(path: Path) -> dict[str, Any]:
    """A space file: ``space`` (key → sampler), ``num_samples``, ``max_concurrent_trials``,
    ``scheduler`` (ASHA ``grace_period``, ``reduction_factor``), ``overrides`` (key=value list),
    ``stall_timeout_s``, ``max_failures``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - SPACE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return spec


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_space(spec: dict[str, Any], epochs: int, path: str | Path) -> None:
    """The space file's scheduler and search settings against the trials' ``epochs``; a bad one
    raises :class:`ConfigError` before Ray starts (ASHA's own assert fired minutes into the job)."""
    def bad(message: str) -> None:
        raise ConfigError(f"{path}: {message}")

    n = spec.get("num_samples", 8)
    if not _int(n) or n < 1:
        bad(f"num_samples must be an integer >= 1, got {n!r}")
    c = spec.get("max_concurrent_trials")
    if c is not None and (not _int(c) or c < 1):
        bad(f"max_concurrent_trials must be null or an integer >= 1, got {c!r}")
    sched = spec.get("scheduler") or {}
    if not isinstance(sched, dict):
        bad(f"scheduler must be a mapping of {sorted(SCHEDULER_KEYS)}, got {sched!r}")
    if set(sched) - SCHEDULER_KEYS:
        bad(f"scheduler: unknown keys {sorted(set(sched) - SCHEDULER_KEYS)}; ASHA takes {sorted(SCHEDULER_KEYS)}")
    g = sched.get("grace_period", 1)
    if not _int(g) or not 1 <= g <= epochs:
        bad(f"scheduler.grace_period must be an integer from 1 to the trials' epochs ({epochs}), got {g!r}")
    rf = sched.get("reduction_factor", 2)
    if not _number(rf) or rf <= 1:
        bad(f"scheduler.reduction_factor must be a number > 1, got {rf!r}")
    stall = spec.get("stall_timeout_s", STALL_TIMEOUT_S)
    if not _number(stall) or stall <= 0:
        bad(f"stall_timeout_s must be a number of seconds > 0, got {stall!r}")
    mf = spec.get("max_failures", 1)
    if not _int(mf) or mf < 0:
        bad(f"max_failures must be an integer >= 0, got {mf!r}")
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        bad(f"overrides must be a list of key=value strings, got {overrides!r}")
    if not isinstance(spec.get("space") or {}, dict):
        bad("space must be a mapping of key: {sampler: args}")


def parse_space(spec: dict[str, Any]) -> dict[str, Any]:
    """``{key: {sampler: args}}`` → Tune search space; keys checked against the config."""
    from ray import tune

    known = set(dotted_keys(to_dict(PipelineConfig())))
    space = {}
    for key, sampler in (spec or {}).items():
        if key not in known or not any(key.startswith(p + ".") for p in SEARCHABLE):
            raise ConfigError(f"space key {key!r}: searchable keys are delta.* and specialist.optim.*")
        if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
            raise ConfigError(f"space key {key!r}: expected one of {{{', '.join(SAMPLERS)}: ...}}, got {sampler!r}")
        kind, args = next(iter(sampler.items()))
        if kind == "choice":
            space[key] = tune.choice(args)
        elif kind == "grid":
            space[key] = tune.grid_search(args)
        else:
            space[key] = getattr(tune, kind)(*args)
    return space


def apply_params(task: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A specialist task dict with a trial's ``delta.*`` / ``specialist.optim.*`` values, checked
    by rebuilding the task (an impossible combination raises ``ValueError`` here, not in a worker)."""
    from supersub.tasks import task_from_dict

    task = json.loads(json.dumps(task))
    for key, value in params.items():
        prefix = next(p for p in SEARCHABLE if key.startswith(p + "."))
        node = task
        for part in SEARCHABLE[prefix] + tuple(key[len(prefix) + 1:].split(".")[:-1]):
            node = node[part]
        node[key.rsplit(".", 1)[1]] = value
    task_from_dict(task)
    return task


def check_discrete_values(spec: dict[str, Any], task: dict[str, Any]) -> None:
    """Every value a ``choice`` or ``grid`` can take, applied to a task: a value that cannot work
    is refused before any trial starts (continuous samplers fail in their trials)."""
    for key, sampler in (spec or {}).items():
        kind, values = next(iter(sampler.items()))
        if kind in ("choice", "grid"):
            for v in values:
                try:
                    apply_params(task, {key: v})
                except ValueError as e:
                    raise ConfigError(f"space {key}={v}: {e}") from None


# ----------------------------------------------------------------------------- trials
def trial_loop(config: dict[str, Any]) -> None:
    """One Train worker of a trial: the specialist of superclass ``tasks[rank]``, alone (no DDP)."""
    import ray.train
    import ray.train.torch

    from jobs.console import quiet_worker
    from supersub.tasks import TaskContext, task_from_dict

    quiet_worker()
    rank = ray.train.get_context().get_world_rank()
    task = task_from_dict(config["tasks"][rank])
    ctx = TaskContext(device=ray.train.torch.get_device(), report=lambda metrics, ckpt: ray.train.report(metrics),
                      log=lambda s: print(s, flush=True))
    result = task.run(ctx)
    ray.train.report({"final": 1, **{k: result[k] for k in ("val_acc", "delta_bytes", "delta_ratio", "delta_density")}})


def _mean_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class MeanReport(TuneReportCallback):
        """Hands Tune the mean of every numeric metric over the workers (the superclasses); the
        driver's :func:`trial_runs` logs each to the trial's MLflow run."""

        def after_report(self, run_context, metrics, checkpoint):
            keys = [k for k, v in metrics[0].items() if isinstance(v, (int, float))]
            mean = {k: sum(float(m[k]) for m in metrics) / len(metrics) for k in keys}
            super().after_report(run_context, [mean], checkpoint)

    return MeanReport()


def trial_fn(config: dict[str, Any]) -> None:
    """A Tune trial: builds and fits its own TorchTrainer (Train V2 + Tune)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer

    from jobs.console import train_logging

    trial_id = ray.tune.get_context().get_trial_id()
    tasks = [apply_params(t, config["params"]) for t in config["tasks"]]
    for t in tasks:
        t["out_dir"] = str(Path(config["trials_dir"]) / trial_id / f"{t['superclass']:03d}")
    res = config["resources"]
    callback = _mean_report_callback()
    trainer = TorchTrainer(
        trial_loop,
        train_loop_config={"tasks": tasks},
        scaling_config=ray.train.ScalingConfig(
            num_workers=len(tasks), use_gpu=res["gpus"] > 0,
            resources_per_worker={"CPU": res["cpus"]} | ({"GPU": res["gpus"]} if res["gpus"] > 0 else {}),
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}", storage_path=config["storage"], callbacks=[callback],
            # Bounded: a worker group that cannot start (Train's start timeout) or dies is
            # retried max_failures times, not forever (controller_failure_limit defaults to -1).
            failure_config=ray.train.FailureConfig(max_failures=config["max_failures"],
                                                   controller_failure_limit=config["max_failures"]),
            logging_config=train_logging(),
        ),
    )
    trainer.fit()


# ----------------------------------------------------------------------------- the job
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\w*:")


def _error_line(error) -> str:
    """One line for an error or a traceback's text: its last ``SomeError: message`` line (with the
    line after it when the message only introduces it), else its first line; at most 300 characters."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    hits = [i for i, line in enumerate(lines) if _EXCEPTION.match(line)]
    if not hits:
        return lines[0][:300]
    i = hits[-1]
    line = lines[i] + (" " + lines[i + 1] if lines[i].endswith(":") and i + 1 < len(lines) else "")
    return line[:300]


def trial_runs(tracker):
    """A Tune callback on the driver: each trial's nested MLflow run, opened when it starts, an
    epoch row per result, its final numbers (the exported deltas' report) when it completes.
    Trials run on any node; only this driver talks to the tracking store. Failed, stopped and
    killed trials' runs are ended from Tune's results at the end (:func:`_end_trial_runs`): a
    trial killed by the job's stop must read KILLED, not a FAILED written as it died."""
    from ray.tune import Callback
    from ray.tune.result import AUTO_RESULT_KEYS

    from jobs.tracking import MlflowTaskLogger

    class TrialRuns(Callback):
        # Tune pickles its callbacks with the experiment's state: the store's ids, not the tracker.
        def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
            self.parent = (tracking_uri, experiment_id, parent_run_id)
            self.loggers: dict[str, MlflowTaskLogger] = {}
            self.final: dict[str, dict[str, Any]] = {}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            logger = MlflowTaskLogger(*self.parent, f"trial {trial.trial_id}", dict(trial.config.get("params", {})),
                                      {"supersub.kind": "tune_trial"})
            logger.started()
            self.loggers[trial.trial_id] = logger

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            logger = self.loggers.get(trial.trial_id)
            row = {k: v for k, v in result.items() if k not in AUTO_RESULT_KEYS and isinstance(v, (int, float))}
            if logger is None or not row:
                return
            if "final" in row:
                self.final[trial.trial_id] = row
            else:
                logger.epoch(row)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            logger = self.loggers.pop(trial.trial_id, None)
            if logger is not None and trial.trial_id in self.final:
                logger.finished(self.final.pop(trial.trial_id))

    return TrialRuns(tracker.tracking_uri, tracker.experiment_id, tracker.run_id)


def trial_watch(log, stall_s: float, status_every_s: float = STATUS_EVERY_S, signals: Signals | None = None):
    """A Tune callback on the driver: a line when a trial starts and when it ends (and how), the
    search's status in one line at most every ``status_every_s`` (Tune's own table is off unless
    ``--verbose``), and a trial that reports nothing for ``stall_s`` seconds stopped (its actor
    killed: Tune records it as failed) with the reason in :attr:`stalled`."""
    import ray
    from ray.tune import Callback

    class TrialWatch(Callback):
        def __init__(self) -> None:
            self.last: dict[str, float] = {}  # trial id -> when it started or last reported (monotonic)
            self.reports: dict[str, int] = {}
            self.stalled: dict[str, str] = {}
            self.started: set[str] = set()
            self.status_at = time.monotonic()

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.started.add(trial.trial_id)
            self.last[trial.trial_id] = time.monotonic()
            log(f"trial {trial.trial_id} started: {trial.config['params']}")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.last[trial.trial_id] = time.monotonic()
            self.reports[trial.trial_id] = int(result.get("training_iteration") or 0)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            r = trial.last_result or {}
            acc = f"val acc {r['val_acc']:.2f}" if isinstance(r.get("val_acc"), (int, float)) else "no val acc"
            if r.get("final") != 1 and signals is not None and signals.received:
                log(f"trial {trial.trial_id} stopped (interrupted) after {r.get('training_iteration', 0)} reports")
            elif r.get("final") == 1:
                log(f"trial {trial.trial_id} completed: {acc}, deltas {r.get('delta_ratio', math.nan):.4f} of a network")
            else:
                log(f"trial {trial.trial_id} stopped early by ASHA after {r.get('training_iteration', 0)} reports ({acc})")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            reason = self.stalled.get(trial.trial_id) or _error_line(trial.get_error() or "error")
            log(f"trial {trial.trial_id} failed: {reason}" + (f" (traceback: {trial.error_file})" if trial.error_file else ""))

        def on_step_end(self, iteration, trials, **info) -> None:
            now = time.monotonic()
            for t in trials:
                tid = t.trial_id
                if t.status != "RUNNING" or tid in self.stalled or now - self.last.get(tid, now) <= stall_s:
                    continue
                self.stalled[tid] = (f"no progress for {stall_s:g} s (stall_timeout_s; last report: "
                                     f"{self.reports.get(tid, 'none')}): stopped")
                actor = t.temporary_state.ray_actor
                if actor is not None:
                    ray.kill(actor, no_restart=True)
            if now - self.status_at >= status_every_s:
                self.status_at = now
                counts: dict[str, int] = {}
                for t in trials:
                    counts[t.status] = counts.get(t.status, 0) + 1
                log("tune: " + ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())))

    return TrialWatch()


class Signals:
    """SIGINT / SIGTERM for the tune job. While Tune runs (:attr:`tuning`): Tune's own graceful
    stop (its SIGUSR1 handler ends the experiment and stops the trials), remembered in
    :attr:`received`; otherwise, or at a second signal: :class:`supersub.runner.Interrupted` at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.tuning = False
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        """Ours for SIGINT and SIGTERM (in the main thread only: elsewhere Python refuses)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours instead, for SIGTERM as for SIGINT
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum, frame) -> None:
        from supersub.runner import Interrupted

        first, self.received = self.received is None, self.received or signum
        if first and self.tuning:
            print(f"jobs.tune: {signal.Signals(signum).name}: stopping the trials (again to stop at once)",
                  file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGUSR1)
            return
        raise Interrupted(signum)


def _check_state_api(log) -> None:
    """Ray 2.60 frees the placement group of a Train run whose controller was killed (a trial
    that ASHA stops) through the State API, i.e. the dashboard; without it the group keeps its
    CPUs until the job ends, and later trials may never start (ray-project/ray#54305)."""
    try:
        from ray.util.state import list_actors

        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - any failure means no State API
        log(f"warning: the Ray State API is unavailable ({type(e).__name__}); trials that ASHA stops "
            "will keep their resources until the job ends. Start Ray with the dashboard.")


def run_tune(cfg: PipelineConfig, space_file: Path, out: Path, base: Path, superclasses: list[int] | None,
             budget: float, log=print, signals: Signals | None = None, verbose: bool = False) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.runner import RayRunner, fit_slots
    from supersub.pipeline import specialist_tasks, train_base_networks

    spec = load_space(space_file)
    check_space(spec, cfg.specialist.optim.epochs, space_file)
    space = parse_space(spec.get("space", {}))
    signals = signals or Signals()
    tune_dir = out / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg, out, job="tune")
    with tracker if hasattr(tracker, "__enter__") else contextlib.nullcontext():
        runner = RayRunner(cfg.resources, base, data_loader=cfg.data.loader, log=log, tracker=tracker)
        b = train_base_networks(cfg, base, runner, log)
        tasks = [t for t in specialist_tasks(cfg, b, tune_dir / "trials")
                 if superclasses is None or t.superclass in superclasses]
        if not tasks:
            raise ConfigError(f"--superclasses {superclasses}: the hierarchy has {b.hierarchy.num_superclasses}")
        check_discrete_values(spec.get("space", {}), tasks[0].to_dict())
        cpus, gpus = cfg.resources.specialist_cpus, cfg.resources.specialist_gpus
        fits = fit_slots(dict(ray.available_resources()), len(tasks), cpus, gpus)
        concurrent = max(1, min(fits, spec.get("max_concurrent_trials") or math.inf))
        _check_state_api(log)
        epochs = cfg.specialist.optim.epochs
        sched = spec.get("scheduler") or {}
        log(f"tune: {_total_trials(spec)} trials over {sorted(space)} for superclasses "
            f"{[t.superclass for t in tasks]}, {concurrent} at a time, ASHA on val_acc over {epochs} epochs")
        watch = trial_watch(log, float(spec.get("stall_timeout_s", STALL_TIMEOUT_S)), signals=signals)
        tuner = tune.Tuner(
            # The trial function only builds and fits a trainer, whose workers hold the resources.
            # Tune refuses an empty request; a CPU token would leave too little for the workers.
            tune.with_resources(trial_fn, {"cpu": 0, "memory": 1}),
            param_space={
                "params": space,
                "tasks": [t.to_dict() for t in tasks],
                "trials_dir": str(tune_dir / "trials"),
                "storage": str(tune_dir / "ray"),
                "resources": {"cpus": cpus, "gpus": gpus},
                "max_failures": int(spec.get("max_failures", 1)),
            },
            tune_config=tune.TuneConfig(
                num_samples=int(spec.get("num_samples", 8)),
                max_concurrent_trials=concurrent,
                # A trial reports epochs + 1 times (the last report carries the exported deltas).
                # max_t lies beyond: a trial that reached max_t would be killed before its
                # trainer shut down (ray-project/ray#54305), not end on its own.
                scheduler=ASHAScheduler(metric="val_acc", mode="max", max_t=epochs + 2,
                                        grace_period=int(sched.get("grace_period", 1)),
                                        reduction_factor=float(sched.get("reduction_factor", 2))),
            ),
            # Tune's status table only with --verbose (TrialWatch prints a line a minute instead).
            run_config=tune.RunConfig(name="tune", storage_path=str(tune_dir / "ray"),
                                      callbacks=[watch] + ([trial_runs(tracker)] if hasattr(tracker, "run_id") else []),
                                      verbose=2 if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        if verbose:  # Tune prints its table every 30 s; once a minute is plenty
            with contextlib.suppress(ImportError, AttributeError):
                from ray.tune.experimental.output import TuneReporterBase

                TuneReporterBase._heartbeat_freq = STATUS_EVERY_S
        from jobs.console import quiet_tune

        quiet_tune()
        signals.tuning = True
        try:
            grid = tuner.fit()
        finally:
            signals.tuning = False
        summary = summarise(grid, tune_dir, budget, tracker, log, space_file, watch=watch,
                            interrupted=signals.received, total=_total_trials(spec))
        if signals.received:
            from supersub.runner import Interrupted

            raise Interrupted(signals.received)
        return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[1])
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--config", help="pipeline config YAML (default: --from RUN/config.yaml, else built-in defaults)")
    p.add_argument("--out", help="output folder (OUT/tune/...); default: --from")
    p.add_argument("--from", dest="from_dir", help="an earlier pipeline output whose data and base networks to use")
    p.add_argument("--superclasses", help="comma-separated superclass indices (default: all)")
    p.add_argument("--budget", type=float, default=0.05, help="largest mean delta size, as a fraction of one network")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own progress too (the logs keep them anyway)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides")
    args = p.parse_args(argv)
    if not (args.out or args.from_dir):
        p.error("--out or --from is required")
    # Every path resolved here, once: the trials' workers run in other working directories.
    from_dir = Path(args.from_dir).absolute() if args.from_dir else None
    out = Path(args.out).absolute() if args.out else from_dir
    try:
        if from_dir is not None and not (from_dir / "config.yaml").is_file():
            raise ConfigError(f"--from {args.from_dir}: not a pipeline output (no config.yaml in it)")
        config = args.config or (from_dir / "config.yaml" if from_dir else None)
        # The space file's own overrides (e.g. fewer epochs for trials) first; the command line wins.
        spec = load_space(Path(args.space))
        if not isinstance(spec.get("overrides") or [], list):
            raise ConfigError(f"{args.space}: overrides must be a list of key=value strings")
        cfg = absolute_paths(load_config(PipelineConfig, config, list(spec.get("overrides") or []) + args.overrides))
        # Scheduler and search settings: one line and exit 2 here, before Ray starts.
        if cfg.generalist.router_trunk_mode == "joint":
            raise ConfigError("jobs.tune searches one specialist's delta at a time; generalist.router_trunk=joint trains "
                              "every expert in one task: tune with router_trunk=frozen")
        check_space(spec, cfg.specialist.optim.epochs, args.space)
        parse_space(spec.get("space") or {})
        try:
            chosen = [int(s) for s in args.superclasses.split(",")] if args.superclasses else None
        except ValueError:
            raise ConfigError(f"--superclasses {args.superclasses}: expected comma-separated integers") from None
    except UserError as e:
        return fail(e, "jobs.tune")
    from supersub.runner import Interrupted

    signals = Signals()
    started = False
    try:
        signals.install()
        started = init_ray(lambda s: print(s, flush=True), verbose=args.verbose)
        signals.install()  # again: ray.init replaced the SIGTERM handler
        run_tune(cfg, Path(args.space).absolute(), out, from_dir or out, chosen, args.budget,
                 log=lambda s: print(s, flush=True), signals=signals, verbose=args.verbose)
    except Interrupted as e:
        partial = out / "tune" / "pareto.json"
        where = f"what ran is in {partial} (partial), " if signals.received and partial.is_file() else ""
        print(f"jobs.tune: interrupted ({e}); {where}no best.yaml", file=sys.stderr, flush=True)
        return e.exit_code
    except AllTrialsFailed as e:
        fail(e, "jobs.tune")
        return 1
    except UserError as e:
        return fail(e, "jobs.tune")
    finally:
        if started:
            import ray

            ray.shutdown()
        signals.restore()
    return 0


# ----------------------------------------------------------------------------- results
def _end_trial_runs(tracker, trials: list[dict[str, Any]], interrupted: bool = False) -> None:
    """Ends the trials' MLflow runs (a trial ends its own run only when it finishes): ASHA's stops
    FINISHED with the tag ``stopped_early``, failures (and a completed trial's earlier, retried
    attempts) FAILED with the reason as a tag. After a
    signal every other run is KILLED — the job was stopped, as the parent says — a failure among
    them keeping its reason tag."""
    if not hasattr(tracker, "client"):
        return
    status = {f"trial {t['trial_id']}": t for t in trials}
    query = f"tags.mlflow.parentRunId = '{tracker.run_id}' and attributes.status != 'FINISHED'"
    for run in tracker.client.search_runs([tracker.experiment_id], filter_string=query):
        trial = status.get(run.info.run_name, {})
        if trial.get("status") == "error":
            tracker.client.set_tag(run.info.run_id, "supersub.failure", str(trial.get("error", ""))[:5000])
        if trial.get("status") == "stopped early" and not interrupted:
            tracker.client.set_tag(run.info.run_id, "stopped_early", "true")
            tracker.client.set_terminated(run.info.run_id, "FINISHED")
        elif trial.get("status") in ("error", "completed") and not interrupted:
            tracker.client.set_terminated(run.info.run_id, "FAILED")  # (completed: an attempt Tune retried)
        else:
            tracker.client.set_terminated(run.info.run_id, "KILLED")


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that no other beats on both accuracy (higher) and delta size (lower)."""
    front, best = [], -math.inf
    for t in sorted(trials, key=lambda t: (t["delta_ratio"], -t["val_acc"])):
        if t["val_acc"] > best:
            front.append(t)
            best = t["val_acc"]
    return front


def _total_trials(spec: dict[str, Any]) -> int:
    """Trials the space file asks for: ``num_samples`` x the product of the grids' sizes."""
    grid = math.prod(len(next(iter(v.values()))) for v in (spec.get("space") or {}).values() if "grid" in v)
    return int(spec.get("num_samples", 8)) * grid


def summarise(grid, tune_dir: Path, budget: float, tracker, log, space_file: Path, watch=None,
              interrupted: int | None = None, total: int | None = None) -> dict[str, Any]:
    """pareto.json, pareto.png, best.yaml and the trials' MLflow runs ended; raises
    :class:`AllTrialsFailed` if no trial completed and every one failed. ``interrupted`` (a
    signal number): pareto.json marked ``partial`` with the trials that never ran, no best.yaml."""
    from supersub.plots import pareto

    started = watch.started if watch is not None else None
    stalled = watch.stalled if watch is not None else {}
    trials, errors = [], []
    for r in grid:
        m = r.metrics or {}
        folder = Path(r.path).name if r.path else "?"
        tid = m.get("trial_id") or next((t for t in (started or ()) if t in folder), folder)
        if r.error:
            status = "error"
            errors.append(stalled.get(tid) or _error_line(r.error))
        elif m.get("final") == 1:
            status = "completed"
        elif not m:
            status = "not run" if started is None or tid not in started else "interrupted"
        else:
            status = "interrupted" if interrupted else "stopped early"
        trial = {"trial_id": tid, "status": status, "params": r.config["params"],
                 "val_acc": m.get("val_acc"), "iterations": m.get("training_iteration")}
        if status == "error":
            trial["error"] = errors[-1]
        if status == "completed":
            trial.update({k: m[k] for k in ("delta_bytes", "delta_ratio", "delta_density")})
        trials.append(trial)
    done = [t for t in trials if t["status"] == "completed"]
    _end_trial_runs(tracker, trials, interrupted=bool(interrupted))
    if trials and len(errors) == len(trials):
        raise AllTrialsFailed(f"all {len(trials)} trials failed; the first: {errors[0]}")
    front = pareto_front(done)
    fits = [t for t in done if t["delta_ratio"] <= budget]
    best = max(fits, key=lambda t: (t["val_acc"], -t["delta_ratio"])) if fits else None  # ties: the smaller
    summary = {"budget": budget, "trials": trials, "front": [t["trial_id"] for t in front], "best": best}
    if interrupted:
        # What ran, for the record; not a result: no best.yaml (an older one would pass for this run's).
        not_run = [t["trial_id"] for t in trials if t["status"] == "not run"]
        summary.update({"partial": True, "interrupted": signal.Signals(interrupted).name, "best": None,
                        "not_run": not_run, "not_created": max(0, (total or len(trials)) - len(trials))})
        (tune_dir / "best.yaml").unlink(missing_ok=True)
        best = None
    (tune_dir / "pareto.json").write_text(json.dumps(summary, indent=2, default=float))
    if done:
        pareto(done, front, None, tune_dir / "pareto.png", budget=budget, best=best)
    artifacts = [tune_dir / "pareto.json", tune_dir / "pareto.png", space_file]
    log(f"{'trial':<12}{'status':<15}{'val acc':>8}{'bytes/net':>10}  params")
    for t in sorted(trials, key=lambda t: -(t["val_acc"] or 0)):
        ratio = f"{t['delta_ratio']:.4f}" if "delta_ratio" in t else "-"
        log(f"{t['trial_id']:<12}{t['status']:<15}{t['val_acc'] or float('nan'):>8.2f}{ratio:>10}  {t['params']}")
    if interrupted:
        log(f"interrupted ({signal.Signals(interrupted).name}): {len(done)} of {total or len(trials)} trials completed; "
            f"pareto.json is partial, no best.yaml")
    elif best is None:
        log(f"no completed trial has deltas within {budget} of a network: no best.yaml")
    else:
        best_file = tune_dir / "best.yaml"
        best_file.write_text(
            f"# written by jobs.tune: the most accurate trial with deltas within {budget} of a network\n"
            + yaml.safe_dump({"overrides": best["params"], "trial": best["trial_id"], "val_acc": best["val_acc"],
                              "delta_ratio": best["delta_ratio"], "budget": budget}, sort_keys=False))
        artifacts.append(best_file)
        log(f"best within {budget}: {best['params']} (val acc {best['val_acc']:.2f}, {best['delta_ratio']:.4f} of a network)\n"
            f"feed it back: python -m jobs.pipeline --config CONFIG --out DIR --overrides-from {best_file}")
    if hasattr(tracker, "client"):
        tracker.client.log_metric(tracker.run_id, "trials_completed", len(done))
        for path in artifacts:
            if Path(path).is_file():
                tracker.client.log_artifact(tracker.run_id, str(path))
    return summary


if __name__ == "__main__":
    sys.exit(main())
