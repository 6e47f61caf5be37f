"""The whole Super-Sub pipeline as tasks, independent of where they run.

    data (manifest)
      → vanilla [+ own generalist] [+ scaled-up vanilla] [+ ensemble members]      (concurrently)
      → [learned hierarchy from the vanilla network] [→ own generalist on it]
      → N specialists [+ delta_all] [+ vanilla_long]                              (concurrently)
      → evaluation: calibrate routing on val, every model on test with its cost
        [→ ensemble members as the FLOPs allow → evaluation again]
      → bundle/, metrics.json, predictions.parquet, report/

Each step is a list of tasks (:mod:`supersub.tasks`) handed to a runner (:mod:`supersub.runner`);
a task's folder is named by its fingerprint, so a rerun with the same ``--out`` reuses exactly
the tasks whose inputs and settings are unchanged, and trains the others anew beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supersub import atomic
from supersub.bundle import write_bundle
from supersub.config import ConfigError, save_config, to_dict
from supersub.cost import flops_matched_model
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec, epoch_images
from supersub.evaluation import EvaluationInputs, evaluate_run, save_predictions
from supersub.hierarchy import Hierarchy
from supersub.networks import network_hash
from supersub.pipeline_config import PipelineConfig
from supersub.runner import LocalRunner, NullTracker, Runner, Tracker, remove_leftovers, run_tasks
from supersub.tasks import (
    DataOptions,
    JointTask,
    LearnedHierarchyTask,
    NetworkTask,
    RouterTask,
    SpecialistTask,
    digest,
    expert_dir,
    folder_for,
)
from supersub.train import amp_dtype, pick_device


# ----------------------------------------------------------------------------- data
def data_spec(cfg: PipelineConfig) -> dict[str, Any]:
    """What the manifest depends on (not how it is read): a change rebuilds it."""
    spec = {k: v for k, v in to_dict(cfg.data).items()
            if k not in ("loader", "num_workers", "cache_dir", "decode", "learned_from", "learned_min_size",
                         "manifest")}
    spec["hierarchy"] = cfg.data.learned_from if cfg.data.hierarchy.startswith("learned:") else cfg.data.hierarchy
    return spec


def prepare_data(cfg: PipelineConfig, base: Path, log=print, keyed: bool = False) -> Path:
    """The manifest folder: ``data.manifest`` as given, else built into ``base/data`` (``keyed``:
    ``base/data-<digest>``, so a study's variants on different data each keep theirs) unless one
    built from the same data settings is there."""
    from supersub.data import build_manifest

    if cfg.data.manifest:
        load_manifest(cfg.data.manifest)  # refuses a folder that is not a manifest, with one line
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


def data_options(cfg: PipelineConfig, manifest_dir: Path) -> DataOptions:
    loader = "auto" if cfg.data.loader == "ray_data" else cfg.data.loader
    fingerprint = load_manifest(manifest_dir).fingerprint
    return DataOptions(str(manifest_dir), fingerprint, cfg.data.image_size, loader, cfg.data.num_workers, cfg.data.cache_dir,
                       cfg.data.decode)


# ----------------------------------------------------------------------------- tasks
def network_task(role: str, target: str, cfg: PipelineConfig, data: DataOptions, root: Path, *,
                 model=None, seed: int | None = None, train_images: int | None = None) -> NetworkTask:
    t = NetworkTask(role, target, model or cfg.model, cfg.train, data, "", cfg.seed if seed is None else seed, train_images,
                    cfg.resources.runner)
    t.out_dir = folder_for(root, t.name, t.fingerprint())
    return t


def specialist_task(cfg: PipelineConfig, superclass: int | None, data: DataOptions, root: Path, resident_dir: str,
                    vanilla_dir: str, *, train_images: int | None = None) -> SpecialistTask:
    own = cfg.generalist.kind == "own"
    everything = superclass is None  # delta_all: on the vanilla network, no "other", no other init
    init_dir = vanilla_dir if (own and cfg.specialist.init == "vanilla" and not everything) else None
    head_init = cfg.specialist.head_init
    if head_init == "auto" or everything:
        head_init = "vanilla_rows" if (everything or cfg.specialist.init == "vanilla" or not own) else "random"
    inputs = {"resident": network_hash(resident_dir), "init": network_hash(init_dir) if init_dir else None,
              "vanilla": network_hash(vanilla_dir) if (head_init == "vanilla_rows" or cfg.specialist.distill) else None}
    t = SpecialistTask(
        superclass, resident_dir, init_dir, head_init, vanilla_dir, cfg.delta, cfg.specialist.optim,
        0.0 if everything else cfg.specialist.negatives, data, "", cfg.seed, train_images,
        cfg.specialist.distill, cfg.specialist.distill_temperature, inputs, cfg.resources.runner,
    )
    t.out_dir = folder_for(root, t.name, t.fingerprint())
    return t


def planned_images(task: SpecialistTask | NetworkTask | RouterTask | JointTask, hierarchy: Hierarchy, manifest) -> int:
    """Training images a task will see, from the manifest alone (before it runs)."""
    if isinstance(task, JointTask):
        return task.expert_passes
    if getattr(task, "train_images", None) is not None:
        return task.train_images // task.optim.batch_size * task.optim.batch_size
    spec: LoaderSpec = task.loader_specs()["train"]
    rows = manifest.indices("train")
    fine, coarse = manifest.subclass[rows], manifest.superclass[rows]
    n_sub = len(hierarchy.superclasses[spec.superclass].subclasses) if spec.superclass is not None else 0
    return epoch_images(spec, fine, coarse, n_sub) * task.optim.epochs


@dataclass
class BaseNetworks:
    """The first half of the pipeline, shared with ``jobs.tune``: the manifests and the networks
    the specialists start from."""

    first_data: DataOptions  # what the vanilla network was trained on
    data: DataOptions  # what the specialists use (a learned hierarchy's manifest, or the same)
    hierarchy: Hierarchy
    vanilla: NetworkTask
    generalist: NetworkTask | None
    extra: dict[str, list[NetworkTask]]  # vanilla_scaled, ensemble members (trained beside the vanilla network)
    finetuned: RouterTask | None = None  # router_trunk=finetune: the vanilla network finetuned with the router

    @property
    def resident_dir(self) -> str:
        """The network every specialist's delta is taken against (and the bundle's base)."""
        return (self.finetuned or self.generalist or self.vanilla).out_dir

    @property
    def teacher_dir(self) -> str:
        """Where specialists take head rows and distillation from: the vanilla network, or the
        finetuned one whose head was trained with the trunk the specialists run on."""
        return (self.finetuned or self.vanilla).out_dir


def train_base_networks(cfg: PipelineConfig, base: Path, runner: Runner, log=print, keyed_data: bool = False) -> BaseNetworks:
    """Data, the vanilla network (+ own generalist, scaled-up vanilla, fixed ensemble members),
    and for ``learned:K`` the learned hierarchy (+ the own generalist trained on it)."""
    root = base / "tasks"
    learned = cfg.data.hierarchy.startswith("learned:")
    own = cfg.generalist.kind == "own"
    log("== data")
    first = data_options(cfg, prepare_data(cfg, base, log, keyed=keyed_data))
    log("== base networks")
    vanilla = network_task("vanilla", "fine", cfg, first, root)
    tasks = [vanilla]
    extra: dict[str, list[NetworkTask]] = {}
    if cfg.baselines.scaled:
        scaled = dataclasses.replace(cfg.model, width=cfg.baselines.scaled_width, depths=cfg.baselines.scaled_depths)
        extra["vanilla_scaled"] = [network_task("vanilla_scaled", "fine", cfg, first, root, model=scaled)]
    if cfg.baselines.ensemble not in ("off", "auto"):
        extra["ensemble"] = ensemble_members(cfg, first, root, int(cfg.baselines.ensemble))
    generalist = network_task("generalist", "coarse", cfg, first, root) if own and not learned else None
    tasks += [t for ts in extra.values() for t in ts if t.out_dir != vanilla.out_dir] + ([generalist] if generalist else [])
    run_tasks(runner, tasks, cfg.resources, log)
    data = first
    if learned:
        k = cfg.data.hierarchy.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"data.hierarchy={cfg.data.hierarchy}: K must be a positive integer")
        task = LearnedHierarchyTask(int(k), vanilla.out_dir, first, "", cfg.seed, cfg.data.learned_min_size,
                                    {"vanilla": network_hash(vanilla.out_dir)})
        task.out_dir = folder_for(root, task.name, task.fingerprint())
        run_tasks(LocalRunner(cfg.device, log=log), [task], cfg.resources, log)
        data = data_options(cfg, task.manifest_dir)
        if own:
            generalist = network_task("generalist", "coarse", cfg, data, root)
            run_tasks(runner, [generalist], cfg.resources, log)
    hierarchy = load_manifest(data.manifest_dir).hierarchy
    b = BaseNetworks(first, data, hierarchy, vanilla, generalist, extra)
    if cfg.generalist.kind == "trunk_router" and cfg.generalist.router_trunk == "finetune":
        log("== the vanilla network finetuned with the trunk router")
        b.finetuned = router_task(cfg, b, root)
        run_tasks(runner, [b.finetuned], cfg.resources, log)
    return b


def ensemble_size(flops_ratio: float, slack: float = 0.02) -> int:
    """How many vanilla networks a model costing ``flops_ratio`` networks of FLOPs an image pays
    for (at least one). The slack: a specialist pass costs a hair under a network (its head has
    fewer rows than the vanilla one's), so hard routing measures 1.9993 networks — two members."""
    return max(1, math.floor(flops_ratio + slack))


def ensemble_members(cfg: PipelineConfig, data: DataOptions, root: Path, members: int) -> list[NetworkTask]:
    """The vanilla networks of seeds seed, seed+1, ...: the first is the run's own vanilla network."""
    return [network_task("vanilla", "fine", cfg, data, root, seed=cfg.seed + i) for i in range(members)]


def specialist_tasks(cfg: PipelineConfig, b: BaseNetworks, root: Path) -> list[SpecialistTask]:
    return [specialist_task(cfg, s, b.data, root, b.resident_dir, b.teacher_dir)
            for s in range(b.hierarchy.num_superclasses)]


def router_task(cfg: PipelineConfig, b: BaseNetworks, root: Path, spec_images: int | None = None) -> RouterTask | JointTask | None:
    """``generalist.kind=trunk_router``: the superclass head on the vanilla network's trunk (with
    a frozen trunk it needs only the vanilla network, so it trains beside the specialists; one that
    finetunes the trunk trains before them, as their resident). ``router_trunk=joint``: the task
    that trains trunk, router and experts together on ``spec_images`` expert passes, the budget of
    the specialists it replaces."""
    if cfg.generalist.kind != "trunk_router":
        return None
    if b.finetuned is not None:
        return b.finetuned
    if cfg.generalist.router_trunk == "joint":
        if spec_images is None:
            raise ValueError("a joint router task needs the specialists' images (spec_images)")
        t = JointTask(b.vanilla.out_dir, cfg.delta.first_stage, cfg.generalist.router_width, cfg.generalist.router_optim.lr,
                      cfg.delta, cfg.specialist.optim, cfg.specialist.negatives, spec_images, b.data, "", cfg.seed,
                      {"resident": network_hash(b.vanilla.out_dir)}, cfg.resources.runner)
        t.out_dir = folder_for(root, t.name, t.fingerprint())
        return t
    t = RouterTask(b.vanilla.out_dir, cfg.delta.first_stage, cfg.generalist.router_width, cfg.generalist.router_optim,
                   b.data, "", cfg.seed, {"resident": network_hash(b.vanilla.out_dir)}, cfg.generalist.router_distill,
                   runner=cfg.resources.runner, trunk=cfg.generalist.router_trunk)
    t.out_dir = folder_for(root, t.name, t.fingerprint())
    return t


def vanilla_long_task(cfg: PipelineConfig, b: BaseNetworks, root: Path, spec_images: int,
                      images=lambda task: task.result()["train_images"]) -> NetworkTask:
    """The equal-training-images control: the vanilla network trained on as many images as
    trained the served networks' weights — the vanilla network's (``images``: what a task saw;
    :mod:`supersub.plan` passes its planned count), a finetuned trunk's, the specialists'. A
    frozen trunk's router head (1-2 % of a network's weights) is left out, which favours Super-Sub."""
    trained = images(b.vanilla) + (images(b.finetuned) if b.finetuned else 0)
    return network_task("vanilla_long", "fine", cfg, b.first_data, root, train_images=trained + spec_images)


# ----------------------------------------------------------------------------- the run
def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    runner: Runner | None = None,
    tracker: Tracker | None = None,
    log=print,
    shared_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the pipeline into ``out_dir``; returns the metrics written to metrics.json.

    ``shared_dir`` (a study of several variants and seeds) holds the data and every task, which
    the runs share wherever their inputs and settings agree."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(shared_dir) if shared_dir else out
    root = base / "tasks"
    tracker = tracker or NullTracker()
    runner = runner or LocalRunner(cfg.device, log=log, tracker=tracker)
    kind = getattr(runner, "kind", cfg.resources.runner)
    if kind != cfg.resources.runner:  # the runner that trains is the one tasks name (runner_identity)
        cfg = dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, runner=kind))
    save_config(cfg, out / "config.yaml")
    remove_leftovers(base, log)  # of an earlier run killed on this folder
    t0 = time.perf_counter()

    b = train_base_networks(cfg, base, runner, log, keyed_data=shared_dir is not None)
    manifest = load_manifest(b.data.manifest_dir)
    log(f"== specialists ({b.hierarchy.num_superclasses})")
    specialists = specialist_tasks(cfg, b, root)
    spec_images = sum(planned_images(t, b.hierarchy, manifest) for t in specialists)
    router = router_task(cfg, b, root, spec_images)
    if isinstance(router, JointTask):  # its experts replace the specialist tasks, on their budget
        specialists, spec_images = [], router.expert_passes
    tasks: list = list(specialists) + ([router] if router and router is not b.finetuned else [])
    if cfg.baselines.delta_all:
        tasks.append(specialist_task(cfg, None, b.data, root, b.vanilla.out_dir, b.vanilla.out_dir, train_images=spec_images))
    if cfg.baselines.vanilla_long:
        long = vanilla_long_task(cfg, b, root, spec_images)
        b.extra["vanilla_long"] = [long]
        tasks.append(long)
    run_tasks(runner, tasks, cfg.resources, log)
    actual = sum(t.result()["train_images"] for t in (specialists or [router]))
    if actual != spec_images:
        log(f"warning: the specialists saw {actual:,} training images, {spec_images:,} were planned for the controls")

    log("== evaluation")
    metrics = evaluate(cfg, out, b, specialists, tasks, log, router)
    # The controls sized by the served model's inference FLOPs, known only now.
    served = metrics["models"][metrics["serves"]["model"]]
    late: list[NetworkTask] = []
    if cfg.baselines.ensemble == "auto":
        members = ensemble_size(served["flops_ratio"])
        log(f"ensemble: the served two-stage model costs {served['flops_ratio']:.3f} networks of FLOPs an image: "
            f"{members} member(s)")
        b.extra["ensemble"] = ensemble_members(cfg, b.first_data, root, members)
        late += b.extra["ensemble"]
    if cfg.baselines.scaled_flops:
        bigger = flops_matched_model(cfg.model, b.hierarchy.num_subclasses, cfg.data.image_size, served["flops_ratio"])
        if bigger is None:
            log(f"vanilla_flops: no wider or deeper network fits in {served['flops_ratio']:.3f} networks of FLOPs: "
                "the vanilla network is the FLOPs-matched control")
        else:
            log(f"vanilla_flops: width {bigger.width}, depths {bigger.depths} fit in {served['flops_ratio']:.3f} networks "
                "of FLOPs")
            b.extra["vanilla_flops"] = [network_task("vanilla_flops", "fine", cfg, b.first_data, root, model=bigger)]
            late += b.extra["vanilla_flops"]
    if late:
        run_tasks(runner, late, cfg.resources, log)
        metrics = evaluate(cfg, out, b, specialists, tasks, log, router)
    metrics["wall_seconds"] = time.perf_counter() - t0
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(format_summary(metrics))
    artifacts = ["config.yaml", "metrics.json", "predictions.parquet", "bundle"]
    if cfg.report:
        from supersub.report import write_report

        write_report(str(out), out / "report")
        artifacts.append("report")
        log(f"report: {out / 'report' / 'index.html'}")
    tracker.summary(metrics, [out / a for a in artifacts] + [Path(b.data.manifest_dir) / "hierarchy.json"])
    return metrics


