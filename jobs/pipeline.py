"""The pipeline job: ``python -m jobs.pipeline --config FILE --out DIR [key=value ...]``.

Runs :func:`supersub.pipeline.run_pipeline` with a :class:`jobs.runner.RayRunner` (each task a
Ray Train run; ``ray job submit -- python -m jobs.pipeline ...`` works the same) or, with
``resources.runner=local``, the core's in-process ``LocalRunner``; tracked in MLflow
(:class:`jobs.tracking.MlflowTracker`) unless ``tracking.enabled=false``. Ray and MLflow are
imported only when used, so ``resources.runner=local tracking.enabled=false`` runs where neither
is installed.

Everything a user can get wrong — config keys and values, the data source, the hierarchy, an
``--out`` that is a file — is checked before Ray starts or an MLflow run opens, and reported as
one line with exit code 2. A task that fails after its retries ends the job with exit code 1
and one line naming it (the other tasks are saved; a rerun retries only the failed ones).

Ray: ``RAY_ADDRESS`` or a cluster started with ``ray start`` on this machine is joined;
otherwise an embedded local Ray starts and stops with the job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from jobs.cli import fail
from jobs.interrupt import interrupted_line, reclaim_signals, signals_interrupt
from supersub.config import ConfigError, describe, dotted_keys, load_config
from supersub.errors import UserError
from supersub.pipeline import check_inputs, run_pipeline
from supersub.pipeline_config import PipelineConfig, absolute_paths
from supersub.runner import Interrupted, NullTracker, TaskFailed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.pipeline",
        description="Super-Sub pipeline: data → vanilla [+ generalist] → N specialists [+ controls] → evaluation → bundle.",
        epilog="Example: python -m jobs.pipeline --config jobs/configs/default.yaml --out runs/a train.epochs=2",
    )
    p.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    p.add_argument("--out", help="output folder; rerunning with the same folder reuses the finished tasks whose "
                   "inputs and settings are unchanged")
    p.add_argument("--overrides-from", metavar="YAML", help="overrides from a file, e.g. DIR/tune/best.yaml; "
                   "command-line key=value pairs still win")
    p.add_argument("--reuse-from", metavar="RUN", action="append", help="another run's folder: its tasks that "
                   "finished with the same inputs and settings are linked into --out instead of trained again; may be "
                   "repeated (default: the run whose tune/best.yaml --overrides-from reads, so a tuned run trains its "
                   "specialists on the very networks the search measured)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.add_argument("--verbose", action="store_true", help="show Ray's own progress lines too (the logs keep them anyway)")
    p.add_argument("--plan", action="store_true", help="print every task with its images, resources, estimated wall "
                   "time and the job's GPU-hours, and train nothing (--out optional: a manifest built there is reused)")
    p.add_argument("--plan-throughput", metavar="JSON", action="append", help="--plan's rates: {train_images_per_s, "
                   "decode_images_per_s_per_cpu}, or benchmarks/data_throughput.py's or train_throughput.py's JSON; "
                   "may be repeated (default: measured here, or for GPU workers planned without a GPU the reference "
                   "table's, see --plan-gpu)")
    p.add_argument("--plan-gpu", metavar="KIND", help="--plan: bill the config's GPU workers at this GPU kind's "
                   "published training rate (supersub/reference_throughput.py: A100, H100, V100); default: measured "
                   "on this machine's GPU, or A100 where it has none")
    p.add_argument("--plan-json", metavar="FILE", help="--plan: also write the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. delta.bits=4")
    return p


def help_config(cls: type = PipelineConfig) -> str:
    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{k:<{width}}  {json.dumps(v):<24} {h}" for k, v, h in rows)


def overrides_from(path: str | Path) -> list[str]:
    """``key=value`` strings from a YAML file: either ``overrides: {dotted.key: value}`` (what
    ``jobs.tune`` writes to best.yaml) or a nested mapping of config sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--overrides-from: file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    data = data.get("overrides", data)
    # JSON is YAML: load_config parses the values back.
    return [f"{k}={json.dumps(v)}" for k, v in dotted_keys(data).items()]


def reuse_runs(args: argparse.Namespace) -> list[Path]:
    """``--reuse-from``'s run folders, checked; without it, the run of ``--overrides-from
    RUN/tune/best.yaml`` where that folder holds tasks."""
    if args.reuse_from:
        runs = [Path(r).absolute() for r in args.reuse_from]
        for run_dir in runs:
            if not (run_dir / "tasks").is_dir():
                raise ConfigError(f"--reuse-from {run_dir}: not a run folder (it has no tasks/)")
        return runs
    if args.overrides_from:
        best = Path(args.overrides_from).absolute()
        if best.parent.name == "tune" and (best.parent.parent / "tasks").is_dir():
            return [best.parent.parent]
    return []


def load(args: argparse.Namespace) -> PipelineConfig:
    """The config from the command line, every path in it made absolute (Ray workers run in
    another working directory, where a relative path names nothing)."""
    overrides = (overrides_from(args.overrides_from) if args.overrides_from else []) + args.overrides
    return absolute_paths(load_config(PipelineConfig, args.config, overrides))


