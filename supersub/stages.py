"""The stage functions that the orchestration layer distributes.

* :func:`train_network` — the vanilla network (all subclasses), the generalist (superclasses) or
  a scaled-up vanilla network; plain PyTorch, optionally DDP.
* :func:`finetune_specialist` — one superclass's specialist: the resident network plus a sparse
  quantised delta and its own head, finetuned on that superclass's images.

A stage reads a manifest, writes its outputs to ``task.out_dir`` (``model.safetensors`` or
``delta.safetensors``, ``network.json``, ``metrics.json``) and checkpoints every epoch so that a
rerun (or a restarted Ray Train worker) resumes. How it runs — in this process, under Ray Train,
with which loader — is the :class:`StageContext`'s business, not the stage's.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from supersub.bundle import NetworkSpec
from supersub.config import from_dict, to_dict
from supersub.data import load_manifest
from supersub.delta import (
    DeltaConfig,
    PackedDelta,
    PruningSchedule,
    add_delta,
    choose_fisher_masks,
    export_delta,
    set_train_mode,
)
from supersub.loaders import LoaderSpec, make_loader
from supersub.models import ModelConfig, ResNet
from supersub.train import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    train_one_epoch,
    unwrap,
    use_channels_last,
)


@dataclass
class StageContext:
    """How a stage runs. The defaults run it in this process on one device."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m  # e.g. DDP wrapping
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, ckpt: None
    log: Callable[[str], None] = print
    make_loader: Callable[..., Any] | None = None  # replaces supersub.loaders.make_loader
    resume_dir: Path | None = None  # a checkpoint directory handed back by the runner


@dataclass
class DataOptions:
    manifest_dir: str
    image_size: int
    loader: Literal["auto", "tensors", "dataset"] = "auto"
    num_workers: int = 2
    cache_dir: str | None = None


@dataclass
class NetworkTask:
    name: str  # "vanilla", "generalist", "vanilla_scaled"
    target: Literal["fine", "coarse"]
    model: ModelConfig
    optim: OptimConfig
    data: DataOptions
    out_dir: str
    seed: int = 0


@dataclass
class SpecialistTask:
    superclass: int
    resident_dir: str  # output of train_network: the network every delta is taken against
    init_dir: str | None  # start from this network instead of the resident (its delta is then dense at first)
    head_init: Literal["random", "vanilla_rows"]
    vanilla_dir: str | None  # for head_init = vanilla_rows
    delta: DeltaConfig
    optim: OptimConfig
    negatives: float
    data: DataOptions
    out_dir: str
    seed: int = 0

    @property
    def name(self) -> str:
        return f"specialist_{self.superclass}"


def task_to_dict(task: NetworkTask | SpecialistTask) -> dict[str, Any]:
    return to_dict(task) if not isinstance(task, dict) else task


def network_task_from_dict(d: dict[str, Any]) -> NetworkTask:
    d = dict(d)
    d["model"] = from_dict(ModelConfig, d["model"])
    d["optim"] = from_dict(OptimConfig, d["optim"])
    d["data"] = DataOptions(**d["data"])
    return NetworkTask(**d)


def specialist_task_from_dict(d: dict[str, Any]) -> SpecialistTask:
    d = dict(d)
    d["delta"] = from_dict(DeltaConfig, d["delta"])
    d["optim"] = from_dict(OptimConfig, d["optim"])
    d["data"] = DataOptions(**d["data"])
    return SpecialistTask(**d)


# ------------------------------------------------------------------------------ helpers
def save_network(model: nn.Module, spec: NetworkSpec, out_dir: Path, class_ids: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "network.json").write_text(json.dumps({**spec.to_dict(), "class_ids": class_ids}, indent=2))


def load_network(stage_dir: str | Path) -> tuple[ResNet, NetworkSpec, list[str]]:
    """A trained network, its spec, and the ids its outputs stand for (fine or superclass ids)."""
    stage_dir = Path(stage_dir)
    meta = json.loads((stage_dir / "network.json").read_text())
    spec = NetworkSpec.from_dict(meta)
    model = spec.build()
    model.load_state_dict(load_file(str(stage_dir / "model.safetensors")))
    return model.eval(), spec, meta["class_ids"]


def loader_specs(task: NetworkTask | SpecialistTask) -> dict[str, LoaderSpec]:
    """The loaders a stage asks for, by split (a Ray Data runner builds its datasets from these)."""
    bs = task.optim.batch_size
    if isinstance(task, NetworkTask):
        return {
            "train": LoaderSpec("train", task.target, True, bs, seed=task.seed),
            "val": LoaderSpec("val", task.target, False, bs * 2, seed=task.seed),
        }
    s = task.superclass
    return {
        "train": LoaderSpec("train", "specialist", True, bs, s, task.negatives, task.seed),
        "val": LoaderSpec("val", "specialist", False, bs * 2, s, 0.0, task.seed),
    }


