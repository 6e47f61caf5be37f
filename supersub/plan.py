"""The bill before the cluster: every task a pipeline config would run, the images it reads, its
resources, its estimated wall time and the job's GPU-hours — training nothing.

The tasks are the pipeline's own: the stages of :mod:`supersub.stages`, which
:func:`supersub.pipeline.run_pipeline` runs, built with planned images where a run reads what
earlier tasks did. A task's images come from its loader specs and budget
(:func:`supersub.stages.planned_images` for training, one pass over its ``val`` loader per epoch
for validation), so whatever task kinds the pipeline builds are planned alike.

Images come from the manifest when there is one (``data.manifest``, or built from a reachable
source into ``--out``, where the run will reuse it). Where the source cannot be read from the
planning machine (the README's ImageNet command, planned on a laptop), they are counted from the
hierarchy and ILSVRC-2012's known size — 1,281,167 training images over 1,000 classes (1,281 a
class on average, most have 1,300), 50 validation images a class — split as the build would
(``data.val_fraction`` of each class's training images held out as ``val``, ILSVRC's own
validation set as ``test``), and the plan says so.

Time: a task's training images at ``min(GPU rate, decode rate)`` of its workers, its validation
images at three times the GPU rate (a forward is about a third of a training step) under the same
decode bound; no decode bound where the in-memory ``tensors`` loader holds decoded images, or where
the ``dataset`` loader decodes on the workers' GPUs (``data.decode=cuda``, or ``auto`` there).
Stages run in turn; the tasks of a stage run concurrently on the cluster the config implies (the
network tasks' ``num_workers × GPUs``).

Rates (:func:`choose_rates`): a ``--plan-throughput`` file's first. A config whose workers train
on GPUs, planned on a machine without one, is billed at a GPU kind's published rate
(:mod:`supersub.reference_throughput`, ``--plan-gpu``, A100 by default) and that table's decode
rate: a CPU's training speed says nothing of a GPU's, and on a shared machine it moved 100x
with the load. Otherwise both are measured here: the configured network's training steps on
this machine's device (a GPU config on a GPU; a CPU config, billed in CPU-hours, on this CPU),
and the uint8 tensor decode path on a synthetic 500×375 JPEG (ImageNet's most common size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supersub.config import ConfigError
from supersub.data.loaders import LoaderSpec, select
from supersub.hierarchy import Hierarchy
from supersub.pipeline_config import PipelineConfig
from supersub.reference_throughput import (
    DEFAULT_GPU,
    REFERENCE_DECODE_PER_CPU,
    REFERENCE_DECODE_SOURCE,
    check_gpu,
    gpu_kinds,
    reference_train_rate,
)
from supersub.stages import FLOPS_MATCHED, PipelineTasks, Stage, planned_images
from supersub.tasks import DataOptions

ILSVRC2012_TRAIN = 1_281_167  # training images, 1,000 classes
ILSVRC2012_CLASSES = 1000
ILSVRC2012_VAL_PER_CLASS = 50
EVAL_SPEEDUP = 3.0  # a forward pass against a training step (forward + backward ≈ 3 forwards)


@dataclass
class Throughput:
    """Rates a plan uses; ``source`` says where each came from."""

    train_per_worker: float  # training images/s of one worker (one device) for the model and size
    decode_per_cpu: float  # training samples/s one CPU decodes and augments
    source: dict[str, str] = field(default_factory=dict)
    train_from: str = "measured"  # "file", "table" (the reference GPU rates) or "measured" (here)
    gpu: str | None = None  # the GPU kind of a table rate


@dataclass
class PlannedTask:
    stage: str
    name: str
    kind: str
    train_images: int
    val_images: int
    workers: int
    cpus: float  # per worker
    gpus: float  # per worker
    hours: float = 0.0
    folder: str = ""  # the task's folder name (name + fingerprint): tasks of two plans with one folder are one task

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.workers * self.gpus

    @property
    def cpu_hours(self) -> float:
        return self.hours * self.workers * self.cpus


class CountedSplits:
    """The parts of a :class:`supersub.data.Manifest` a plan reads (``indices``, ``subclass``,
    ``superclass``, ``hierarchy``), counted from the hierarchy and a dataset's known size."""

    def __init__(self, hierarchy: Hierarchy, train_per_class: float, val_fraction: float, test_per_class: int) -> None:
        self.hierarchy = hierarchy
        n = hierarchy.num_subclasses
        per = int(round(train_per_class))
        n_val = int(round(per * val_fraction))
        counts = {"train": per - n_val, "val": n_val, "test": test_per_class}
        sub = [np.repeat(np.arange(n, dtype=np.int32), c) for c in counts.values()]
        self.subclass = np.concatenate(sub)
        coarse = np.empty(n, dtype=np.int32)
        for s, members in enumerate(hierarchy.coarse_to_fine):
            coarse[members] = s
        self.superclass = coarse[self.subclass]
        bounds = np.cumsum([0, *(c * n for c in counts.values())])
        self._rows = {k: np.arange(bounds[i], bounds[i + 1]) for i, k in enumerate(counts)}
        self.fingerprint = "counted"

    def indices(self, split: str) -> np.ndarray:
        return self._rows[split]

    def counts(self) -> dict[str, int]:
        return {k: int(v.size) for k, v in self._rows.items()}


