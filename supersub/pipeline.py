"""The whole Super-Sub pipeline, independent of where its tasks run: data, then the stages of
:mod:`supersub.stages` in turn, then evaluation, the controls sized by the served model's FLOPs
(evaluated alone and merged in), and the outputs.

    data (manifest, opened once and carried)
      → the stages (:class:`supersub.stages.PipelineTasks`), each run before the next is built
      → evaluation: calibrate routing on val, every model on test with its cost
        [→ FLOPs-matched controls → their rows alone, merged into the evaluation]
      → bundle/, metrics.json, predictions.parquet, report/ (written once, from the evaluation)

Each stage is a list of tasks (:mod:`supersub.tasks`) handed to a runner (:mod:`supersub.runner`);
a task's folder is named by its fingerprint, so a rerun with the same ``--out`` reuses exactly
the tasks whose inputs and settings are unchanged, and trains the others anew beside them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supersub import atomic
from supersub.bundle import write_bundle
from supersub.config import ConfigError, save_config, to_dict
from supersub.data import Manifest, load_manifest
from supersub.data.manifest import check_manifest
from supersub.epoch import amp_dtype, pick_device
from supersub.evaluation import Evaluation, EvaluationInputs, evaluate_run, save_predictions
from supersub.networks import network_hash
from supersub.pipeline_config import PipelineConfig
from supersub.runner import LocalRunner, NullTracker, Runner, Tracker, remove_leftovers, run_tasks
from supersub.stages import (
    PipelineTasks,
    Stage,
    ensemble_size,
    network_task,
    specialist_task,
    specialist_tasks,
)
from supersub.tasks import DataOptions, JointTask, LearnedHierarchyTask, Task, digest, expert_dir

__all__ = [  # the task constructors and ensemble_size too: jobs, tests and benchmarks build single tasks
    "check_inputs", "data_options", "ensemble_size", "evaluate", "format_summary", "network_task", "open_data",
    "prepare_data", "run_pipeline", "specialist_task", "specialist_tasks", "train_base_networks", "write_outputs",
]


# ----------------------------------------------------------------------------- data
def data_spec(cfg: PipelineConfig) -> dict[str, Any]:
    """What the manifest depends on (not how it is read): a change rebuilds it."""
    spec = {k: v for k, v in to_dict(cfg.data).items()
            if k not in ("loader", "num_workers", "cache_dir", "decode", "learned_from", "learned_min_size",
                         "manifest")}
    spec["hierarchy"] = cfg.data.hierarchy_spec.build
    return spec


def prepare_data(cfg: PipelineConfig, base: Path, log=print, keyed: bool = False) -> Path:
    """The manifest folder: ``data.manifest`` as given, else built into ``base/data`` (``keyed``:
    ``base/data-<digest>``, so a study's variants on different data each keep theirs) unless one
    built from the same data settings is there."""
    from supersub.data import build_manifest

    if cfg.data.manifest:
        check_manifest(cfg.data.manifest)  # refuses a folder that is not a manifest, with one line
        return Path(cfg.data.manifest)
    spec = data_spec(cfg)
    data_dir = base / (f"data-{digest(spec)[:10]}" if keyed else "data")
    stamp = data_dir / "data_config.json"
    if (data_dir / "manifest.parquet").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        log(f"data: reusing {data_dir}")
        return data_dir
    build_manifest(
        cfg.data.source, spec["hierarchy"], data_dir, val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed, imagenet_meta=cfg.data.imagenet_meta,
        leftover=cfg.data.leftover, verify=cfg.data.verify, num_workers=max(1, cfg.data.num_workers),
    )
    if cfg.data.max_train_per_class is not None:
        _limit_train(data_dir, cfg.data.max_train_per_class)
    atomic.write_text(stamp, json.dumps(spec))  # the data are ready: the last rename
    return data_dir


def _limit_train(data_dir: Path, per_class: int) -> None:
    """Drops train rows beyond ``per_class`` per class (the build's seeded order decides which)."""
    from supersub.data.manifest import write_manifest

    m = load_manifest(data_dir)
    keep, seen = [], {}
    for i, (split, c) in enumerate(zip(m.split, m.subclass)):
        if split == "train":
            seen[c] = seen.get(c, 0) + 1
            if seen[c] > per_class:
                continue
        keep.append(i)
    table = m.table.take(keep)
    write_manifest(data_dir, {n: table.column(n) for n in table.column_names}, m.hierarchy, m.meta)


def data_options(cfg: PipelineConfig, manifest_dir: str | Path, manifest: Manifest | None = None) -> DataOptions:
    """How tasks read the manifest in ``manifest_dir`` (``manifest``: that manifest, already open)."""
    loader = "auto" if cfg.data.loader == "ray_data" else cfg.data.loader
    fingerprint = (manifest or load_manifest(manifest_dir)).fingerprint
    return DataOptions(str(manifest_dir), fingerprint, cfg.data.image_size, loader, cfg.data.num_workers, cfg.data.cache_dir,
                       cfg.data.decode)


def open_data(cfg: PipelineConfig, manifest_dir: str | Path) -> tuple[DataOptions, Manifest]:
    """The manifest in ``manifest_dir``, opened once for the whole run, and how tasks read it."""
    manifest = load_manifest(manifest_dir)
    return data_options(cfg, manifest_dir, manifest), manifest


# ----------------------------------------------------------------------------- the run
class TrainedTasks:
    """What the stages read of the tasks before them once those have run (a
    :class:`supersub.stages.Upstream`): the networks they stored, the images they saw, the
    manifest a learned hierarchy wrote."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg

    def network_hash(self, folder: str) -> str:
        return network_hash(folder)

    def train_images(self, task: Task) -> int:
        return task.result()["train_images"]

    def learned_data(self, task: LearnedHierarchyTask) -> tuple[DataOptions, Manifest]:
        return open_data(self.cfg, task.manifest_dir)


def run_stage(stage: Stage, runner: Runner, cfg: PipelineConfig, log=print,
              reuse_from: Sequence[str | Path] = ()) -> None:
    log(f"== {stage.name}")
    # A stage that trains nothing runs here, not on the runner's workers.
    run_tasks(LocalRunner(cfg.device, log=log) if stage.in_driver else runner, stage.tasks, cfg.resources, log,
              reuse_from)


def pipeline_tasks(cfg: PipelineConfig, base: Path, log=print, keyed_data: bool = False) -> PipelineTasks:
    """The data, prepared and opened, and the stages over it (none run yet) in ``base/tasks``."""
    log("== data")
    data, manifest = open_data(cfg, prepare_data(cfg, base, log, keyed=keyed_data))
    return PipelineTasks(cfg, base / "tasks", data, manifest, TrainedTasks(cfg), log)


def train_base_networks(cfg: PipelineConfig, base: Path, runner: Runner, log=print,
                        keyed_data: bool = False) -> PipelineTasks:
    """The stages before the specialists, run (``jobs.tune`` searches the specialists' settings on
    their networks)."""
    tasks = pipeline_tasks(cfg, base, log, keyed_data)
    for stage in tasks.base_stages():
        run_stage(stage, runner, cfg, log)
    return tasks


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    runner: Runner | None = None,
    tracker: Tracker | None = None,
    log=print,
    shared_dir: str | Path | None = None,
    reuse_from: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Runs (or resumes) the pipeline into ``out_dir``; returns the metrics written to metrics.json.

    ``shared_dir`` (a study of several variants and seeds) holds the data and every task, which
    the runs share wherever their inputs and settings agree. ``reuse_from``: other runs' folders,
    whose tasks finished with the same inputs and settings are linked in instead of trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(shared_dir) if shared_dir else out
    tracker = tracker or NullTracker()
    runner = runner or LocalRunner(cfg.device, log=log, tracker=tracker)
    kind = getattr(runner, "kind", cfg.resources.runner)
    if kind != cfg.resources.runner:  # the runner that trains is the one tasks name (runner_identity)
        cfg = dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, runner=kind))
    save_config(cfg, out / "config.yaml")
    remove_leftovers(base, log)  # of an earlier run killed on this folder
    t0 = time.perf_counter()

    tasks = pipeline_tasks(cfg, base, log, keyed_data=shared_dir is not None)
    reuse_tasks = [Path(r) / "tasks" for r in reuse_from]
    for stage in tasks.stages():
        run_stage(stage, runner, cfg, log, reuse_tasks)
    actual = sum(t.result()["train_images"] for t in (tasks.specialists or [tasks.router]))
    if actual != tasks.spec_images:
        log(f"warning: the specialists saw {actual:,} training images, {tasks.spec_images:,} were planned for the "
            "controls")

    log("== evaluation")
    evaluation = evaluate(cfg, tasks, log)
    late = tasks.flops_matched(evaluation.models[evaluation.serves["model"]]["flops_ratio"])
    if late is not None:
        run_stage(late, runner, cfg, log, reuse_tasks)
        evaluation.add_network_controls({name: [t.out_dir for t in ts] for name, ts in tasks.controls.items()})
    metrics = write_outputs(cfg, out, tasks, evaluation)
    metrics["wall_seconds"] = time.perf_counter() - t0
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(format_summary(metrics))
    artifacts = ["config.yaml", "metrics.json", "predictions.parquet", "bundle"]
    if cfg.report:
        from supersub.report import write_report

        write_report(str(out), out / "report")
        artifacts.append("report")
        log(f"report: {out / 'report' / 'index.html'}")
    tracker.summary(metrics, [out / a for a in artifacts] + [Path(tasks.data.manifest_dir) / "hierarchy.json"])
    return metrics


def specialist_outputs(tasks: PipelineTasks) -> tuple[list[str], list[dict[str, Any]]]:
    """The specialists' folders (index = superclass) and results: the joint task's experts, or
    the specialist tasks'."""
    router, h = tasks.router, tasks.hierarchy
    if isinstance(router, JointTask):
        return [expert_dir(router.out_dir, s) for s in range(h.num_superclasses)], router.result()["specialists"]
    return [t.out_dir for t in tasks.specialists], [t.result() for t in tasks.specialists]


def evaluate(cfg: PipelineConfig, tasks: PipelineTasks, log=print) -> Evaluation:
    """Every model of the run's stages so far on test, with its cost (nothing written)."""
    device = pick_device(cfg.device)
    router = tasks.router
    joint = isinstance(router, JointTask)  # the experts, and the resident they share, are its outputs
    inputs = EvaluationInputs(
        manifest_dir=tasks.data.manifest_dir, image_size=cfg.data.image_size, resident=cfg.generalist.resident,
        specialists_use_vanilla=any(t.inputs.get("vanilla") or t.init_dir for t in tasks.specialists),
        resident_dir=router.out_dir if joint else tasks.resident_dir, vanilla_dir=tasks.vanilla.out_dir,
        specialist_dirs=specialist_outputs(tasks)[0],
        baseline_dirs={k: [t.out_dir for t in ts] for k, ts in tasks.controls.items()},
        delta_all_dir=tasks.delta_all.out_dir if tasks.delta_all else None, loader=tasks.data.loader,
        num_workers=cfg.data.num_workers, cache_dir=cfg.data.cache_dir, router_dir=router.out_dir if router else None,
    )
    return evaluate_run(inputs, tasks.hierarchy, tasks.manifest, device, amp_dtype(cfg.train, device), cfg.evaluation,
                        log)


def write_outputs(cfg: PipelineConfig, out: Path, tasks: PipelineTasks, evaluation: Evaluation) -> dict[str, Any]:
    """predictions.parquet and bundle/, from the evaluation and the models it loaded; returns
    the metrics (metrics.json but for the run's wall time)."""
    manifest, h, loaded = tasks.manifest, tasks.hierarchy, evaluation.loaded
    uris = [manifest.uris[i] for i in manifest.indices(evaluation.test_split)]
    save_predictions(out / "predictions.parquet", uris, evaluation.labels, evaluation.probs, h)
    # The vanilla app serves the vanilla network: a vanilla resident is the bundle's base, a
    # generalist's bundle carries it beside.
    baselines = {"vanilla": loaded.vanilla} if cfg.generalist.has_own_network else {}
    result = evaluation.metrics()
    manifest_json = write_bundle(
        out / "bundle", base=loaded.resident[0], base_spec=loaded.resident[1], resident=cfg.generalist.resident,
        hierarchy=h, deltas=loaded.deltas, delta_cfg=cfg.delta, routings=result["routing"], serves=result["serves"],
        evaluation=result["evaluation"], baselines=baselines, router=loaded.router,
        extra={"pipeline": {"name": cfg.name, "seed": cfg.seed, "test_split": result["test_split"]}},
    )
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "test_split": result["test_split"],
        "manifest_dir": str(Path(tasks.data.manifest_dir).resolve()),
        "manifest_fingerprint": tasks.data.fingerprint,
        "hierarchy": {"name": h.name, "superclasses": [s.name for s in h.superclasses],
                      "sizes": [len(s.subclasses) for s in h.superclasses]},
        "models": result["models"],
        "routing": result["routing"],
        "serves": result["serves"],
        "per_superclass": result["per_superclass"],
        "flops": result["flops"],
        "latency": result["evaluation"].get("latency"),  # rounds, load average, unreliable ratios
        "bytes": manifest_json["bytes"],
        "specialists": [{k: r.get(k) for k in ("superclass", "val_acc", "delta_bytes", "delta_ratio", "delta_density",
                                               "wall_seconds", "train_images")} for r in specialist_outputs(tasks)[1]],
        "tasks": tasks.folders(),
        "device": str(evaluation.probe.device),
        "timings": result["timings"],
    }


def format_summary(metrics: dict[str, Any]) -> str:
    """The table printed at the end of a run: accuracy beside cost."""
    rows = [f"{'model':<24}{'top-1':>7}{'Δ vs vanilla [95% CI]':>24}{'super':>7}{'cross%':>8}"
            f"{'bytes':>7}{'train img':>11}{'FLOPs':>7}{'latency':>8}"]
    for name, m in metrics["models"].items():
        if "top1" not in m:
            rows.append(f"{name:<24}{'':>7}{'':>24}{m['superclass_acc']:>7.2f}")
            continue
        d = m.get("delta_vs_vanilla")
        delta = f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else ""
        lat = m.get("latency_ratio")
        lat_text = "unrel." if m.get("latency", {}).get("reliable") is False else \
            f"{lat if lat is not None else float('nan'):.2f}"
        rows.append(
            f"{name:<24}{m['top1']:>7.2f}{delta:>24}{m['superclass_acc']:>7.2f}{m['crossing_error_share']:>8.1f}"
            f"{m.get('bytes_in_networks', float('nan')):>7.3f}{m.get('train_images', 0):>11,}"
            f"{m.get('flops_ratio') or float('nan'):>7.2f}{lat_text:>8}"
        )
    b = metrics["bytes"]
    rows.append(
        f"serves {metrics['serves']['model']} ({metrics['serves']['routing']}); bytes and FLOPs in vanilla networks; "
        f"specialist mean {b['mean_specialist_ratio']:.4f} of a network, total {b['total_in_networks']:.3f} networks"
    )
    timing = metrics.get("latency")
    if timing:
        load = " -> ".join(f"{x:.1f}" for x in timing["load_average"])
        own = [m for r in timing.get("own_rounds", []) for m in r["models"]]
        rows.append(f"latency: median of {timing['rounds']} interleaved rounds, load average {load}"
                    + (f"; {', '.join(own)} in rounds of their own beside the vanilla forward" if own else "")
                    + ("; unreliable (not a result): " + "; ".join(f"{k} {v}" for k, v in timing["unreliable"].items())
                       if timing["unreliable"] else ""))
    return "\n".join(rows)


def check_inputs(cfg: PipelineConfig, out: Path) -> None:
    """What can be checked before anything starts (Ray, MLflow, a build): raises a one-line error."""
    from supersub.data.sources import check_source
    from supersub.hierarchy import check_spec

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if cfg.data.manifest:
        check_manifest(cfg.data.manifest)  # its files and schema, not its rows: the run reads those once
        return
    check_source(cfg.data.source)
    # The spec the manifest is built with; learned:K's K was checked when the config was built.
    check_spec(cfg.data.hierarchy_spec.build, imagenet_meta=cfg.data.imagenet_meta)
