"""The pipeline's config: one dataclass per section, every option with a default and help text.

``python -m jobs.pipeline --help-config`` lists them all; ``key=value`` overrides any of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal

from supersub.config import field
from supersub.delta import METHODS, DeltaConfig
from supersub.epoch import OptimConfig
from supersub.hierarchy.builders import spec_k
from supersub.resnet import ModelConfig
from supersub.routing import FAMILIES, Routing


@dataclass(frozen=True)
class HierarchySpec:
    """``data.hierarchy`` parsed: the spec the manifest is built with (``build``) and, for
    ``learned:K``, the K superclasses clustered from the vanilla network once it is trained
    (``learned_k``; the manifest is then first built with ``data.learned_from``)."""

    build: str
    learned_k: int | None = None

    @property
    def learned(self) -> bool:
        return self.learned_k is not None

    @classmethod
    def parse(cls, hierarchy: str, learned_from: str) -> HierarchySpec:
        k = spec_k(hierarchy, "learned")
        return cls(hierarchy) if k is None else cls(learned_from, k)


@dataclass
class DataConfig:
    source: str = field(
        "synthetic:superclasses=4,subclasses=5,per_class=150,size=32,confusion=0.1",
        help="image source: synthetic[:k=v,...], a Parquet folder or glob, an ImageNet-style folder, cifar100:ROOT",
    )
    manifest: str | None = field(
        None, help="a manifest folder made by `supersub data build` to use as is (source, hierarchy and splits "
        "then come from it; the options below that build a manifest are ignored)"
    )
    hierarchy: str = field(
        "synthetic",
        help="paper10, cifar100, auto:K, learned:K (from the vanilla network), synthetic (the source's own), or a file",
    )
    learned_from: str = field("auto:10", help="learned:K only: the hierarchy the manifest is first built with")
    learned_min_size: int = field(1, help="learned:K only: fewest classes in a learned superclass")
    imagenet_meta: str | None = field(None, help="folder with wordnet.is_a.txt and words.txt (auto:K, paper10 checks)")
    leftover: Literal["drop", "other"] = field("drop", help="auto:K: drop classes outside the K nodes or gather them as 'other'")
    image_size: int = field(32, help="input size in pixels (square)")
    val_fraction: float = field(0.1, help="share of each class's training images held out as val")
    test_fraction: float | None = field(None, help="share held out as test when the source has no eval split (default: val_fraction)")
    split_seed: int = field(0, help="seed of the train/val/test split (the run's `seed` does not move it)")
    verify: bool = field(True, help="decode every image once at build time (bad data counted, converted or skipped)")
    max_train_per_class: int | None = field(
        None, help="keep at most this many train images per class (a smaller study; val and test untouched)"
    )
    loader: Literal["auto", "tensors", "dataset", "ray_data"] = field(
        "auto", help="tensors: decoded split in memory (<= 64 px); dataset: torch DataLoader; ray_data: Ray Data (Ray runner)"
    )
    num_workers: int = field(2, help="DataLoader / decoding worker processes")
    decode: Literal["auto", "cpu", "cuda"] = field(
        "auto", help="where the dataset loader decodes and augments training JPEGs: cpu (workers), cuda (nvJPEG and "
        "the crop/flip/normalise on the training GPU; workers only read bytes), auto (cuda when training on one)"
    )
    cache_dir: str | None = field(None, help="folder for decoded-split caches (tensors loader)")

    def __post_init__(self) -> None:
        self.hierarchy_spec  # noqa: B018 - parsed here so that a bad spec fails when the config loads

    @property
    def hierarchy_spec(self) -> HierarchySpec:
        """:attr:`hierarchy` parsed (checked when the config is built)."""
        return HierarchySpec.parse(self.hierarchy, self.learned_from)


@dataclass
class GeneralistConfig:
    kind: Literal["own", "vanilla", "trunk_router"] = field(
        "vanilla",
        help="own: a superclass network (the paper); vanilla: the vanilla network, superclass = sum of its subclass "
        "probabilities; trunk_router: a small superclass head on the vanilla network's trunk (the stages before "
        "delta.stages), so stage one is the trunk alone and hard routing costs about one network",
    )
    router_width: float = field(
        0.5, help="trunk_router: channels of the router's conv, as a fraction of the trunk's (0: a linear head on the "
        "pooled trunk)"
    )
    router_distill: float = field(
        0.0, help="trunk_router: weight of distillation from the vanilla network's own superclass answer (0: labels only)"
    )
    router_trunk: Literal["frozen", "finetune", "joint"] = field(
        "frozen", help="trunk_router: frozen: only the router head trains, on the vanilla network's own trunk; "
        "finetune: the whole vanilla network is finetuned with the router as a second head (Network of Experts' "
        "order), and that network is the resident the specialists' deltas are taken against; joint: trunk, router "
        "and every expert's delta train together, for the specialists' images (specialist.optim; the trunk at "
        "router_optim.lr), each image through its own superclass's expert"
    )
    router_optim: OptimConfig = field(
        OptimConfig(epochs=10, batch_size=128, lr=0.1, warmup_epochs=0.0, weight_decay=5e-4),
        help="trunk_router: training of the router head (router_trunk=finetune: of the whole network with it; "
        "joint: only its lr is used, the trunk's)",
    )

    @property
    def has_own_network(self) -> bool:
        """Stage one is a superclass network of its own (the paper's generalist): it is the
        specialists' resident, and the vanilla network is a control beside it."""
        return self.kind == "own"

    @property
    def resident(self) -> Literal["generalist", "vanilla"]:
        """The network every specialist's delta is taken against, as bundles and the predictor name it."""
        return "generalist" if self.has_own_network else "vanilla"

    @property
    def router_trunk_mode(self) -> Literal["frozen", "finetune", "joint"] | None:
        """How the trunk router's trunk trains (``router_trunk``); None without a trunk router."""
        return self.router_trunk if self.kind == "trunk_router" else None

    def __post_init__(self) -> None:
        if not 0 <= self.router_width <= 4 or not 0 <= self.router_distill <= 1:
            raise ValueError("generalist: router_width must be in [0, 4] and router_distill in [0, 1]")
        if self.router_trunk != "frozen" and self.router_distill > 0:
            raise ValueError("generalist.router_distill distils from the vanilla network's frozen answer: it needs "
                             "router_trunk=frozen")


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
    distill: float = field(
        0.0, help="weight of distillation from the vanilla network's answer restricted to the superclass (+ 'other')"
    )
    distill_temperature: float = field(2.0, help="temperature of the distillation targets")
    optim: OptimConfig = field(
        OptimConfig(epochs=10, lr=0.02, warmup_epochs=0.0, weight_decay=0.0), help="finetuning optimiser"
    )

    def __post_init__(self) -> None:
        if self.negatives < 0 or not 0 <= self.distill <= 1 or self.distill_temperature <= 0:
            raise ValueError("specialist: negatives >= 0, 0 <= distill <= 1 and distill_temperature > 0")


@dataclass
class BaselinesConfig:
    """The models a two-stage result is compared with, each trained once per study and seed."""

    scaled: bool = field(False, help="a wider vanilla network (the 'just make it bigger' baseline, equal bytes)")
    scaled_width: float = field(1.25, help="width multiplier of the scaled-up vanilla network")
    scaled_depths: list[int] | None = field(None, help="blocks per stage of the scaled-up vanilla network (null: same)")
    scaled_flops: bool = field(
        False, help="a wider and/or deeper vanilla network at (at most) the served two-stage model's inference FLOPs per "
        "image, chosen after the first evaluation: the 'just make it bigger' control at equal inference compute"
    )
    vanilla_long: bool = field(
        False, help="the vanilla network trained on as many images as the vanilla network + all specialists "
        "(same recipe, longer schedule): equal training compute"
    )
    delta_all: bool = field(
        False, help="ONE delta of the specialists' budget on the vanilla network, finetuned on all classes for as "
        "many images as all specialists, pooled with the vanilla network as the two-stage model is: the ensembling control"
    )
    ensemble: str = field(
        "off", help="independently trained vanilla networks (seeds seed, seed+1, ...) averaged: off, auto (as many as "
        "the served two-stage model's inference FLOPs per image allow) or a number of members: equal inference compute"
    )

    def __post_init__(self) -> None:
        if self.ensemble not in ("off", "auto") and not (str(self.ensemble).isdigit() and int(self.ensemble) >= 1):
            raise ValueError(f"baselines.ensemble must be off, auto or a number of members >= 1, got {self.ensemble!r}")


@dataclass
class EvaluationConfig:
    calibrate: bool = field(True, help="choose the soft routing's k and threshold and the pooling weight α on val")
    serve: str = field(
        "soft_pooled",
        help=f"the routing the bundle serves: one of {', '.join(FAMILIES)} (as calibrated; *_pooled falls back to its "
        "unpooled family without a vanilla resident) or an explicit routing such as soft:2@0.7+0.5",
    )
    bootstrap: int = field(1000, help="paired bootstrap resamples for the 95% intervals of (model - vanilla)")
    batch_size: int = field(512, help="images per evaluation batch")
    latency: bool = field(True, help="time one test batch of every model (latency ratio vs the vanilla network)")

    def __post_init__(self) -> None:
        if self.serve not in FAMILIES:
            Routing.parse(self.serve)  # an explicit routing must at least parse
        if self.bootstrap < 0 or self.batch_size < 1:
            raise ValueError("evaluation: bootstrap >= 0 and batch_size >= 1")


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
    unshared_paths: Literal["refuse", "pin"] = field(
        "refuse", help="on a cluster, a storage_path some node cannot see: refuse to start, or pin training to the "
        "nodes that see it")

    def __post_init__(self) -> None:
        for name in ("cpus_per_worker", "gpus_per_worker", "specialist_cpus", "specialist_gpus"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"resources.{name} must be a finite number >= 0, got {v}")
        if self.num_workers < 1 or self.specialist_workers < 1:
            raise ValueError("resources: num_workers and specialist_workers must be at least 1")

    def scaling(self, group: str) -> tuple[int, float, float]:
        """``(workers, CPUs per worker, GPUs per worker)`` of a task's resource group."""
        if group == "specialist":
            return self.specialist_workers, self.specialist_cpus, self.specialist_gpus
        return self.num_workers, self.cpus_per_worker, self.gpus_per_worker


@dataclass
class TrackingConfig:
    enabled: bool = field(True, help="log to MLflow (jobs layer only)")
    tracking_uri: str | None = field(
        None, help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///~/.supersub/mlflow.db"
    )
    experiment: str = field("supersub", help="MLflow experiment name")
    log_bundle: bool = field(True, help="log the bundle as an MLflow model (pyfunc) of the parent run")
    register_as: str | None = field("supersub", help="register the logged bundle under this model name (null: do not)")


@dataclass
class PipelineConfig:
    name: str = field("default", help="run name")
    seed: int = field(0, help="seed of initialisation and data order (the split has its own: data.split_seed)")
    device: str = field("auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    report: bool = field(True, help="write OUT/report/ (one self-contained HTML page) at the end")
    data: DataConfig = field(DataConfig(), help="data")
    model: ModelConfig = field(ModelConfig(backbone="resnet10", width=0.25), help="backbone of every network")
    train: OptimConfig = field(OptimConfig(epochs=8, batch_size=64), help="vanilla / generalist training")
    generalist: GeneralistConfig = field(GeneralistConfig(), help="what answers stage one")
    specialist: SpecialistConfig = field(SpecialistConfig(), help="specialist finetuning")
    delta: DeltaConfig = field(DeltaConfig(), help="the specialists' deltas")
    baselines: BaselinesConfig = field(BaselinesConfig(), help="the models the two-stage model is compared with")
    evaluation: EvaluationConfig = field(EvaluationConfig(), help="calibration, routing served, statistics")
    resources: ResourcesConfig = field(ResourcesConfig(), help="where tasks run")
    tracking: TrackingConfig = field(TrackingConfig(), help="MLflow")

    def __post_init__(self) -> None:
        if self.delta.method not in METHODS:
            raise ValueError(f"delta.method must be one of {sorted(METHODS)}, got {self.delta.method!r}")
        if self.data.loader == "ray_data" and self.resources.runner != "ray":
            raise ValueError("data.loader=ray_data needs resources.runner=ray")
        if self.data.loader == "ray_data" and self.data.decode == "cuda":
            raise ValueError("data.decode=cuda needs the dataset loader (Ray Data decodes in its CPU tasks)")
        if self.generalist.kind == "trunk_router" and self.delta.first_stage < 1:
            raise ValueError("generalist.kind=trunk_router routes on the shared trunk: delta.stages must leave out "
                             "the stem (e.g. delta.stages=[layer4] or [layer3,layer4])")
        if self.generalist.router_trunk == "joint":
            if self.generalist.kind != "trunk_router":
                raise ValueError("generalist.router_trunk=joint trains the trunk router with the experts: it needs "
                                 "generalist.kind=trunk_router")
            if self.delta.mask == "fisher" or self.specialist.distill > 0 or self.specialist.init != "resident":
                raise ValueError("generalist.router_trunk=joint trains every expert in one step from the resident: "
                                 "delta.mask=fisher, specialist.distill and specialist.init=vanilla need the separate "
                                 "specialists (router_trunk=frozen or finetune)")
            if self.resources.num_workers > 1:
                raise ValueError("generalist.router_trunk=joint runs on one worker (its experts run outside the "
                                 "forward DDP sees): set resources.num_workers=1")


def _absolute(path: str | None) -> str | None:
    """A local path made absolute against the working directory; URIs and ``None`` unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))  # normalised (no "..") but links kept


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every local path it holds made absolute, once, where a job receives it: the
    stages may run in another working directory (Ray workers), where a relative path names nothing."""
    src = cfg.data.source
    kind, _, rest = src.partition(":")
    if src == "synthetic" or kind == "synthetic":
        source = src
    elif kind in ("cifar100", "parquet", "folder") and rest:
        source = f"{kind}:{_absolute(rest)}"
    else:
        source = _absolute(src)

    def spec(s: str) -> str:  # hierarchy specs that are files
        return _absolute(s) if s.lower().endswith((".json", ".csv")) else s

    data = dataclasses.replace(
        cfg.data, source=source, manifest=_absolute(cfg.data.manifest), imagenet_meta=_absolute(cfg.data.imagenet_meta),
        cache_dir=_absolute(cfg.data.cache_dir), hierarchy=spec(cfg.data.hierarchy), learned_from=spec(cfg.data.learned_from),
    )
    resources = dataclasses.replace(cfg.resources, storage_path=_absolute(cfg.resources.storage_path))
    return dataclasses.replace(cfg, data=data, resources=resources)
