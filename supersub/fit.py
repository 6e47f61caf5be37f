"""The epoch loop every training task shares: train, evaluate, checkpoint, report, resume.

:func:`fit` runs ``optim.epochs`` epochs, or exactly ``train_images`` images when a task gives a
budget (the equal-compute controls: the schedule then spans that many steps and the last epoch
stops early). Every epoch it logs and reports one row — losses, accuracies, images/s, images,
seconds, peak memory and the learning rate — and checkpoints, so a rerun or a restarted worker
resumes after the last finished epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supersub.epoch import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train_one_epoch,
    unwrap,
    use_channels_last,
)


def peak_lr(optim: OptimConfig, world_size: int) -> float:
    """The learning rate after the linear batch-size scaling (``lr`` is given for 128 images)."""
    return optim.lr * optim.batch_size * world_size / 128


def schedule_steps(optim: OptimConfig, steps_per_epoch: int, world_size: int, train_images: int | None) -> tuple[int, int]:
    """``(total optimiser steps, epochs)`` of a run: ``optim.epochs`` full epochs, or as many
    steps as ``train_images`` images fill (global batch = batch size x workers)."""
    if train_images is None:
        return optim.epochs * steps_per_epoch, optim.epochs
    total = max(1, train_images // (optim.batch_size * world_size))
    return total, math.ceil(total / steps_per_epoch)


def resume_state(ctx: Any, out_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from: the runner's (``ctx.resume_dir``), else the task's own
    (``out_dir/checkpoint``). One that cannot be read is skipped with a line saying so."""
    for d in (ctx.resume_dir, out_dir / "checkpoint"):
        if d is not None and (Path(d) / "checkpoint.pt").is_file():
            try:
                return load_checkpoint(Path(d) / "checkpoint.pt")
            except Exception as e:  # noqa: BLE001 - a damaged file of any kind: never trusted
                ctx.log(f"{Path(d) / 'checkpoint.pt'} is unreadable ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); not resuming from it")
    return None


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optim: OptimConfig,
    ctx: Any,  # supersub.tasks.TaskContext
    out_dir: Path,
    name: str,
    *,
    train_images: int | None = None,
    train_mode: Callable[[nn.Module], None] = lambda m: m.train(),
    step_hook_factory: Callable[[int], Callable[[int], None]] | None = None,
    loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    eval_classes: int | None = None,
) -> list[dict[str, Any]]:
    """Trains ``model`` and returns the per-epoch history (see the module doc)."""
    raw = model
    if use_channels_last(optim, ctx.device):
        raw = raw.to(memory_format=torch.channels_last)
    model = ctx.prepare_model(raw)
    if optim.compile:  # after DDP's wrapper, as PyTorch's DDP + compile notes advise; unwrap() sees through both
        model = torch.compile(model)
    optimizer = build_optimizer(model, optim, ctx.world_size)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{name}: no training batches (too few images for batch size {optim.batch_size})")
    total_steps, epochs = schedule_steps(optim, steps_per_epoch, ctx.world_size, train_images)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch, total_steps=total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state = resume_state(ctx, out_dir)
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        ctx.log(f"{name}: resumed after epoch {start_epoch}")
    hook = step_hook_factory(total_steps) if step_hook_factory else None
    for epoch in range(start_epoch, epochs):
        train_loader.set_epoch(epoch)
        train_mode(model)
        offset = epoch * steps_per_epoch
        stats = train_one_epoch(
            model, train_loader, optimizer, scheduler, loss_fn, ctx.device, optim,
            step_hook=(lambda s, o=offset: hook(o + s)) if hook else None,
            loss_hook=loss_hook,
            max_steps=total_steps - offset,
        )
        val = evaluate(model, val_loader, ctx.device, optim, eval_classes)
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
            f"{name} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.3f} "
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


def summary(history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """A task's result fields that every training task shares."""
    return {
        "history": history,
        "wall_seconds": wall,
        "images_per_s": sum(h["images_per_s"] for h in history) / max(1, len(history)),
        "peak_mem_mb": max((h["peak_mem_mb"] for h in history), default=0.0),
        # Training compute, in images through the network (forward + backward), for fair comparisons.
        "train_images": sum(h.get("train_images", 0) for h in history),
    }
