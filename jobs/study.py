"""A study: pipeline variants × seeds over shared data and tasks, one table of accuracy beside cost.

    python -m jobs.study --study jobs/configs/study_default.yaml --out runs/study [--seeds 0,1,2] [key=value ...]
    python -m jobs.study --study jobs/configs/study_tiny_imagenet.yaml --plan    # the bill, nothing trained

The study file names a base pipeline config and the variants, each a list of ``key=value``
overrides (or ``{overrides: [...], seeds: [...]}``); ``key=value`` on the command line applies to
every variant and wins over the variant's own (as a command line wins over a config file: a smoke
test with ``train.epochs=1`` shortens every variant), ``--seeds`` to every variant without its own. Every run writes
``OUT/<variant>/seed<k>/`` (metrics.json, predictions.parquet, bundle/); every task lives in
``OUT/shared/tasks/`` under its fingerprint, so runs share exactly the tasks whose inputs and
settings agree (the vanilla network of one seed is trained once for every variant, and is also
the second member of the previous seed's ensemble). ``--time-budget-s`` starts no new run after
that long; what finished stays in ``OUT/study.json`` and ``OUT/study.md``, and a rerun continues.

It runs in this process (``resources.runner=local``), with neither Ray nor MLflow needed: on a
GPU machine without Ray as on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jobs.cli import fail
from jobs.interrupt import interrupted_line, signals_interrupt
from supersub.config import ConfigError, load_config
from supersub.errors import UserError
from supersub.pipeline import check_inputs, run_pipeline
from supersub.pipeline_config import PipelineConfig, absolute_paths
from supersub.runner import Interrupted, LocalRunner
from supersub.study import summarise, write_regime_map, write_summary


def load_study(path: str | Path) -> tuple[Path, dict[str, dict[str, Any]], list[int] | None]:
    """``(base config path, {variant: {"overrides": [...], "seeds": [...] | None}}, the file's seeds)``.

    A variant's ``seeds`` is its own (None without); the file's top-level ``seeds`` is kept apart
    because ``--seeds`` on the command line wins over it but not over a variant's own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"config", "variants", "seeds"}
    if unknown or "config" not in data or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise ConfigError(f"{path}: a study file has 'config' (a pipeline config), a non-empty 'variants' mapping "
                          "and optionally 'seeds'")
    default_seeds = data.get("seeds")
    variants = {}
    for name, spec in data["variants"].items():
        if isinstance(spec, dict):
            extra = set(spec) - {"overrides", "seeds"}
            if extra:
                raise ConfigError(f"{path}: variant {name}: unknown keys {sorted(extra)}")
            overrides, seeds = list(spec.get("overrides") or []), spec.get("seeds")
        else:
            overrides, seeds = list(spec or []), None
        variants[str(name)] = {"overrides": overrides, "seeds": seeds}
    return (path.parent / data["config"]).resolve(), variants, default_seeds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study YAML (config + variants)")
    p.add_argument("--out", help="output folder (required unless --plan)")
    p.add_argument("--variants", help="comma-separated subset of the variants, in the file's order")
    p.add_argument("--seeds", help="comma-separated seeds for every variant without its own "
                   "(default: the study file's 'seeds', else 0)")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="start no new run after this many seconds")
    p.add_argument("--plan", action="store_true", help="print every run's tasks as jobs.pipeline --plan does, then "
                   "the study's bill with each task shared by several runs counted once; train nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant (over the variant's own)")
    args = p.parse_args(argv)
    if not args.out and not args.plan:
        p.error("the following arguments are required: --out (or --plan)")
    return args