def evaluate(cfg: PipelineConfig, out: Path, b: BaseNetworks, specialists: list[SpecialistTask], tasks: list,
             log=print, router: RouterTask | JointTask | None = None) -> dict[str, Any]:
    """Evaluates the run's models, writes predictions.parquet and bundle/; returns the metrics."""
    device = pick_device(cfg.device)
    manifest = load_manifest(b.data.manifest_dir)
    h = manifest.hierarchy
    joint = isinstance(router, JointTask)  # the experts, and the resident they share, are its outputs
    if joint:
        specialist_dirs = [expert_dir(router.out_dir, s) for s in range(h.num_superclasses)]
        specialist_results = router.result()["specialists"]
    else:
        specialist_dirs, specialist_results = [t.out_dir for t in specialists], [t.result() for t in specialists]
    delta_all = next((t for t in tasks if isinstance(t, SpecialistTask) and t.superclass is None), None)
    inputs = EvaluationInputs(
        manifest_dir=b.data.manifest_dir, image_size=cfg.data.image_size,
        resident="generalist" if cfg.generalist.kind == "own" else "vanilla",
        specialists_use_vanilla=any(t.inputs.get("vanilla") or t.init_dir for t in specialists),
        resident_dir=router.out_dir if joint else b.resident_dir, vanilla_dir=b.vanilla.out_dir,
        specialist_dirs=specialist_dirs,
        baseline_dirs={k: [t.out_dir for t in ts] for k, ts in b.extra.items()},
        delta_all_dir=delta_all.out_dir if delta_all else None, loader=b.data.loader, num_workers=cfg.data.num_workers,
        cache_dir=cfg.data.cache_dir, router_dir=router.out_dir if router else None,
    )
    result = evaluate_run(inputs, h, manifest, device, amp_dtype(cfg.train, device), cfg.evaluation, log)
    uris = [manifest.uris[i] for i in manifest.indices(result["test_split"])]
    save_predictions(out / "predictions.parquet", uris, result["labels"], result["probs"], h)
    resident, resident_spec = result["_resident"]
    baselines = {}
    if cfg.generalist.kind == "own":  # the vanilla app serves it; a vanilla resident is the bundle's base
        from supersub.networks import load_network

        vanilla, vspec, _ = load_network(b.vanilla.out_dir, h.subclass_ids)
        baselines["vanilla"] = (vanilla, vspec)
    manifest_json = write_bundle(
        out / "bundle", base=resident, base_spec=resident_spec, resident=inputs.resident, hierarchy=h,
        deltas=result["_deltas"], delta_cfg=cfg.delta, routings=result["routing"], serves=result["serves"],
        evaluation=result["evaluation"], baselines=baselines, router=result["_router"],
        extra={"pipeline": {"name": cfg.name, "seed": cfg.seed, "test_split": result["test_split"]}},
    )
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "test_split": result["test_split"],
        "manifest_dir": str(Path(b.data.manifest_dir).resolve()),
        "manifest_fingerprint": b.data.fingerprint,
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
                                               "wall_seconds", "train_images")} for r in specialist_results],
        "tasks": {t.name: t.out_dir for t in [b.vanilla, *specialists, *tasks, *(b.extra.get("ensemble") or [])]
                  + ([b.generalist] if b.generalist else []) + ([b.finetuned] if b.finetuned else [])},
        "device": str(device),
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
        rows.append(f"latency: median of {timing['rounds']} interleaved rounds, load average {load}"
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
        load_manifest(cfg.data.manifest)
        return
    check_source(cfg.data.source)
    spec = cfg.data.learned_from if cfg.data.hierarchy.startswith("learned:") else cfg.data.hierarchy
    if cfg.data.hierarchy.startswith("learned:"):
        k = cfg.data.hierarchy.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"data.hierarchy={cfg.data.hierarchy}: K in learned:K must be a positive integer")
    check_spec(spec, imagenet_meta=cfg.data.imagenet_meta)
