"""The tune job: ``python -m jobs.tune --space tune_spaces/FILE.yaml --config FILE --out DIR``.

Searches the specialists' delta settings (``delta.keep``, ``delta.bits``, ``specialist.optim.lr``,
optionally ``delta.mask``, ``delta.stages``, ...) with Ray Tune and ASHA, then writes
``DIR/tune/pareto.json``, ``pareto.png`` (mean accuracy vs mean delta size, as a fraction of one
network) and ``best.yaml``: the most accurate setting whose deltas fit ``--budget``, which
``python -m jobs.pipeline ... --overrides-from DIR/tune/best.yaml`` uses.

Ray 2.60 / Train V2 way of tuning: each Tune trial is a function that builds and fits its own
``TorchTrainer``. A trial's trainer has one worker per chosen superclass, each finetuning that
superclass's specialist (fractional CPUs/GPUs); every epoch all workers report (a report is a
barrier, so epochs stay in step) and :class:`MeanReport` hands Tune the mean over superclasses,
on which ASHA stops weak trials. The last report of a completed trial carries the exported
deltas' accuracy and bytes.

The resident network comes from the pipeline's own data and base-network stages, run here
through a ``RayRunner`` (skipped when done), or from an earlier pipeline output (``--from``).
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

from jobs.pipeline import init_ray, make_tracker
from supersub.config import ConfigError, load_config, to_dict
from supersub.pipeline import PipelineConfig

# Keys a space may search, and where they live in a SpecialistTask.
SEARCHABLE = {"delta": ("delta",), "specialist.optim": ("optim",)}
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


def load_space(path: Path) -> dict[str, Any]:
    """A space file: ``space`` (key → sampler), ``num_samples``, ``max_concurrent_trials``,
    ``scheduler`` (ASHA ``grace_period``, ``reduction_factor``), ``overrides`` (key=value list)."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - {"space", "num_samples", "max_concurrent_trials", "scheduler", "overrides"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return spec