def init_ray(log=print, dashboard: bool = True, verbose: bool = False) -> bool:
    """Joins ``RAY_ADDRESS`` / a ``ray start`` cluster, else starts a local Ray, with the cluster's
    address pinned for this process and its workers (:func:`jobs.cli.start_or_join_ray`) and a
    quiet console unless ``verbose`` (:mod:`jobs.console`). Returns whether this process connected
    (and so must call ``ray.shutdown()``)."""
    import logging

    import ray

    from jobs.cli import start_or_join_ray
    from jobs.console import quiet_driver, set_verbose

    env = set_verbose(verbose)
    if ray.is_initialized():
        start_or_join_ray(log)  # pins RAY_ADDRESS for this process
        return False
    # Workers' lines (each task's per-epoch progress) reach this console through Ray's own log
    # forwarding. With the dashboard: without its State API, Ray 2.60's Train runs print a
    # "State API may be temporarily unavailable" line every few seconds (and Tune needs it).
    token = _TokenNotice()  # Ray's paragraph on token auth, as a clause of the line below
    auth_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not verbose:
        auth_logger.addFilter(token)
    try:
        started, address = start_or_join_ray(log, runtime_env={"env_vars": env}, include_dashboard=dashboard,
                                             log_to_driver=True,
                                             logging_level=logging.INFO if verbose else logging.WARNING)
    finally:
        auth_logger.removeFilter(token)
    quiet_driver()
    res = ray.cluster_resources()
    log(f"ray: {'started' if started else 'joined'} {address}: {len([n for n in ray.nodes() if n['Alive']])} node(s), "
        f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
        + ("; token authentication on (RAY_AUTH_MODE=disabled turns it off)" if token.seen else ""))
    return True  # connected here: ray.shutdown() stops a local Ray, or leaves a joined cluster


class _TokenNotice:
    """A logging filter that drops Ray's "Token authentication is enabled" warning and remembers it."""

    seen = False

    def filter(self, record) -> bool:
        if "Token authentication is enabled" in record.getMessage():
            self.seen = True
            return False
        return True


def make_tracker(cfg: PipelineConfig, out: Path, job: str = "pipeline"):
    if not cfg.tracking.enabled:
        return NullTracker()
    from jobs.tracking import MlflowTracker

    # The output folder in the name: runs of one config into other folders are told apart.
    return MlflowTracker(f"{job}:{cfg.name} ({Path(out).name})", cfg, out, job=job)


def make_runner(cfg: PipelineConfig, out: Path, tracker, log=print):
    if cfg.resources.runner == "local":
        from supersub.runner import LocalRunner

        return LocalRunner(cfg.device, retries=1, log=log, tracker=tracker)
    from jobs.runner import RayRunner

    return RayRunner(cfg.resources, out, data_loader=cfg.data.loader, log=log, tracker=tracker)


def run(cfg: PipelineConfig, out: Path, log=print, verbose: bool = False,
        reuse_from: Sequence[Path] = ()) -> dict[str, Any]:
    """The job: runner and tracker around :func:`run_pipeline` (``reuse_from``: other runs'
    folders whose finished tasks are linked in, not trained)."""
    out = Path(out).absolute()
    check_inputs(cfg, out)
    started = init_ray(log, verbose=verbose) if cfg.resources.runner == "ray" else False
    reclaim_signals()  # ray.init replaced the SIGTERM handler
    try:
        # The runner first: a cluster that cannot run the job (a storage path some node cannot
        # see) is refused before a tracker run opens.
        runner = make_runner(cfg, out, NullTracker(), log)
        runner.tracker = tracker = make_tracker(cfg, out)
        with tracker if hasattr(tracker, "__enter__") else contextlib.nullcontext():
            if hasattr(tracker, "run_id"):
                log(tracker.where())
            try:
                return run_pipeline(cfg, out, runner, tracker, log, reuse_from=reuse_from)
            except KeyboardInterrupt:  # SIGINT / SIGTERM (jobs.interrupt)
                if hasattr(runner, "stop"):
                    runner.stop()  # no Train run starts after this
                if started:  # the running Train runs end with this connection (their controllers
                    import ray  # are owned by this driver), before the tracker marks them KILLED

                    ray.shutdown()
                raise
    finally:
        if started:
            import ray

            ray.shutdown()


def plan(args: argparse.Namespace) -> int:
    """``--plan``: :func:`supersub.plan.make_plan` printed (and ``--plan-json``), nothing trained."""
    from supersub.plan import format_plan, make_plan

    try:
        cfg = load(args)
        result = make_plan(cfg, Path(args.out).absolute() if args.out else None, args.plan_throughput,
                           log=lambda s: print(s, flush=True), gpu=args.plan_gpu)
    except UserError as e:
        return fail(e, "jobs.pipeline")
    print(format_plan(result), flush=True)
    if args.plan_json:
        Path(args.plan_json).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(help_config())
        return 0
    if args.plan:
        return plan(args)
    if args.plan_gpu or args.plan_throughput or args.plan_json:
        return fail(ConfigError("--plan-gpu, --plan-throughput and --plan-json need --plan"), "jobs.pipeline")
    if not args.out:
        return fail(ConfigError("--out is required"), "jobs.pipeline")
    try:
        with signals_interrupt("jobs.pipeline"):
            cfg = load(args)
            run(cfg, Path(args.out), log=lambda s: print(s, flush=True), verbose=args.verbose,
                reuse_from=reuse_runs(args))
    except Interrupted as e:
        print(interrupted_line("jobs.pipeline", e), file=sys.stderr, flush=True)
        return e.exit_code
    except TaskFailed as e:
        print(str(e), file=sys.stderr)
        print(f"jobs.pipeline: error: {e.first_line}", file=sys.stderr)
        return 1
    except UserError as e:
        return fail(e, "jobs.pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