# ----------------------------------------------------------------------------- tasks
PLANNED_FLOPS_RATIO = 2.0  # the served model's inference FLOPs an image, in networks, as hard routing costs


class PlannedUpstream:
    """What a plan knows of tasks before any has run (a :class:`supersub.stages.Upstream`): the
    images it plans for them; no network exists yet to hash, so a network's hash is its planned
    folder's name (two plans share a task exactly where a run would)."""

    def __init__(self, data: DataOptions, manifest) -> None:
        self.data, self.manifest = data, manifest

    def network_hash(self, folder: str) -> str:
        return f"planned:{Path(folder).name}"

    def train_images(self, task) -> int:
        return planned_images(task, self.manifest)

    def learned_data(self, task) -> tuple[DataOptions, Any]:
        """The learned superclasses exist only once the vanilla network does: the specialists are
        planned on the superclasses the manifest is built with (``make_plan`` says so)."""
        return self.data, self.manifest


def pipeline_stages(cfg: PipelineConfig, data: DataOptions, manifest, root: Path) -> list[Stage]:
    """The stages of :mod:`supersub.stages` that train, in the order
    :func:`supersub.pipeline.run_pipeline` runs them (the learned hierarchy, one pass over val in
    the driver, is not on the bill), then the FLOPs-matched controls as a served model of
    :data:`PLANNED_FLOPS_RATIO` networks of FLOPs would have them (a run sizes them after its
    evaluation)."""
    tasks = PipelineTasks(cfg, root, data, manifest, PlannedUpstream(data, manifest), log=lambda _: None)
    stages = [stage for stage in tasks.stages() if not stage.in_driver]
    late = tasks.flops_matched(PLANNED_FLOPS_RATIO)
    return [stage for stage in [*stages, late] if stage is not None and stage.tasks]


