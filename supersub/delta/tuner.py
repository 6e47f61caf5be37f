"""Finetuning a specialist: the resident network's copy + a sparse quantised delta + its own head.

* :func:`add_delta` turns a copy of the resident network into a trainable specialist: every conv
  weight of the delta stages gets a :class:`~supersub.delta.layer.SparseQuantDelta`.
* :class:`PruningSchedule` shrinks the masks during finetuning (gradual magnitude pruning);
  :func:`choose_fisher_masks` fixes them before it instead.
* :func:`start_from` makes the specialist start as another network (``specialist.init=vanilla``).

BatchNorm (``DeltaConfig.bn``): base BNs outside the delta stages are always frozen in eval mode,
so a shared trunk stays identical to the resident network's. Inside the delta stages, ``frozen``
keeps the base's statistics and affine; ``adapt`` lets the specialist re-estimate statistics and
train the affine on its superclass's images, and stores all four BN tensors dense (fp32).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from supersub.delta.config import DeltaConfig
from supersub.delta.layer import SparseQuantDelta
from supersub.resnet import STAGES, ResNet, stage_of

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _delta_modules(model: nn.Module, cfg: DeltaConfig) -> list[tuple[str, nn.Module]]:
    stages = {STAGES.index(s) for s in cfg.stages}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and stage_of(name) in stages
    ]


def delta_bns(model: nn.Module, cfg: DeltaConfig) -> list[tuple[str, nn.BatchNorm2d]]:
    stages = {STAGES.index(s) for s in cfg.stages}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and stage_of(n) in stages]


def add_delta(model: ResNet, cfg: DeltaConfig, head: nn.Linear) -> list[SparseQuantDelta]:
    """Makes ``model`` (a copy of the resident network, changed in place) a specialist: every conv
    weight in ``cfg.stages`` gets a :class:`SparseQuantDelta`, all base parameters are frozen,
    BNs in the delta stages train when ``cfg.bn == "adapt"``, and ``head`` replaces ``model.fc``."""
    for p in model.parameters():
        p.requires_grad_(False)
    deltas = []
    for i, (_, module) in enumerate(_delta_modules(model, cfg)):
        seed = cfg.seed * 1_000_003 + i if cfg.mask == "random" else None
        delta = SparseQuantDelta(module.weight.shape, cfg.bits, cfg.qat, seed, cfg.keep)
        parametrize.register_parametrization(module, "weight", delta)
        deltas.append(delta)
    if cfg.bn == "adapt":
        for _, bn in delta_bns(model, cfg):
            bn.weight.requires_grad_(True)
            bn.bias.requires_grad_(True)
    model.fc = head
    for p in head.parameters():
        p.requires_grad_(True)
    return deltas


def set_train_mode(model: nn.Module, cfg: DeltaConfig) -> None:
    """``model.train()``, except the BNs that must keep the base's statistics."""
    model.train()
    adapt = {n for n, _ in delta_bns(model, cfg)} if cfg.bn == "adapt" else set()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and name not in adapt:
            m.eval()


def delta_layers(model: nn.Module) -> list[tuple[str, SparseQuantDelta]]:
    """``(module name, delta)`` for every parametrised weight of a specialist."""
    out = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, SparseQuantDelta):
                    out.append((name, p))
    return out


def choose_fisher_masks(model: nn.Module, deltas: list[SparseQuantDelta], batches, loss_fn, device) -> None:
    """Fixes every delta's mask to the entries with the largest summed squared gradient over
    ``batches`` (an empirical Fisher diagonal; FISH mask, Sung et al. 2021,
    https://arxiv.org/abs/2111.09839): the weights this superclass's loss is most sensitive to.
    Under DDP the scores are summed over ranks so that every rank picks the same mask."""
    scores = [torch.zeros_like(d.delta) for d in deltas]
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x.to(device)), y.to(device)).backward()
        for acc, d in zip(scores, deltas):
            if d.delta.grad is not None:
                acc += d.delta.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for acc in scores:
            torch.distributed.all_reduce(acc)
    for acc, d in zip(scores, deltas):
        d.fix_mask(acc)


class PruningSchedule:
    """Gradual magnitude pruning (Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878): the kept
    fraction falls from 1 to ``keep`` along a cubic curve over the first ``prune_end`` of the
    steps, in ``prune_updates`` mask updates, so the delta learns under its final sparsity for the
    rest of finetuning instead of being cut once at the end."""

    def __init__(self, deltas: list[SparseQuantDelta], cfg: DeltaConfig, total_steps: int) -> None:
        self.deltas, self.cfg = deltas, cfg
        self.end = max(1, int(cfg.prune_end * total_steps))
        self.every = max(1, self.end // cfg.prune_updates)
        self.active = cfg.sparsify == "gradual" and cfg.mask == "magnitude" and cfg.keep < 1

    def keep_at(self, step: int) -> float:
        t = min(1.0, step / self.end)
        return self.cfg.keep + (1 - self.cfg.keep) * (1 - t) ** 3

    def __call__(self, step: int) -> None:
        if self.active and (step + 1) % self.every == 0 and step < self.end + self.every:
            for d in self.deltas:
                d.prune_to(self.keep_at(step + 1))



@torch.no_grad()
def start_from(model: nn.Module, init_state: dict[str, torch.Tensor], cfg: DeltaConfig) -> None:
    """Sets each delta to (init weight − resident weight) and BN tensors to init's, so the
    specialist starts as the init network although its delta is taken against the resident."""
    for name, d in delta_layers(model):
        d.delta.copy_(init_state[f"{name}.weight"] - model.get_submodule(name).parametrizations.weight.original)
    if cfg.bn == "adapt":
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and f"{name}.running_mean" in init_state:
                for t in BN_TENSORS:
                    getattr(m, t).copy_(init_state[f"{name}.{t}"])