def plan_runs(args: argparse.Namespace) -> tuple[list[tuple[str, int, PipelineConfig]], dict[str, Any]]:
    """Every (variant, seed, config) to run, validated before any of them starts."""
    config_path, variants, file_seeds = load_study(args.study)
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        missing = [v for v in chosen if v not in variants]
        if missing:
            raise ConfigError(f"unknown variant(s) {missing}; the study has {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in chosen}
    cli_seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    runs = []
    for name, v in variants.items():
        for seed in v["seeds"] or cli_seeds or file_seeds or [0]:
            cfg = load_config(PipelineConfig, config_path,
                              [*v["overrides"], *args.overrides, f"name={name}", f"seed={seed}", "resources.runner=local"])
            runs.append((name, int(seed), absolute_paths(cfg)))
    return runs, {"study": str(Path(args.study).resolve()), "config": str(config_path)}


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C / SIGTERM: the running task stops after its last checkpoint, one line, exit 130 /
    143; the runs that finished stay in study.json and a rerun continues."""
    args = parse_args(argv)
    try:
        with signals_interrupt("jobs.study"):
            return run_study(args)
    except Interrupted as e:
        print(interrupted_line("jobs.study", e), file=sys.stderr, flush=True)
        return e.exit_code


def print_plan(runs: list[tuple[str, int, PipelineConfig]]) -> None:
    """Each run's plan, then the study's: a task that several runs share (same folder, and below
    a learned hierarchy the same spec, as the runs would share it) is billed once."""
    from supersub.plan import format_plan, make_plan
    from supersub.stages import BASE

    unique: dict[tuple[str, str], dict[str, Any]] = {}
    unit = "cpu_hours"
    for name, seed, cfg in runs:
        plan = make_plan(cfg, None, log=lambda _: None)
        print(f"===== {name} seed {seed}\n{format_plan(plan)}\n", flush=True)
        unit = "gpu_hours" if plan["cluster"]["trains_on_gpus"] else "cpu_hours"
        for t in plan["tasks"]:
            # Planned below a learned hierarchy on the built one: its folder alone would merge it
            # with the same task of a run on the built hierarchy.
            unique.setdefault((t["folder"], "" if t["stage"] == BASE else cfg.data.hierarchy), t)
    tasks = list(unique.values())
    print(f"study: {len(runs)} runs, {len(tasks)} distinct tasks, {sum(t['train_images'] for t in tasks):,} training "
          f"images, {sum(t[unit] for t in tasks):,.1f} {'GPU' if unit == 'gpu_hours' else 'CPU'}-hours "
          "(each shared task once; evaluation and start-up not included)", flush=True)


def run_study(args: argparse.Namespace) -> int:
    try:
        runs, info = plan_runs(args)
        if args.plan:
            print_plan(runs)
            return 0
        out = Path(args.out).absolute()
        for _, _, cfg in runs:
            check_inputs(cfg, out)
    except UserError as e:
        return fail(e)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = out / "study.json"
    for name, seed, cfg in runs:
        run_dir = out / name / f"seed{seed}"
        if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
            print(f"time budget spent: {name} seed {seed} and later runs not started", flush=True)
            break
        print(f"===== {name} seed {seed}", flush=True)
        t0 = time.perf_counter()
        metrics = run_pipeline(cfg, run_dir, LocalRunner(cfg.device), shared_dir=out / "shared",
                               log=lambda s: print(s, flush=True))
        metrics["run_seconds"] = time.perf_counter() - t0
        # Re-read before writing: another study process on the same folder (other runs side by
        # side) may have added its results since this one started.
        merged = json.loads(summary.read_text())["results"] if summary.is_file() else {}
        merged.setdefault(name, {})[str(seed)] = {"dir": str(run_dir), "metrics": metrics}
        summary.write_text(json.dumps({**info, "results": merged}, indent=2))
    if not summary.is_file():
        print("(no run finished)")
        return 0
    results = json.loads(summary.read_text())["results"]
    table = summarise(results, bootstrap=1000)
    write_summary(table, out)
    print((out / "study.md").read_text(), flush=True)
    if write_regime_map(results, out, bootstrap=1000):
        print("the regime map (each two-stage model minus the best control at no more than its FLOPs):\n"
              + (out / "regime_map.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
