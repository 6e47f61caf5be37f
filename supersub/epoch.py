"""One epoch of plain PyTorch training or evaluation, and what it needs: ``train_one_epoch``,
``evaluate``, optimiser, schedule, precision, device, checkpoints (:mod:`supersub.fit` loops
over epochs).

Device-agnostic. ``amp="auto"`` uses bf16 autocast where the hardware does bf16 natively (CUDA;
CPUs with AVX-512 BF16 or AMX) and fp32 elsewhere: on a CPU without them, bf16 is emulated and
about 2.5x slower than fp32. ``channels_last="auto"`` is on everywhere (on this project's 2-core
AVX-512 CPU it trains ~1.3x faster; benchmarks/train_throughput.py prints both).
Every epoch measures images/s, wall time and peak memory (CUDA: ``max_memory_allocated``; CPU:
the process's peak resident set), because throughput and memory are logged metrics of every run.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from supersub.atomic import atomic_path
from supersub.config import field


@dataclass
class OptimConfig:
    epochs: int = field(30, help="training epochs")
    batch_size: int = field(128, help="batch size per worker")
    optimizer: Literal["sgd", "adamw"] = field("sgd", help="sgd (momentum, nesterov) or adamw")
    lr: float = field(0.1, help="peak learning rate for batch_size 128 on one worker (scaled linearly)")
    momentum: float = field(0.9, help="SGD momentum")
    weight_decay: float = field(5e-4, help="weight decay (not applied to BN and biases)")
    schedule: Literal["cosine", "onecycle", "constant"] = field("cosine", help="learning-rate schedule")
    warmup_epochs: float = field(1.0, help="linear warm-up epochs (cosine schedule)")
    label_smoothing: float = field(0.1, help="label smoothing of the cross-entropy")
    amp: Literal["auto", "bf16", "none"] = field(
        "auto", help="autocast: auto = bf16 where the hardware has it (CUDA, CPUs with AVX-512 BF16 / AMX), else fp32"
    )
    channels_last: Literal["auto", "on", "off"] = field("auto", help="channels_last memory format (auto: on)")
    compile: bool = field(False, help="torch.compile the model (first steps compile; off by default: "
                          "not yet measured on a GPU here, and on a CPU it needs a C++ compiler)")
    grad_clip: float = field(0.0, help="clip the gradient norm (0 = off)")


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices); deterministic data order follows from it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA; a CPU with AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return bool(cpu and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()))
    return False


def amp_dtype(cfg: OptimConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "bf16" or (cfg.amp == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def use_channels_last(cfg: OptimConfig, device: torch.device) -> bool:
    return cfg.channels_last != "off"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: decaying BN scales and biases hurts small nets.
    A parameter with an ``lr_scale`` attribute (a finetuned trunk under fresh heads) gets its own
    groups at that multiple of the learning rate."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim > 1, float(getattr(p, "lr_scale", 1.0))), []).append(p)
    out = [{"params": groups.pop((True, 1.0), []), "weight_decay": weight_decay},
           {"params": groups.pop((False, 1.0), []), "weight_decay": 0.0}]
    return out + [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
                  for (decay, scale), ps in groups.items()]


def build_optimizer(model: nn.Module, cfg: OptimConfig, world_size: int = 1) -> torch.optim.Optimizer:
    # Linear scaling rule (Goyal et al. 2017): lr is given for a global batch of 128.
    lr = cfg.lr * cfg.batch_size * world_size / 128
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        if "lr_scale" in g:
            g["lr"] = lr * g.pop("lr_scale")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int | None = None):
    """A per-step schedule (``scheduler.step()`` after every optimizer step) over ``total_steps``
    (default: ``epochs x steps_per_epoch``)."""
    total = max(1, total_steps if total_steps is not None else cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=0.25)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak process RSS (CPU) so far, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    device: torch.device,
    cfg: OptimConfig,
    *,
    step_hook: Callable[[int], None] | None = None,
    loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 0,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``max_steps`` batches). Returns loss, top-1 accuracy (%),
    images/s, seconds, peak MiB and images seen.

    ``step_hook(step)`` runs after each optimizer step (e.g. the delta's pruning schedule);
    ``loss_hook(logits, y, x) -> loss`` replaces the loss function (e.g. distillation).
    """
    model.train()
    dtype = amp_dtype(cfg, device)
    cl = use_channels_last(cfg, device)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x, y = _to_device(x, y, device, cl)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            loss = loss_hook(logits.float(), y, x) if loss_hook else loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if step_hook is not None:
            step_hook(step)
        # Accumulate on device: a .item() per step would synchronise CUDA every step.
        total_loss += loss.detach() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
        if log and log_every and (step + 1) % log_every == 0:
            rate = seen / (time.perf_counter() - start)
            log(f"  step {step + 1}: loss {total_loss.item() / seen:.4f}, {rate:.0f} images/s")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss.item() / max(1, seen),
        "acc": 100.0 * correct.item() / max(1, seen),
        "images_per_s": seen / max(seconds, 1e-9),
        "seconds": seconds,
        "peak_mem_mb": peak_memory_mb(device),
        "images": seen,
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    cfg: OptimConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` (float32, CPU) and labels ``[N]`` for every batch of ``loader``."""
    model.eval()
    cfg = cfg or OptimConfig()
    dtype = amp_dtype(cfg, device)
    cl = use_channels_last(cfg, device)
    outs, labels = [], []
    for x, y in loader:
        x, y = _to_device(x, y, device, cl)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outs.append(model(x).float().cpu())
        labels.append(y.cpu())
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    cfg: OptimConfig | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) and images/s of ``model`` over ``loader``.

    ``num_classes`` keeps only the first outputs: a specialist's "other" output is not an answer
    the two-stage model can give, so it is left out of its accuracy."""
    start = time.perf_counter()
    logits, labels = predict_logits(model, loader, device, cfg)
    if num_classes is not None:
        logits = logits[:, :num_classes]
    seconds = time.perf_counter() - start
    if labels.numel() == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "images_per_s": 0.0}
    k = min(5, logits.shape[1])
    top5 = logits.topk(k, dim=1).indices.eq(labels[:, None]).any(1).float().mean().item()
    return {
        "loss": nn.functional.cross_entropy(logits, labels).item(),
        "top1": 100.0 * logits.argmax(1).eq(labels).float().mean().item(),
        "top5": 100.0 * top5,
        "images_per_s": labels.numel() / max(seconds, 1e-9),
    }


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Saves tensors and plain values (model/optimizer/scheduler state dicts, epoch, metrics)
    atomically: a crash mid-write never leaves a half checkpoint that a resume would trust."""
    with atomic_path(path) as tmp:  # flushed, renamed; an interrupted write leaves no temp file
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code.
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