def parse_space(spec: dict[str, Any]) -> dict[str, Any]:
    """``{key: {sampler: args}}`` → Tune search space; keys checked against the config."""
    from ray import tune

    known = {k for k in _flat(to_dict(PipelineConfig()))}
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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def apply_params(task: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A specialist task dict with a trial's ``delta.*`` / ``specialist.optim.*`` values."""
    task = json.loads(json.dumps(task))
    for key, value in params.items():
        prefix = next(p for p in SEARCHABLE if key.startswith(p + "."))
        node = task
        for part in SEARCHABLE[prefix] + tuple(key[len(prefix) + 1:].split(".")[:-1]):
            node = node[part]
        node[key.rsplit(".", 1)[1]] = value
    return task


# ----------------------------------------------------------------------------- trials
def trial_loop(config: dict[str, Any]) -> None:
    """One Train worker of a trial: the specialist of superclass ``tasks[rank]``, alone (no DDP)."""
    import ray.train
    import ray.train.torch

    from supersub.stages import StageContext, finetune_specialist, specialist_task_from_dict

    rank = ray.train.get_context().get_world_rank()
    task = specialist_task_from_dict(config["tasks"][rank])
    ctx = StageContext(device=ray.train.torch.get_device(), report=lambda metrics, ckpt: ray.train.report(metrics),
                       log=lambda s: print(s, flush=True))
    result = finetune_specialist(task, ctx)
    ray.train.report({"final": 1, **{k: result[k] for k in ("val_acc", "delta_bytes", "delta_ratio", "delta_density")}})


def _mean_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class MeanReport(TuneReportCallback):
        """Hands Tune the mean of every numeric metric over the workers (the superclasses)."""

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

    trial_id = ray.tune.get_context().get_trial_id()
    tasks = [apply_params(t, config["params"]) for t in config["tasks"]]
    for t in tasks:
        t["out_dir"] = str(Path(config["trials_dir"]) / trial_id / f"{t['superclass']:03d}")
    res = config["resources"]
    trainer = TorchTrainer(
        trial_loop,
        train_loop_config={"tasks": tasks},
        scaling_config=ray.train.ScalingConfig(
            num_workers=len(tasks), use_gpu=res["gpus"] > 0,
            resources_per_worker={"CPU": res["cpus"]} | ({"GPU": res["gpus"]} if res["gpus"] > 0 else {}),
        ),
        run_config=ray.train.RunConfig(name=f"trial-{trial_id}", storage_path=config["storage"],
                                       callbacks=[_mean_report_callback()]),
    )
    trainer.fit()


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


def base_stages(cfg: PipelineConfig, base: Path, runner, tracker, log):
    """The pipeline's data and base-network stages (skipped when done): manifest folder, data
    options, the stage folder holding the resident network, and the hierarchy."""
    from supersub.data import load_manifest
    from supersub.pipeline import train_base_networks

    manifest_dir, stages, data = train_base_networks(cfg, base, runner, tracker, log)
    return manifest_dir, data, stages, load_manifest(manifest_dir).hierarchy


def run_tune(cfg: PipelineConfig, space_file: Path, out: Path, base: Path, superclasses: list[int] | None,
             budget: float, log=print) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.runner import RayRunner
    from supersub.pipeline import specialist_tasks
    from supersub.stages import task_to_dict

    spec = load_space(space_file)
    space = parse_space(spec.get("space", {}))
    tune_dir = out / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg, out, job="tune")
    with tracker if hasattr(tracker, "__enter__") else contextlib.nullcontext():
        runner = RayRunner(cfg.resources, base, data_loader=cfg.data.loader, log=log)
        _, data, stages, hierarchy = base_stages(cfg, base, runner, tracker, log)
        tasks = specialist_tasks(cfg, data, stages, hierarchy, tune_dir / "trials")
        tasks = [t for t in tasks if superclasses is None or t.superclass in superclasses]
        if not tasks:
            raise ConfigError(f"--superclasses {superclasses}: the hierarchy has {hierarchy.num_superclasses}")
        cpus, gpus = cfg.resources.specialist_cpus, cfg.resources.specialist_gpus
        import ray

        free = ray.available_resources()
        fits = [math.floor(free.get(k, 0) / (need * len(tasks)) + 1e-9) for k, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
        concurrent = max(1, min([*fits, spec.get("max_concurrent_trials") or math.inf]))
        _check_state_api(log)
        epochs = cfg.specialist.optim.epochs
        sched = spec.get("scheduler") or {}
        log(f"tune: {spec.get('num_samples', 8)} trials over {sorted(space)} for superclasses "
            f"{[t.superclass for t in tasks]}, {concurrent} at a time, ASHA on val_acc over {epochs} epochs")
        tuner = tune.Tuner(
            # The trial function only builds and fits a trainer, whose workers hold the resources.
            # Tune refuses an empty request; a CPU token would leave too little for the workers.
            tune.with_resources(trial_fn, {"cpu": 0, "memory": 1}),
            param_space={
                "params": space,
                "tasks": [task_to_dict(t) for t in tasks],
                "trials_dir": str(tune_dir / "trials"),
                "storage": str((tune_dir / "ray").resolve()),
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
            run_config=tune.RunConfig(name="tune", storage_path=str((tune_dir / "ray").resolve())),
        )
        grid = tuner.fit()
        return summarise(grid, tune_dir, budget, tracker, log, space_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[1])
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--config", help="pipeline config YAML (default: --from DIR/config.yaml, else built-in defaults)")
    p.add_argument("--out", help="output folder (DIR/tune/...); default: --from")
    p.add_argument("--from", dest="from_dir", help="an earlier pipeline output whose data and base networks to use")
    p.add_argument("--superclasses", help="comma-separated superclass indices (default: all)")
    p.add_argument("--budget", type=float, default=0.05, help="largest mean delta size, as a fraction of one network")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides")
    args = p.parse_args(argv)
    if not (args.out or args.from_dir):
        p.error("--out or --from is required")
    out = Path(args.out or args.from_dir)
    config = args.config or (Path(args.from_dir) / "config.yaml" if args.from_dir else None)
    try:
        # The space file's own overrides (e.g. fewer epochs for trials) first; the command line wins.
        cfg = load_config(PipelineConfig, config, list(load_space(Path(args.space)).get("overrides", [])) + args.overrides)
        chosen = [int(s) for s in args.superclasses.split(",")] if args.superclasses else None
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    started = init_ray(lambda s: print(s, flush=True), dashboard=True)
    try:
        run_tune(cfg, Path(args.space), out, Path(args.from_dir or out), chosen, args.budget,
                 log=lambda s: print(s, flush=True))
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
    """pareto.json, pareto.png, best.yaml; one MLflow run per trial."""
    trials = []
    for r in grid:
        m = r.metrics or {}
        status = "error" if r.error else ("completed" if m.get("final") == 1 else "stopped early")
        df = r.metrics_dataframe
        rows = [] if df is None else df.to_dict("records")
        history = [{**row, "epoch": int(row["training_iteration"])} for row in rows if row.get("final") != 1]
        trial = {"trial_id": m.get("trial_id", Path(r.path).name), "status": status, "params": r.config["params"],
                 "val_acc": m.get("val_acc"), "iterations": m.get("training_iteration")}
        if status == "completed":
            trial.update({k: m[k] for k in ("delta_bytes", "delta_ratio", "delta_density")})
        trials.append(trial)
        tracker.stage(f"trial {trial['trial_id']}", {**trial["params"], "status": status},
                      {**{k: v for k, v in trial.items() if k not in ("params", "status")}, "history": history})
    done = [t for t in trials if t["status"] == "completed"]
    front = pareto_front(done)
    fits = [t for t in done if t["delta_ratio"] <= budget]
    best = max(fits, key=lambda t: (t["val_acc"], -t["delta_ratio"])) if fits else None  # ties: the smaller
    summary = {"budget": budget, "trials": trials, "front": [t["trial_id"] for t in front], "best": best}
    (tune_dir / "pareto.json").write_text(json.dumps(summary, indent=2, default=float))
    plot_pareto(done, front, best, budget, tune_dir / "pareto.png")
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
    tracker.summary({"trials": len(trials), "completed": len(done), "best": best or {}}, artifacts)
    return summary


def plot_pareto(done, front, best, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t["delta_ratio"] for t in done], [t["val_acc"] for t in done], c="0.6", label="completed trials")
    ax.plot([t["delta_ratio"] for t in front], [t["val_acc"] for t in front], "o-", c="C3", label="Pareto front")
    if best:
        ax.scatter([best["delta_ratio"]], [best["val_acc"]], marker="*", s=250, c="C2", zorder=3, label="best in budget")
    ax.axvline(budget, ls="--", c="0.3", label=f"budget {budget}")
    ax.set_xlabel("mean delta size (fraction of one network)")
    ax.set_ylabel("mean specialist val accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
