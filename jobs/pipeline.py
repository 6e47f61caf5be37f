"""The pipeline job: ``python -m jobs.pipeline --config FILE --out DIR [key=value ...]``.

Runs :func:`supersub.pipeline.run_pipeline` with a :class:`jobs.runner.RayRunner` (Ray Train
runs; ``ray job submit -- python -m jobs.pipeline ...`` works the same) or, with
``resources.runner=local``, the core's in-process ``LocalRunner``; tracked by
:class:`jobs.tracking.MlflowTracker` unless ``tracking.enabled=false``. Ray and MLflow are
imported only when used, so ``resources.runner=local tracking.enabled=false`` runs where
neither is installed.

Ray: ``RAY_ADDRESS`` or a cluster started with ``ray start`` on this machine is joined;
otherwise an embedded local Ray starts and stops with the job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from supersub.config import ConfigError, describe, dotted_keys, load_config, to_dict
from supersub.pipeline import PipelineConfig, run_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.pipeline",
        description="Super-Sub pipeline: data → vanilla [+ generalist] → N specialists → evaluation → bundle.",
        epilog="Example: python -m jobs.pipeline --config jobs/configs/default.yaml --out runs/a train.epochs=2",
    )
    p.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    p.add_argument("--out", help="output folder; rerunning with the same folder resumes / skips finished stages")
    p.add_argument("--overrides-from", metavar="YAML", help="overrides from a file, e.g. DIR/tune/best.yaml; "
                   "command-line key=value pairs still win")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. delta.bits=4")
    return p


def help_config(cls: type = PipelineConfig) -> str:
    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{k:<{width}}  {json.dumps(v):<24} {h}" for k, v, h in rows)


def overrides_from(path: str | Path) -> list[str]:
    """``key=value`` strings from a YAML file: either ``overrides: {dotted.key: value}`` (what
    ``jobs.tune`` writes to best.yaml) or a nested mapping of config sections."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    data = data.get("overrides", data)
    # JSON is YAML: load_config parses the values back.
    return [f"{k}={json.dumps(v)}" for k, v in dotted_keys(data).items()]


def init_ray(log=print, dashboard: bool = False) -> bool:
    """Joins ``RAY_ADDRESS`` / a ``ray start`` cluster, else starts a local Ray. Returns whether
    this process started (and so must stop) Ray."""
    import ray

    if ray.is_initialized():
        return False
    # ray.init() itself joins RAY_ADDRESS or the cluster recorded by `ray start`, else starts one.
    # No dashboard for an embedded Ray: it costs seconds and memory; the job prints progress.
    ray.init(include_dashboard=dashboard, log_to_driver=False)
    res = ray.cluster_resources()
    log(f"ray: {len([n for n in ray.nodes() if n['Alive']])} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    return True


def make_tracker(cfg: PipelineConfig, out: Path, job: str = "pipeline"):
    from supersub.pipeline import NullTracker

    if not cfg.tracking.enabled:
        return NullTracker()
    from jobs.tracking import MlflowTracker

    return MlflowTracker(
        f"{job}:{cfg.name}",
        to_dict(cfg),
        tracking_uri=cfg.tracking.tracking_uri,
        experiment=cfg.tracking.experiment,
        tags={"supersub.job": job, "supersub.out_dir": str(out.resolve())},
        log_bundle=cfg.tracking.log_bundle,
    )


def make_runner(cfg: PipelineConfig, out: Path, log=print):
    if cfg.resources.runner == "local":
        from supersub.pipeline import LocalRunner

        return LocalRunner(cfg.device, retries=1, log=log)
    from jobs.runner import RayRunner

    return RayRunner(cfg.resources, out, data_loader=cfg.data.loader, log=log)


def run(cfg: PipelineConfig, out: Path, log=print) -> dict[str, Any]:
    """The job: runner and tracker around :func:`run_pipeline`."""
    if cfg.data.loader == "ray_data" and cfg.resources.runner != "ray":
        raise ConfigError("data.loader=ray_data needs resources.runner=ray")
    # Absolute: Ray Train workers run in their own working directory, where a relative path
    # would name nothing.
    out = Path(out).absolute()
    started = init_ray(log) if cfg.resources.runner == "ray" else False
    try:
        runner = make_runner(cfg, out, log)
        tracker = make_tracker(cfg, out)
        if not hasattr(tracker, "__enter__"):
            return run_pipeline(cfg, out, runner, tracker, log)
        with tracker:
            log(f"mlflow: run {tracker.run_id} in {tracker.tracking_uri}")
            metrics = run_pipeline(cfg, out, runner, tracker, log)
            tracker.artifact(out / "plots")  # confusion plots, when the core writes them
            return metrics
    finally:
        if started:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(help_config())
        return 0
    if not args.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    try:
        overrides = (overrides_from(args.overrides_from) if args.overrides_from else []) + args.overrides
        cfg = load_config(PipelineConfig, args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run(cfg, Path(args.out), log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
