"""The whole Super-Sub pipeline, independent of where its stages run.

    data → vanilla [+ scaled-up vanilla] [+ own generalist]   (concurrently, by the runner)
         → [learned hierarchy from the vanilla network]
         → N specialists                                     (concurrently, by the runner)
         → calibrate routing on val, evaluate on test → bundle/, metrics.json

A *runner* executes lists of stage tasks: :class:`LocalRunner` here runs them one after another
in this process (a GPU machine without Ray); ``jobs.runner.RayRunner`` runs them as concurrent
Ray Train runs. A *tracker* records runs (``jobs.tracking.MlflowTracker``; a no-op here).
Finished stages are skipped on a rerun with the same output folder, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from supersub.bundle import write_bundle
from supersub.config import ConfigError, field, save_config, to_dict
from supersub.data import load_manifest
from supersub.delta import DeltaConfig
from supersub.evaluation import evaluate_two_stage, network_probs, save_predictions
from supersub.hierarchy import Hierarchy
from supersub.loaders import LoaderSpec, make_loader
from supersub.models import ModelConfig, state_bytes
from supersub.predictor import RoutingConfig, TwoStagePredictor
from supersub.stages import (
    DataOptions,
    NetworkTask,
    SpecialistTask,
    finetune_specialist,
    is_done,
    load_network,
    load_packed,
    train_network,
)
from supersub.train import OptimConfig, amp_dtype, pick_device


# ----------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    source: str = field(
        "synthetic:superclasses=4,subclasses=5,per_class=120,size=32",
        help="image source: synthetic[:k=v,...], a Parquet folder or glob, an ImageNet-style folder, cifar100:ROOT",
    )
    hierarchy: str = field(
        "synthetic",
        help="paper10, cifar100, auto:K, learned:K (from the vanilla network), synthetic (the source's own), or a file",
    )
    learned_from: str = field("auto:10", help="learned:K only: the hierarchy the manifest is first built with")
    imagenet_meta: str | None = field(None, help="folder with wordnet.is_a.txt and words.txt (auto:K, paper10 checks)")
    leftover: Literal["drop", "other"] = field("drop", help="auto:K: drop classes outside the K nodes or gather them as 'other'")
    image_size: int = field(32, help="input size in pixels (square)")
    val_fraction: float = field(0.1, help="share of each class's training images held out as val")
    test_fraction: float | None = field(None, help="share held out as test when the source has no eval split (default: val_fraction)")
    verify: bool = field(True, help="decode every image once at build time (bad data counted, converted or skipped)")
    max_train_per_class: int | None = field(
        None, help="keep at most this many train images per class (a smaller study; val and test untouched)"
    )
    loader: Literal["auto", "tensors", "dataset", "ray_data"] = field(
        "auto", help="tensors: decoded split in memory (<= 64 px); dataset: torch DataLoader; ray_data: Ray Data (Ray runner)"
    )
    num_workers: int = field(2, help="DataLoader / decoding worker processes")
    cache_dir: str | None = field(None, help="folder for decoded-split caches (tensors loader)")


@dataclass
class GeneralistConfig:
    kind: Literal["own", "vanilla"] = field(
        "vanilla",
        help="own: a superclass network (the paper); vanilla: the vanilla network, superclass = sum of its subclass probabilities",
    )


@dataclass
class SpecialistConfig:
    init: Literal["resident", "vanilla"] = field(
        "resident", help="start from the resident network (generalist or vanilla) or from the vanilla network"
    )
    head_init: Literal["auto", "random", "vanilla_rows"] = field(
        "auto", help="auto: the vanilla head's rows when specialists start from the vanilla network, else random"
    )
    negatives: float = field(
        0.5, help="images of other superclasses per own image, labelled 'other' (0: none, no 'other' output)"
    )
    optim: OptimConfig = field(
        OptimConfig(epochs=10, lr=0.02, warmup_epochs=0.0, weight_decay=0.0), help="finetuning optimiser"
    )


@dataclass
class BaselinesConfig:
    scaled: bool = field(False, help="also train a scaled-up vanilla network (the 'just make it bigger' baseline)")
    scaled_width: float = field(1.25, help="width multiplier of the scaled-up vanilla network")
    scaled_depths: list[int] | None = field(None, help="blocks per stage of the scaled-up vanilla network (null: same)")


@dataclass
class ResourcesConfig:
    runner: Literal["ray", "local"] = field("ray", help="ray: Ray Train runs (concurrent); local: this process, in turn")
    num_workers: int = field(1, help="Ray Train workers (DDP) for vanilla / generalist")
    cpus_per_worker: float = field(1.0, help="CPUs per Ray Train worker (fractions allowed)")
    gpus_per_worker: float = field(0.0, help="GPUs per Ray Train worker (fractions allowed)")
    specialist_workers: int = field(1, help="Ray Train workers per specialist")
    specialist_cpus: float = field(0.5, help="CPUs per specialist worker")
    specialist_gpus: float = field(0.0, help="GPUs per specialist worker (fractions allowed: several share a GPU)")
    max_failures: int = field(2, help="restarts of a failed training run (from its last checkpoint)")
    storage_path: str | None = field(None, help="Ray Train storage (local path or s3://, gs://); default: OUT/ray")


@dataclass
class TrackingConfig:
    enabled: bool = field(True, help="log to MLflow (jobs layer only)")
    tracking_uri: str | None = field(
        None, help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///~/.supersub/mlflow.db"
    )
    experiment: str = field("supersub", help="MLflow experiment name")
    log_bundle: bool = field(True, help="log the bundle as an artifact of the parent run")


@dataclass
class PipelineConfig:
    name: str = field("default", help="run name")
    seed: int = field(0, help="seed of data splits, initialisation and data order")
    device: str = field("auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    report: bool = field(True, help="write OUT/report/ (HTML, confusion plots, galleries) at the end")
    data: DataConfig = field(DataConfig(), help="data")
    model: ModelConfig = field(ModelConfig(backbone="resnet10", width=0.25), help="backbone of every network")
    train: OptimConfig = field(OptimConfig(epochs=8, batch_size=64), help="vanilla / generalist training")
    generalist: GeneralistConfig = field(GeneralistConfig(), help="what answers stage one")
    specialist: SpecialistConfig = field(SpecialistConfig(), help="specialist finetuning")
    delta: DeltaConfig = field(DeltaConfig(), help="the specialists' deltas")
    routing: RoutingConfig = field(RoutingConfig(), help="two-stage routing")
    baselines: BaselinesConfig = field(BaselinesConfig(), help="baselines trained beside")
    resources: ResourcesConfig = field(ResourcesConfig(), help="Ray resources")
    tracking: TrackingConfig = field(TrackingConfig(), help="MLflow")

    def __post_init__(self) -> None:
        if self.data.hierarchy.startswith("learned:") and not self.data.hierarchy[8:].isdigit():
            raise ValueError(f"data.hierarchy {self.data.hierarchy!r}: learned:K needs an integer K")


# ----------------------------------------------------------------------------- runners
class Runner(Protocol):
    def run_networks(self, tasks: list[NetworkTask]) -> list[dict[str, Any]]: ...
    def run_specialists(self, tasks: list[SpecialistTask]) -> list[dict[str, Any]]: ...


class Tracker(Protocol):
    def stage(self, name: str, params: dict[str, Any], result: dict[str, Any]) -> None: ...
    def summary(self, metrics: dict[str, Any], artifacts: list[Path]) -> None: ...


class NullTracker:
    def stage(self, name: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        pass

    def summary(self, metrics: dict[str, Any], artifacts: list[Path]) -> None:
        pass


class LocalRunner:
    """Runs every task in this process, one after another (no Ray)."""

    def __init__(self, device: str = "auto", retries: int = 1, log=print) -> None:
        from supersub.stages import StageContext

        self.ctx = StageContext(device=pick_device(device), log=log)
        self.retries, self.log = retries, log

    def _run(self, fn, task) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                return fn(task, self.ctx)
            except Exception as e:  # a failed stage is retried from its checkpoint, then reported
                if attempt == self.retries:
                    raise
                self.log(f"{task.name} failed ({e!r}); retrying from its last checkpoint")
        raise AssertionError

    def run_networks(self, tasks: list[NetworkTask]) -> list[dict[str, Any]]:
        return [self._run(train_network, t) for t in tasks]

    def run_specialists(self, tasks: list[SpecialistTask]) -> list[dict[str, Any]]:
        return [self._run(finetune_specialist, t) for t in tasks]


# ----------------------------------------------------------------------------- stages
def prepare_data(cfg: PipelineConfig, out: Path, log=print) -> Path:
    """Builds the manifest in ``out/data`` unless one built from the same data settings exists."""
    from supersub.data import build_manifest

    data_dir = out / "data"
    hierarchy = cfg.data.learned_from if cfg.data.hierarchy.startswith("learned:") else cfg.data.hierarchy
    # What the manifest depends on (not how it is read): a change here rebuilds it.
    spec = {k: v for k, v in to_dict(cfg.data).items() if k not in ("loader", "num_workers", "cache_dir", "learned_from")}
    spec.update(hierarchy=hierarchy, seed=cfg.seed)
    stamp = data_dir / "data_config.json"
    if (data_dir / "manifest.parquet").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        log(f"data: reusing {data_dir}")
        return data_dir
    build_manifest(
        cfg.data.source,
        hierarchy,
        data_dir,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        imagenet_meta=cfg.data.imagenet_meta,
        leftover=cfg.data.leftover,
        verify=cfg.data.verify,
        num_workers=max(1, cfg.data.num_workers),
    )
    if cfg.data.max_train_per_class is not None:
        _limit_train(data_dir, cfg.data.max_train_per_class)
    stamp.write_text(json.dumps(spec))
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


def _data_options(cfg: PipelineConfig, manifest_dir: Path) -> DataOptions:
    loader = "auto" if cfg.data.loader == "ray_data" else cfg.data.loader
    return DataOptions(str(manifest_dir), cfg.data.image_size, loader, cfg.data.num_workers, cfg.data.cache_dir)


def network_tasks(cfg: PipelineConfig, data: DataOptions, stages: Path, include_generalist: bool) -> list[NetworkTask]:
    tasks = [NetworkTask("vanilla", "fine", cfg.model, cfg.train, data, str(stages / "vanilla"), cfg.seed)]
    if cfg.baselines.scaled:
        scaled = dataclasses.replace(cfg.model, width=cfg.baselines.scaled_width, depths=cfg.baselines.scaled_depths)
        tasks.append(NetworkTask("vanilla_scaled", "fine", scaled, cfg.train, data, str(stages / "vanilla_scaled"), cfg.seed))
    if include_generalist:
        tasks.append(NetworkTask("generalist", "coarse", cfg.model, cfg.train, data, str(stages / "generalist"), cfg.seed))
    return tasks


def specialist_tasks(
    cfg: PipelineConfig, data: DataOptions, stages: Path, hierarchy: Hierarchy, specialists_dir: Path | None = None
) -> list[SpecialistTask]:
    specialists_dir = specialists_dir or stages / "specialists"
    own = cfg.generalist.kind == "own"
    resident_dir = stages / ("generalist" if own else "vanilla")
    init_dir = str(stages / "vanilla") if (own and cfg.specialist.init == "vanilla") else None
    head_init = cfg.specialist.head_init
    if head_init == "auto":
        head_init = "vanilla_rows" if (cfg.specialist.init == "vanilla" or not own) else "random"
    return [
        SpecialistTask(
            superclass=s,
            resident_dir=str(resident_dir),
            init_dir=init_dir,
            head_init=head_init,
            vanilla_dir=str(stages / "vanilla"),
            delta=cfg.delta,
            optim=cfg.specialist.optim,
            negatives=cfg.specialist.negatives,
            data=data,
            out_dir=str(specialists_dir / f"{s:03d}"),
            seed=cfg.seed,
        )
        for s in range(hierarchy.num_superclasses)
    ]


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    runner: Runner | None = None,
    tracker: Tracker | None = None,
    log=print,
    shared_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the pipeline into ``out_dir``; returns the metrics written to metrics.json.

    ``shared_dir`` (a study of several variants) holds the data and the base networks, which
    variants that differ only in generalist, specialist, delta or routing settings share."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(shared_dir) if shared_dir else out
    save_config(cfg, out / "config.yaml")
    runner = runner or LocalRunner(cfg.device, log=log)
    tracker = tracker or NullTracker()
    t0 = time.perf_counter()
    specialists = out / "specialists"

    manifest_dir, stages, data = train_base_networks(cfg, base, runner, tracker, log)
    hierarchy = load_manifest(manifest_dir).hierarchy
    log(f"== specialists ({hierarchy.num_superclasses})")
    _run_pending(runner.run_specialists, specialist_tasks(cfg, data, stages, hierarchy, specialists), tracker, log)

    log("== evaluation")
    metrics = evaluate_run(cfg, out, manifest_dir, stages, log, specialists)
    metrics["wall_seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(format_summary(metrics))
    artifacts = ["config.yaml", "metrics.json", "predictions.parquet", "bundle"]
    if cfg.report:
        from supersub.report import write_report

        write_report(str(out), out / "report")  # confusion plots, galleries: readable without MLflow
        artifacts.append("report")
        log(f"report: {out / 'report' / 'index.html'}")
    tracker.summary(metrics, [out / a for a in artifacts] + [manifest_dir / "hierarchy.json"])
    return metrics


def train_base_networks(
    cfg: PipelineConfig, base: Path, runner: Runner, tracker: Tracker, log=print
) -> tuple[Path, Path, DataOptions]:
    """The first half of the pipeline, shared with ``jobs.tune``: the data, the vanilla network
    (+ scaled-up vanilla, + own generalist) and, for ``learned:K``, the learned hierarchy.
    Returns the manifest folder, the folder of the network stages and the data options."""
    learned = cfg.data.hierarchy.startswith("learned:")
    own = cfg.generalist.kind == "own"
    stages = base / "stages"
    log("== data")
    manifest_dir = prepare_data(cfg, base, log)
    data = _data_options(cfg, manifest_dir)
    log("== base networks")
    _run_pending(runner.run_networks, network_tasks(cfg, data, stages, include_generalist=own and not learned), tracker, log)
    if learned:
        from supersub.relabel import learn_and_relabel

        manifest_dir, stages = learn_and_relabel(cfg, base, stages, data, log)
        data = _data_options(cfg, manifest_dir)
        if own:
            _run_pending(runner.run_networks, network_tasks(cfg, data, stages, True)[-1:], tracker, log)
    return manifest_dir, stages, data


def _run_pending(run, tasks, tracker: Tracker, log) -> None:
    for t in tasks:  # a finished stage is reused only if it was made with the same settings
        stamp = Path(t.out_dir) / "task.json"
        # What a stage computes, not where its files live (a moved output folder still resumes)
        # nor how its data is read.
        d = {k: v for k, v in to_dict(t).items() if not k.endswith("_dir")}
        d["data"] = {"image_size": d["data"]["image_size"]}
        settings = json.dumps(d, sort_keys=True)
        if stamp.is_file() and stamp.read_text() != settings:
            raise ConfigError(
                f"{t.out_dir} holds a {t.name} stage made with other settings; use another output folder or delete it"
            )
        Path(t.out_dir).mkdir(parents=True, exist_ok=True)
        stamp.write_text(settings)
    pending = [t for t in tasks if not is_done(t.out_dir)]
    for t in tasks:
        if t not in pending:
            log(f"{t.name}: done earlier, skipped")
    if pending:
        results = run(pending)
        for t, r in zip(pending, results):
            tracker.stage(t.name, to_dict(t), r)


# ----------------------------------------------------------------------------- evaluation
def evaluate_run(
    cfg: PipelineConfig, out: Path, manifest_dir: Path, stages: Path, log=print, specialists: Path | None = None
) -> dict[str, Any]:
    """Calibrates routing on val, evaluates everything on test, writes the bundle."""
    specialists = specialists or stages / "specialists"
    device = pick_device(cfg.device)
    manifest = load_manifest(manifest_dir)
    h = manifest.hierarchy
    own = cfg.generalist.kind == "own"
    resident, resident_spec, _ = load_network(stages / ("generalist" if own else "vanilla"))
    deltas = {s: load_packed(specialists / f"{s:03d}") for s in range(h.num_superclasses)}

    def loader(split: str):
        spec = LoaderSpec(split, "fine", False, 512)
        return make_loader(manifest, spec, image_size=cfg.data.image_size, mode=_data_options(cfg, manifest_dir).loader,
                           device=device, num_workers=cfg.data.num_workers, cache_dir=cfg.data.cache_dir)

    test_split = "test" if manifest.counts().get("test", 0) else "val"
    baselines, networks = {}, {}
    for name in ("vanilla", "vanilla_scaled"):
        if (stages / name / "model.safetensors").is_file():
            model, spec, _ = load_network(stages / name)
            networks[name] = (model, spec)
            baselines[name] = network_probs(model.to(device), loader(test_split), device)
    if own:
        gen_probs = network_probs(resident.to(device), loader(test_split), device)

    # Evaluation keeps every materialised delta on the device (tens of MB): each batch needs many
    # specialists, and decoding them again per batch would dominate. Serving keeps one at a time.
    predictor = TwoStagePredictor(
        resident, h, deltas, "generalist" if own else "vanilla", device, amp=amp_dtype(cfg.train, device),
        cache_bytes=1 << 30,
    )
    result = evaluate_two_stage(
        predictor, h, loader(test_split), loader("val") if test_split == "test" else None, cfg.routing, baselines
    )
    uris = [manifest.uris[i] for i in manifest.indices(test_split)]
    save_predictions(out / "predictions.parquet", uris, result["labels"], result["probs"], h)
    if own:
        labels = result["labels"]
        coarse = torch.tensor(h.fine_to_coarse)[labels]
        result["models"]["generalist"] = {"superclass_acc": 100.0 * gen_probs.argmax(1).eq(coarse).float().mean().item()}

    bundle_dir = out / "bundle"
    routing = result["routing"]["hard" if cfg.routing.mode == "hard" else "soft"]  # what the bundle serves
    manifest_json = write_bundle(
        bundle_dir,
        base=resident,
        base_spec=resident_spec,
        resident="generalist" if own else "vanilla",
        hierarchy=h,
        deltas=deltas,
        delta_cfg=cfg.delta,
        routing=routing,
        baselines={k: v for k, v in networks.items() if not (k == "vanilla" and not own)},
        extra={"pipeline": {"name": cfg.name, "test_split": test_split}},
    )
    specialist_results = [
        json.loads((specialists / f"{s:03d}" / "metrics.json").read_text()) for s in range(h.num_superclasses)
    ]
    def train_images(stage_dir: Path) -> int:
        path = stage_dir / "metrics.json"
        return json.loads(path.read_text()).get("train_images", 0) if path.is_file() else 0

    bytes_ = dict(manifest_json["bytes"])
    bytes_["baselines"] = {name: state_bytes(model) for name, (model, _) in networks.items()}
    return {
        "name": cfg.name,
        "test_split": test_split,
        "manifest_dir": str(manifest_dir.resolve()),
        "stages_dir": str(stages.resolve()),
        "hierarchy": {"name": h.name, "superclasses": [s.name for s in h.superclasses], "sizes": [len(s.subclasses) for s in h.superclasses]},
        "models": result["models"],
        "routing": result["routing"],
        "per_superclass": result["per_superclass"],
        "bytes": bytes_,
        "specialists": [
            {k: r[k] for k in ("superclass", "val_acc", "delta_bytes", "delta_ratio", "delta_density", "wall_seconds")}
            for r in specialist_results
        ],
        # Training compute (images through a network): the two-stage model pays for its resident
        # network and every specialist; a fair reading of its gain keeps this in view.
        "train_images": {
            **{name: train_images(stages / name) for name in ("vanilla", "vanilla_scaled", "generalist")},
            "specialists": sum(train_images(specialists / f"{s:03d}") for s in range(h.num_superclasses)),
        },
        "device": str(device),
        "timings": dict(predictor.timings),
    }


def format_summary(metrics: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    rows = [f"{'model':<22}{'top-1':>8}{'top-5':>8}{'super':>8}{'cross%':>8}"]
    for name, m in metrics["models"].items():
        if "top1" not in m:
            rows.append(f"{name:<22}{'':>8}{'':>8}{m['superclass_acc']:>8.2f}")
            continue
        rows.append(f"{name:<22}{m['top1']:>8.2f}{m['top5']:>8.2f}{m['superclass_acc']:>8.2f}{m['crossing_error_share']:>8.1f}")
    b = metrics["bytes"]
    rows.append(
        f"bytes: network {b['network']:,}, specialist mean {b['mean_specialist_ratio']:.4f} of a network, "
        f"total {b['total_in_networks']:.3f} networks for {len(b['per_specialist'])} specialists"
    )
    return "\n".join(rows)
