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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
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


class AllTrialsFailed(RuntimeError):
    pass


def load_space(path: Path) -> dict[str, Any]:
    """A space file: ``space`` (key → sampler), ``num_samples``, ``max_concurrent_trials``,
    ``scheduler`` (ASHA ``grace_period``, ``reduction_factor``), ``overrides`` (key=value list)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - {"space", "num_samples", "max_concurrent_trials", "scheduler", "overrides"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return spec


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

    from supersub.tasks import TaskContext, task_from_dict

    rank = ray.train.get_context().get_world_rank()
    task = task_from_dict(config["tasks"][rank])
    ctx = TaskContext(device=ray.train.torch.get_device(), report=lambda metrics, ckpt: ray.train.report(metrics),
                      log=lambda s: print(s, flush=True))
    result = task.run(ctx)
    ray.train.report({"final": 1, **{k: result[k] for k in ("val_acc", "delta_bytes", "delta_ratio", "delta_density")}})


def _mean_report_callback(logger):
    from ray.tune.integration.ray_train import TuneReportCallback

    class MeanReport(TuneReportCallback):
        """Hands Tune (and the trial's MLflow run, as each epoch ends) the mean of every numeric
        metric over the workers (the superclasses); keeps the last report's mean (the exported
        deltas) as ``final``."""

        final: dict = {}

        def after_report(self, run_context, metrics, checkpoint):
            keys = [k for k, v in metrics[0].items() if isinstance(v, (int, float))]
            mean = {k: sum(float(m[k]) for m in metrics) / len(metrics) for k in keys}
            if "final" in mean:
                self.final = mean
            elif logger:
                logger.epoch(mean)
            super().after_report(run_context, [mean], checkpoint)

    return MeanReport()


def trial_fn(config: dict[str, Any], logger=None) -> None:
    """A Tune trial: builds and fits its own TorchTrainer (Train V2 + Tune)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer

    trial_id = ray.tune.get_context().get_trial_id()
    tasks = [apply_params(t, config["params"]) for t in config["tasks"]]
    for t in tasks:
        t["out_dir"] = str(Path(config["trials_dir"]) / trial_id / f"{t['superclass']:03d}")
    if logger:
        logger.name = f"trial {trial_id}"
        logger.params = {**logger.params, **config["params"]}
        logger.started()
    res = config["resources"]
    callback = _mean_report_callback(logger)
    trainer = TorchTrainer(
        trial_loop,
        train_loop_config={"tasks": tasks},
        scaling_config=ray.train.ScalingConfig(
            num_workers=len(tasks), use_gpu=res["gpus"] > 0,
            resources_per_worker={"CPU": res["cpus"]} | ({"GPU": res["gpus"]} if res["gpus"] > 0 else {}),
        ),
        run_config=ray.train.RunConfig(name=f"trial-{trial_id}", storage_path=config["storage"],
                                       callbacks=[callback]),
    )
    try:
        trainer.fit()
    except BaseException as e:
        if logger:
            logger.failed(f"{type(e).__name__}: {e}")
        raise
    if logger:
        logger.finished(callback.final)