def is_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "metrics.json").is_file()


def _loader(ctx: StageContext, data: DataOptions, manifest, spec: LoaderSpec):
    if ctx.make_loader is not None:
        return ctx.make_loader(spec)
    return make_loader(
        manifest,
        spec,
        image_size=data.image_size,
        mode=data.loader,
        device=ctx.device,
        num_workers=data.num_workers,
        cache_dir=data.cache_dir,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )


def _resume(ctx: StageContext, out_dir: Path) -> dict[str, Any] | None:
    for d in (ctx.resume_dir, out_dir / "checkpoint"):
        if d is not None and (Path(d) / "checkpoint.pt").is_file():
            return load_checkpoint(Path(d) / "checkpoint.pt")
    return None


def _fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optim_cfg: OptimConfig,
    ctx: StageContext,
    out_dir: Path,
    name: str,
    *,
    train_mode: Callable[[nn.Module], None] = lambda m: m.train(),
    step_hook_factory: Callable[[int], Callable[[int], None]] | None = None,
    eval_classes: int | None = None,
) -> list[dict[str, Any]]:
    """The epoch loop shared by both stages: train, evaluate, checkpoint, report, resume."""
    raw = model
    if use_channels_last(optim_cfg, ctx.device):
        raw = raw.to(memory_format=torch.channels_last)
    model = ctx.prepare_model(raw)
    optimizer = build_optimizer(model, optim_cfg, ctx.world_size)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"{name}: no training batches (too few images for batch size {optim_cfg.batch_size})")
    scheduler = build_scheduler(optimizer, optim_cfg, steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=optim_cfg.label_smoothing)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state = _resume(ctx, out_dir)
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        ctx.log(f"{name}: resumed after epoch {start_epoch}")
    hook = step_hook_factory(steps) if step_hook_factory else None
    for epoch in range(start_epoch, optim_cfg.epochs):
        train_loader.set_epoch(epoch)
        train_mode(model)
        offset = epoch * steps
        stats = train_one_epoch(
            model, train_loader, optimizer, scheduler, loss_fn, ctx.device, optim_cfg,
            step_hook=(lambda s, o=offset: hook(o + s)) if hook else None,
        )
        val = evaluate(model, val_loader, ctx.device, optim_cfg, eval_classes)
        row = {
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "train_acc": stats["acc"],
            "val_loss": val["loss"],
            "val_acc": val["top1"],
            "images_per_s": stats["images_per_s"] * ctx.world_size,
            "train_images": stats["images"] * ctx.world_size,
            "epoch_seconds": stats["seconds"],
            "peak_mem_mb": stats["peak_mem_mb"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        ctx.log(
            f"{name} epoch {epoch + 1}/{optim_cfg.epochs}: loss {row['train_loss']:.3f} "
            f"val acc {row['val_acc']:.1f}% {row['images_per_s']:.0f} img/s"
        )
        ckpt_dir = out_dir / "checkpoint"
        if ctx.rank == 0:
            save_checkpoint(
                ckpt_dir / "checkpoint.pt",
                model=unwrap(model).state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=epoch,
                history=history,
            )
        ctx.report(row, ckpt_dir if ctx.rank == 0 else None)
    return history


def _summary(history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    return {
        "history": history,
        "wall_seconds": wall,
        "images_per_s": sum(h["images_per_s"] for h in history) / max(1, len(history)),
        "peak_mem_mb": max((h["peak_mem_mb"] for h in history), default=0.0),
        # Training compute, in images through the network (forward + backward), for fair comparisons.
        "train_images": sum(h.get("train_images", 0) for h in history),
    }


# ------------------------------------------------------------------------------ stages
def train_network(task: NetworkTask, ctx: StageContext | None = None) -> dict[str, Any]:
    """Trains a network over fine classes (vanilla) or superclasses (generalist)."""
    ctx = ctx or StageContext()
    out_dir = Path(task.out_dir)
    t0 = time.perf_counter()
    seed_everything(task.seed)
    manifest = load_manifest(task.data.manifest_dir)
    h = manifest.hierarchy
    num_outputs = h.num_subclasses if task.target == "fine" else h.num_superclasses
    class_ids = h.subclass_ids if task.target == "fine" else h.superclass_ids
    spec = NetworkSpec(task.model, num_outputs, task.data.image_size)
    model = spec.build().to(ctx.device)
    specs = loader_specs(task)
    train = _loader(ctx, task.data, manifest, specs["train"])
    val = _loader(ctx, task.data, manifest, specs["val"])
    history = _fit(model, train, val, task.optim, ctx, out_dir, task.name)
    result = {"name": task.name, "target": task.target, **_summary(history, time.perf_counter() - t0)}
    result["val_acc"] = history[-1]["val_acc"] if history else float("nan")
    if ctx.rank == 0:
        save_network(model, spec, out_dir, class_ids)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def specialist_head(
    task: SpecialistTask, num_features: int, n_sub: int, members: list[int]
) -> nn.Linear:
    """The specialist's head: ``n_sub`` outputs, plus one "other" output when it sees negatives.

    ``vanilla_rows`` copies the vanilla head's rows of the superclass's members, so finetuning
    starts from the vanilla network's own within-superclass answer."""
    n_out = n_sub + (1 if task.negatives > 0 else 0)
    head = nn.Linear(num_features, n_out)
    if task.head_init == "vanilla_rows":
        vanilla, _, _ = load_network(task.vanilla_dir)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:n_sub] = vanilla.fc.weight[members]
            head.bias[:n_sub] = vanilla.fc.bias[members]
    return head


def finetune_specialist(task: SpecialistTask, ctx: StageContext | None = None) -> dict[str, Any]:
    """Finetunes the specialist of one superclass and writes its packed delta."""
    ctx = ctx or StageContext()
    out_dir = Path(task.out_dir)
    t0 = time.perf_counter()
    seed_everything(task.seed * 7919 + task.superclass)
    manifest = load_manifest(task.data.manifest_dir)
    h = manifest.hierarchy
    members = h.coarse_to_fine[task.superclass]
    resident, resident_spec, _ = load_network(task.resident_dir)
    model = copy.deepcopy(resident)
    if task.init_dir:  # start from another network: the delta begins as (init - resident)
        init, _, _ = load_network(task.init_dir)
        init_state = {k: v for k, v in init.state_dict().items() if not k.startswith("fc.")}
    head = specialist_head(task, model.num_features, len(members), members)
    deltas = add_delta(model, task.delta, head)
    if task.init_dir:
        _start_from(model, init_state, task.delta)
    model = model.to(ctx.device)
    specs = loader_specs(task)
    train = _loader(ctx, task.data, manifest, specs["train"])
    val = _loader(ctx, task.data, manifest, specs["val"])

    if task.delta.mask == "fisher" and _resume(ctx, out_dir) is None:
        model.eval()  # gradients under the resident's statistics; no BN state changes
        train.set_epoch(0)
        batches = itertools.islice(iter(train), task.delta.fisher_batches)
        choose_fisher_masks(model, deltas, batches, nn.CrossEntropyLoss(), ctx.device)

    def schedule_factory(steps_per_epoch: int):
        return PruningSchedule(deltas, task.delta, steps_per_epoch * task.optim.epochs)

    history = _fit(
        model, train, val, task.optim, ctx, out_dir, task.name,
        train_mode=lambda m: set_train_mode(m, task.delta),
        step_hook_factory=schedule_factory,
        eval_classes=len(members),
    )
    plain = unwrap(model)
    packed = export_delta(plain, task.delta, task.superclass)
    final = evaluate(plain, val, ctx.device, task.optim, len(members))  # the exported delta's accuracy
    nbytes = len(packed.to_bytes())
    network_bytes = sum(t.numel() * t.element_size() for t in resident.state_dict().values())
    nnz = sum(int(e["nnz"]) for e in packed.meta["layers"].values())
    total = sum(int(torch.tensor(e["shape"]).prod()) for e in packed.meta["layers"].values())
    result = {
        "name": task.name,
        "superclass": task.superclass,
        **_summary(history, time.perf_counter() - t0),
        "val_acc": final["top1"],
        "val_acc_before_export": history[-1]["val_acc"] if history else float("nan"),
        "delta_bytes": nbytes,
        "delta_ratio": nbytes / network_bytes,
        "delta_density": nnz / max(1, total),
        "resident_image_size": resident_spec.image_size,
    }
    if ctx.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "delta.safetensors").write_bytes(packed.to_bytes())
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def _start_from(model: nn.Module, init_state: dict[str, torch.Tensor], cfg: DeltaConfig) -> None:
    """Sets each delta to (init weight − resident weight) and BN tensors to init's, so the
    specialist starts as the init network although its delta is taken against the resident."""
    from supersub.delta import delta_layers

    for name, d in delta_layers(model):
        d.delta.copy_(init_state[f"{name}.weight"] - model.get_submodule(name).parametrizations.weight.original)
    if cfg.bn == "adapt":
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and f"{name}.running_mean" in init_state:
                for t in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m, t).copy_(init_state[f"{name}.{t}"])


def load_packed(out_dir: str | Path) -> PackedDelta:
    return PackedDelta.from_bytes((Path(out_dir) / "delta.safetensors").read_bytes())


__all__ = [
    "DataOptions",
    "NetworkTask",
    "SpecialistTask",
    "StageContext",
    "asdict",
    "finetune_specialist",
    "is_done",
    "loader_specs",
    "load_network",
    "load_packed",
    "train_network",
]