def val_passes(task, manifest) -> tuple[int, int]:
    """``(epochs, val images per epoch)`` of a task: ``fit`` evaluates ``val`` after every epoch."""
    from supersub.fit import schedule_steps

    specs: dict[str, LoaderSpec] = task.loader_specs()
    h = manifest.hierarchy
    spec = specs["train"]
    rows = manifest.indices("train")
    n_sub = len(h.superclasses[spec.superclass].subclasses) if spec.superclass is not None else 0
    per_epoch = select(manifest.subclass[rows], manifest.superclass[rows], spec, n_sub, 0)[0].size
    steps = max(1, per_epoch // spec.batch_size)
    budget = getattr(task, "trunk_images", getattr(task, "train_images", None))  # joint: images through the trunk
    epochs = schedule_steps(task.optim, steps, 1, budget)[1] if budget is not None else task.optim.epochs
    vspec = specs.get("val")
    if vspec is None:
        return epochs, 0
    vrows = manifest.indices(vspec.split)
    v_sub = len(h.superclasses[vspec.superclass].subclasses) if vspec.superclass is not None else 0
    return epochs, select(manifest.subclass[vrows], manifest.superclass[vrows], vspec, v_sub, 0)[0].size


def plan_tasks(cfg: PipelineConfig, manifest, root: Path) -> list[PlannedTask]:
    """Every task with its images and resources (hours still 0: see :func:`estimate`)."""
    data = DataOptions("planned", manifest.fingerprint, cfg.data.image_size)
    out = []
    for stage in pipeline_stages(cfg, data, manifest, root):
        for t in stage.tasks:
            epochs, val = val_passes(t, manifest)
            workers, cpus, gpus = cfg.resources.scaling(t.resources)
            out.append(PlannedTask(stage.name, t.name, t.kind, planned_images(t, manifest), epochs * val,
                                   workers, cpus, gpus, folder=Path(t.out_dir).name))
    return out


# ----------------------------------------------------------------------------- time
def estimate(tasks: list[PlannedTask], rates: Throughput, decode_bound: bool = True, gpu_decode: bool = False) -> None:
    """Fills each task's ``hours``: training at ``workers × min(rate × GPU share, CPUs × decode)``,
    validation at three times the device rate under the same decode bound (none with
    ``gpu_decode`` on a task with a GPU: ``data.decode=cuda``)."""
    for t in tasks:
        device = rates.train_per_worker * (min(t.gpus, 1.0) if t.gpus > 0 else 1.0)
        bound = decode_bound and not (gpu_decode and t.gpus > 0)
        decode = t.cpus * rates.decode_per_cpu if bound else math.inf
        train = t.workers * min(device, decode)
        val = t.workers * min(device * EVAL_SPEEDUP, decode)
        t.hours = (t.train_images / train + t.val_images / val) / 3600


def job_hours(tasks: list[PlannedTask], cluster_gpus: float, cluster_cpus: float) -> float:
    """Stages in turn; a stage's tasks share the cluster: the longer of its longest task and its
    device-hours spread over the cluster."""
    total = 0.0
    for stage in dict.fromkeys(t.stage for t in tasks):
        ts = [t for t in tasks if t.stage == stage]
        spread = (sum(t.gpu_hours for t in ts) / cluster_gpus if cluster_gpus > 0
                  else sum(t.cpu_hours for t in ts) / max(cluster_cpus, 1e-9))
        total += max(max(t.hours for t in ts), spread)
    return total


# ----------------------------------------------------------------------------- rates
def load_throughput(path: str | Path) -> dict[str, Any]:
    """A throughput file: ``{"train_images_per_s": R, "decode_images_per_s_per_cpu": D}`` (per
    worker / per CPU; either may be left out), or the JSON ``benchmarks/data_throughput.py`` writes
    (its ``tensor`` per-core median is the decode rate), or ``benchmarks/train_throughput.py``'s
    (the network's rate at the settings ``amp``/``channels_last=auto`` choose)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--plan-throughput {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--plan-throughput {path}: expected a JSON object")
    out: dict[str, Any] = {}
    if "train_images_per_s" in doc:
        out["train_per_worker"] = float(doc["train_images_per_s"])
    if "decode_images_per_s_per_cpu" in doc:
        out["decode_per_cpu"] = float(doc["decode_images_per_s_per_cpu"])
    cpu = doc.get("cpu", {}).get("tensor/1proc")
    if cpu and "decode_per_cpu" not in out:
        out["decode_per_cpu"] = float(cpu["per_core"]["median"])
    chosen = doc.get("images_per_s", {}).get(doc.get("auto_chooses", ""), {})
    if "network" in chosen and "train_per_worker" not in out:  # benchmarks/train_throughput.py's JSON
        out["train_per_worker"] = float(chosen["network"])
    if not out:
        raise ConfigError(f"--plan-throughput {path}: no train_images_per_s, decode_images_per_s_per_cpu "
                          "or data_throughput.py figures in it")
    out["label"] = str(doc.get("device", path.name))
    if "train_per_worker" in out:  # train_throughput.py run on a CPU says so
        out["device_is_cpu"] = str(doc.get("device", "")).lower() == "cpu"
    return out


def measure_train_rate(cfg: PipelineConfig, num_classes: int, steps: int = 2, batch: int = 8) -> tuple[float, str]:
    """Training images/s of the configured network at the configured size on this machine's
    device (``cfg.device``), ``amp`` and ``channels_last`` as configured; a small batch."""
    import torch

    from supersub.epoch import amp_dtype, build_optimizer, pick_device, use_channels_last
    from supersub.resnet import build_model

    device = pick_device(cfg.device)
    s = cfg.data.image_size
    model = build_model(cfg.model, num_classes, s).to(device)
    cl = use_channels_last(cfg.train, device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train)
    dtype = amp_dtype(cfg.train, device)
    x = torch.randn(batch, 3, s, s, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return batch / min(times), f"{cfg.model.backbone} @ {s} px, batch {batch}, on {device}"


def measure_decode_rate(image_size: int, seconds: float = 1.0) -> float:
    """Training samples/s of one CPU through the uint8 tensor path on a synthetic 500×375 JPEG."""
    import io

    import torch
    from PIL import Image

    from supersub.data.dataset import TensorTrainTransform
    from supersub.data.images import decode_tensor

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    img = np.stack([xx * 0.5, yy * 0.6, (xx + yy) * 0.3], -1) + rng.normal(0, 20, (375, 500, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    augment = TensorTrainTransform(image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        augment(decode_tensor(data).tensor)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            augment(decode_tensor(data).tensor)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def trains_on_gpus(cfg: PipelineConfig) -> bool:
    return cfg.resources.gpus_per_worker > 0 or cfg.resources.specialist_gpus > 0


def gpu_here(cfg: PipelineConfig) -> bool:
    """Whether this machine trains on a GPU as the config's workers would."""
    import torch

    return cfg.device != "cpu" and torch.cuda.is_available()


def precision(cfg: PipelineConfig) -> str:
    """``amp`` or ``fp32``: what the config's training computes in on a GPU (``amp=auto`` is bf16 there)."""
    return "fp32" if cfg.train.amp == "none" else "amp"


def _given_rates(files: list) -> tuple[dict[str, Any], str]:
    given: dict[str, Any] = {}
    for f in files:
        given.update(load_throughput(f))
    return given, ", ".join(str(f) for f in files)


def choose_rates(cfg: PipelineConfig, files: list, num_classes: int, gpu: str | None = None) -> Throughput:
    """The plan's rates, each from the first of: the ``--plan-throughput`` files; for a config
    that trains on GPUs planned where there is none (or with ``gpu`` named), the reference table
    of ``gpu`` (default :data:`~supersub.reference_throughput.DEFAULT_GPU`) — never this
    machine's CPU, whose speed says nothing of a GPU's and moves with the load; else measured
    here (a GPU config on a GPU, or a CPU config on this CPU)."""
    given, names = _given_rates(files)
    on_gpus = trains_on_gpus(cfg)
    use_table = on_gpus and (gpu is not None or not gpu_here(cfg))
    if on_gpus and given.get("device_is_cpu") and "train_per_worker" in given:
        raise ConfigError(f"--plan-throughput {names}: its training rate was measured on a CPU, and the config's "
                          "workers train on GPUs: give a GPU's rate, or leave it out for the reference table")
    source: dict[str, str] = {}
    if "train_per_worker" in given:
        train, train_from, kind = given["train_per_worker"], "file", None
        source["train"] = f"from {names} ({given['label']})"
    elif use_table:
        kind, train_from = check_gpu(gpu or DEFAULT_GPU), "table"
        train, what = reference_train_rate(kind, cfg.model, cfg.data.image_size, precision(cfg), num_classes)
        chosen = "--plan-gpu" if gpu else f"the default; --plan-gpu {{{', '.join(gpu_kinds())}}} picks another"
        why = "" if gpu else "this machine has no GPU for the config's GPU workers, so nothing is measured here; "
        source["train"] = f"{why}reference table, GPU {kind} ({chosen}): {what}"
    else:
        train, what = measure_train_rate(cfg, num_classes)
        train_from, kind = "measured", None
        source["train"] = f"measured here: {what}"
    if "decode_per_cpu" in given:
        decode = given["decode_per_cpu"]
        source["decode"] = f"from {names}"
    elif use_table:  # the cluster's CPUs, not this machine's
        decode, source["decode"] = REFERENCE_DECODE_PER_CPU, REFERENCE_DECODE_SOURCE
    else:
        decode = measure_decode_rate(cfg.data.image_size)
        source["decode"] = "measured here: uint8 tensor path, one CPU, a synthetic 500×375 JPEG"
    return Throughput(train, decode, source, train_from, kind)


# ----------------------------------------------------------------------------- the plan
def _hierarchy_offline(cfg: PipelineConfig) -> Hierarchy:
    from supersub.hierarchy import load_hierarchy

    spec = cfg.data.hierarchy_spec.build
    try:
        return load_hierarchy(spec, imagenet_meta=cfg.data.imagenet_meta)
    except Exception as e:  # noqa: BLE001 - said in one line below
        raise ConfigError(f"--plan: the source {cfg.data.source} is not reachable from here and the hierarchy "
                          f"{spec!r} cannot be read without it ({e})") from None


def plan_manifest(cfg: PipelineConfig, out: Path | None, log=print) -> tuple[Any, str]:
    """The manifest to count on and a line saying where the counts come from."""
    from supersub.data import load_manifest
    from supersub.data.sources import check_source
    from supersub.errors import DataError
    from supersub.pipeline import prepare_data

    if cfg.data.manifest:
        return load_manifest(cfg.data.manifest), f"counts from the manifest {cfg.data.manifest}"
    try:
        check_source(cfg.data.source)
        reachable = True
    except DataError:
        reachable = False
    if reachable:
        base = out if out is not None else Path(tempfile.mkdtemp(prefix="supersub-plan-"))
        data_dir = prepare_data(cfg, base, log)
        where = "(the run will reuse it)" if out is not None else "(a temporary folder)"
        return load_manifest(data_dir), f"counts from the manifest built from {cfg.data.source} in {data_dir} {where}"
    h = _hierarchy_offline(cfg)
    per = ILSVRC2012_TRAIN / ILSVRC2012_CLASSES
    counted = CountedSplits(h, per, cfg.data.val_fraction, ILSVRC2012_VAL_PER_CLASS)
    c = counted.counts()
    if cfg.data.max_train_per_class is not None:
        raise ConfigError("--plan: data.max_train_per_class with an unreachable source is not counted; build the "
                          "manifest first (data.manifest=DIR)")
    return counted, (f"the source {cfg.data.source} is not reachable from this machine: counted from the hierarchy "
                     f"{h.name!r} ({h.num_subclasses} classes) and ILSVRC-2012's size (1,281,167 training images "
                     f"over 1,000 classes: {per:,.0f} a class; {ILSVRC2012_VAL_PER_CLASS} validation images a class), "
                     f"split as the build would: train {c['train']:,}, val {c['val']:,}, test {c['test']:,}")


def make_plan(cfg: PipelineConfig, out: Path | None = None, throughput: str | Path | list | None = None,
              log=print, gpu: str | None = None) -> dict[str, Any]:
    """The plan as a dict (``tasks``, ``totals``, ``rates``, ``counts``) — see the module doc.
    ``throughput``: one file or several (a later file's rates win); ``gpu``: the GPU kind whose
    reference rate a GPU config is billed at (:mod:`supersub.reference_throughput`)."""
    if gpu is not None:  # checked before the manifest is built or counted
        check_gpu(gpu)
        if not trains_on_gpus(cfg):
            raise ConfigError(f"--plan-gpu {gpu}: the config's workers take no GPU (resources.gpus_per_worker and "
                              "resources.specialist_gpus are 0); its plan is in CPU-hours, measured here")
    manifest, counts_from = plan_manifest(cfg, out, log)
    if cfg.data.hierarchy_spec.learned:
        counts_from += (f"; {cfg.data.hierarchy}: the specialists are planned on the superclasses of "
                        f"{cfg.data.learned_from} (the learned ones exist only once the vanilla network does)")
    tasks = plan_tasks(cfg, manifest, Path(out or "planned") / "tasks")
    if any(t.stage == FLOPS_MATCHED for t in tasks):
        counts_from += (f"; the {FLOPS_MATCHED} are planned for a served model of {PLANNED_FLOPS_RATIO:g} networks "
                        "of FLOPs an image (hard routing), the run sizes them after its evaluation")
    files = [throughput] if isinstance(throughput, (str, Path)) else list(throughput or [])
    rates = choose_rates(cfg, files, manifest.hierarchy.num_subclasses, gpu)
    # The tensors loader decodes a split once per run, not per epoch: no decode bound.
    in_memory = cfg.data.loader == "tensors" or (cfg.data.loader == "auto" and cfg.data.image_size <= 64)
    # data.decode=cuda (or auto on GPU workers) decodes training JPEGs on the GPU: the dataset loader only.
    gpu_decode = cfg.data.loader in ("auto", "dataset") and cfg.data.decode in ("auto", "cuda")
    estimate(tasks, rates, decode_bound=not in_memory, gpu_decode=gpu_decode)
    train_rate, decode_rate, source = rates.train_per_worker, rates.decode_per_cpu, rates.source
    workers, cpus, gpus = cfg.resources.scaling("network")
    cluster_gpus, cluster_cpus = workers * gpus, workers * cpus
    return {
        "config": cfg.name,
        "counts_from": counts_from,
        "counts": manifest.counts(),
        "rates": {"train_images_per_s_per_worker": train_rate, "decode_images_per_s_per_cpu": decode_rate,
                  "decode_bound": not in_memory, "gpu_decode": gpu_decode, "source": source,
                  "train_from": rates.train_from, "gpu": rates.gpu},
        "cluster": {"gpus": cluster_gpus, "cpus": cluster_cpus, "trains_on_gpus": trains_on_gpus(cfg)},
        "tasks": [{**dataclasses.asdict(t), "gpu_hours": t.gpu_hours, "cpu_hours": t.cpu_hours} for t in tasks],
        "totals": {"train_images": sum(t.train_images for t in tasks), "val_images": sum(t.val_images for t in tasks),
                   "gpu_hours": sum(t.gpu_hours for t in tasks), "cpu_hours": sum(t.cpu_hours for t in tasks),
                   "wall_hours": job_hours(tasks, cluster_gpus, cluster_cpus)},
    }


def format_plan(plan: dict[str, Any]) -> str:
    r, cl = plan["rates"], plan["cluster"]
    on_gpus = cl["trains_on_gpus"]  # a CPU config's tasks are billed in CPU-hours
    unit = "GPU-h" if on_gpus else "CPU-h"
    rows = [f"plan of {plan['config']}: {plan['counts_from']}",
            f"training rate: {r['train_images_per_s_per_worker']:,.1f} images/s a worker ({r['source']['train']})",
            f"decode rate: {r['decode_images_per_s_per_cpu']:,.0f} images/s a CPU ({r['source']['decode']})"
            + ("" if r["decode_bound"] else "; in-memory tensors loader: no decode bound")
            + ("; data.decode on the GPU: no CPU decode bound on GPU workers" if r.get("gpu_decode") else ""),
            "",
            f"{'stage':<28}{'task':<20}{'train images':>14}{'val images':>12}{'resources':>24}{'hours':>9}{unit:>9}"]
    for t in plan["tasks"]:
        res = f"{t['workers']} × ({t['cpus']:g} CPU, {t['gpus']:g} GPU)"
        billed = t["gpu_hours"] if on_gpus else t["cpu_hours"]
        rows.append(f"{t['stage'][:27]:<28}{t['name'][:19]:<20}{t['train_images']:>14,}{t['val_images']:>12,}"
                    f"{res:>24}{t['hours']:>9.2f}{billed:>9.2f}")
    tot = plan["totals"]
    billed = (f"{tot['gpu_hours']:,.1f} GPU-hours, {tot['cpu_hours']:,.1f} CPU-hours" if on_gpus
              else f"{tot['cpu_hours']:,.1f} CPU-hours (no GPUs in this config)")
    rows += ["",
             f"total: {tot['train_images']:,} training + {tot['val_images']:,} validation images, {billed}; "
             f"about {tot['wall_hours']:,.1f} h of wall time on {cl['gpus']:g} GPUs / {cl['cpus']:g} CPUs "
             "(stages in turn, a stage's tasks side by side; evaluation and start-up not included)"]
    return "\n".join(rows)