# ----------------------------------------------------------------------------- the job
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
             budget: float, log=print) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.runner import RayRunner, fit_slots
    from supersub.pipeline import specialist_tasks, train_base_networks

    spec = load_space(space_file)
    space = parse_space(spec.get("space", {}))
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
        log(f"tune: {spec.get('num_samples', 8)} trials over {sorted(space)} for superclasses "
            f"{[t.superclass for t in tasks]}, {concurrent} at a time, ASHA on val_acc over {epochs} epochs")
        logger = None
        if hasattr(tracker, "run_id"):  # one nested run per trial, opened when the trial starts
            from jobs.tracking import MlflowTaskLogger

            logger = MlflowTaskLogger(tracker.tracking_uri, tracker.experiment_id, tracker.run_id, "trial", {},
                                      {"supersub.kind": "tune_trial"})
        tuner = tune.Tuner(
            # The trial function only builds and fits a trainer, whose workers hold the resources.
            # Tune refuses an empty request; a CPU token would leave too little for the workers.
            tune.with_resources(tune.with_parameters(trial_fn, logger=logger), {"cpu": 0, "memory": 1}),
            param_space={
                "params": space,
                "tasks": [t.to_dict() for t in tasks],
                "trials_dir": str(tune_dir / "trials"),
                "storage": str(tune_dir / "ray"),
                "resources": {"cpus": cpus, "gpus": gpus},
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
            run_config=tune.RunConfig(name="tune", storage_path=str(tune_dir / "ray")),
        )
        grid = tuner.fit()
        return summarise(grid, tune_dir, budget, tracker, log, space_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[1])
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--config", help="pipeline config YAML (default: --from RUN/config.yaml, else built-in defaults)")
    p.add_argument("--out", help="output folder (OUT/tune/...); default: --from")
    p.add_argument("--from", dest="from_dir", help="an earlier pipeline output whose data and base networks to use")
    p.add_argument("--superclasses", help="comma-separated superclass indices (default: all)")
    p.add_argument("--budget", type=float, default=0.05, help="largest mean delta size, as a fraction of one network")
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
        cfg = absolute_paths(load_config(PipelineConfig, config,
                                         list(load_space(Path(args.space)).get("overrides", [])) + args.overrides))
        try:
            chosen = [int(s) for s in args.superclasses.split(",")] if args.superclasses else None
        except ValueError:
            raise ConfigError(f"--superclasses {args.superclasses}: expected comma-separated integers") from None
    except UserError as e:
        return fail(e, "jobs.tune")
    started = init_ray(lambda s: print(s, flush=True))
    try:
        run_tune(cfg, Path(args.space).absolute(), out, from_dir or out, chosen, args.budget,
                 log=lambda s: print(s, flush=True))
    except AllTrialsFailed as e:
        fail(e, "jobs.tune")
        return 1
    except UserError as e:
        return fail(e, "jobs.tune")
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0


# ----------------------------------------------------------------------------- results
def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that no other beats on both accuracy (higher) and delta size (lower)."""
    front, best = [], -math.inf
    for t in sorted(trials, key=lambda t: (t["delta_ratio"], -t["val_acc"])):
        if t["val_acc"] > best:
            front.append(t)
            best = t["val_acc"]
    return front


def summarise(grid, tune_dir: Path, budget: float, tracker, log, space_file: Path) -> dict[str, Any]:
    """pareto.json, pareto.png, best.yaml; raises :class:`AllTrialsFailed` if no trial completed
    and every one failed."""
    from supersub.plots import pareto

    trials, errors = [], []
    for r in grid:
        m = r.metrics or {}
        status = "error" if r.error else ("completed" if m.get("final") == 1 else "stopped early")
        if r.error:
            errors.append(str(r.error).strip().splitlines()[-1] if str(r.error).strip() else type(r.error).__name__)
        trial = {"trial_id": m.get("trial_id", Path(r.path).name), "status": status, "params": r.config["params"],
                 "val_acc": m.get("val_acc"), "iterations": m.get("training_iteration")}
        if status == "completed":
            trial.update({k: m[k] for k in ("delta_bytes", "delta_ratio", "delta_density")})
        trials.append(trial)
    done = [t for t in trials if t["status"] == "completed"]
    if trials and len(errors) == len(trials):
        raise AllTrialsFailed(f"all {len(trials)} trials failed; the first: {errors[0]}")
    front = pareto_front(done)
    fits = [t for t in done if t["delta_ratio"] <= budget]
    best = max(fits, key=lambda t: (t["val_acc"], -t["delta_ratio"])) if fits else None  # ties: the smaller
    summary = {"budget": budget, "trials": trials, "front": [t["trial_id"] for t in front], "best": best}
    (tune_dir / "pareto.json").write_text(json.dumps(summary, indent=2, default=float))
    if done:
        pareto(done, front, None, tune_dir / "pareto.png", budget=budget, best=best)
    artifacts = [tune_dir / "pareto.json", tune_dir / "pareto.png", space_file]
    log(f"{'trial':<12}{'status':<15}{'val acc':>8}{'bytes/net':>10}  params")
    for t in sorted(trials, key=lambda t: -(t["val_acc"] or 0)):
        ratio = f"{t['delta_ratio']:.4f}" if "delta_ratio" in t else "-"
        log(f"{t['trial_id']:<12}{t['status']:<15}{t['val_acc'] or float('nan'):>8.2f}{ratio:>10}  {t['params']}")
    if best is None:
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
