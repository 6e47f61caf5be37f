"""A specialist = the frozen resident network + a sparse quantised delta + its own head.

* :func:`add_delta` turns a copy of the resident network into a trainable specialist.
* :class:`PruningSchedule` shrinks the masks during finetuning (gradual magnitude pruning).
* :func:`export_delta` packs the finalised delta into a :class:`PackedDelta` (safetensors bytes).
* :func:`materialize` + :func:`applied` put a packed delta onto the resident network in place and
  restore it exactly afterwards: serving keeps one network in memory, whatever the number of
  specialists.

BatchNorm (``DeltaConfig.bn``): base BNs outside the delta stages are always frozen in eval mode,
so a shared trunk stays identical to the resident network's. Inside the delta stages, ``frozen``
keeps the base's statistics and affine; ``adapt`` lets the specialist re-estimate statistics and
train the affine on its superclass's images, and stores all four BN tensors dense (fp32).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils import parametrize

from supersub.delta.config import DeltaConfig
from supersub.delta.layer import SparseQuantDelta
from supersub.delta.packing import (
    decode_positions,
    encode_positions,
    pack_codes,
    seeded_positions,
    symmetric_qrange,
    unpack_codes,
)
from supersub.models import STAGES, ResNet, stage_of

FORMAT = "supersub.sparse_qat.v1"
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _delta_modules(model: nn.Module, cfg: DeltaConfig) -> list[tuple[str, nn.Module]]:
    stages = {STAGES.index(s) for s in cfg.stages}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and stage_of(name) in stages
    ]


def _delta_bns(model: nn.Module, cfg: DeltaConfig) -> list[tuple[str, nn.BatchNorm2d]]:
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
        for _, bn in _delta_bns(model, cfg):
            bn.weight.requires_grad_(True)
            bn.bias.requires_grad_(True)
    model.fc = head
    for p in head.parameters():
        p.requires_grad_(True)
    return deltas


def set_train_mode(model: nn.Module, cfg: DeltaConfig) -> None:
    """``model.train()``, except the BNs that must keep the base's statistics."""
    model.train()
    adapt = {n for n, _ in _delta_bns(model, cfg)} if cfg.bn == "adapt" else set()
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


# ------------------------------------------------------------------------------ export
@dataclass
class PackedDelta:
    """A specialist's delta as stored: safetensors tensors (uint8 codes and positions, fp32
    scales, head, BN) and JSON metadata. ``to_bytes()`` is exactly the file that is written."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def to_bytes(self) -> bytes:
        return st_save(self.tensors, metadata={"supersub_delta": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> PackedDelta:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("supersub_delta", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a supersub delta (format {meta.get('format')!r}, expected {FORMAT})")
        return cls(tensors, meta)

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


@torch.no_grad()
def export_delta(model: nn.Module, cfg: DeltaConfig, superclass: int) -> PackedDelta:
    """Finalises every delta layer of a specialist and packs it."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, d in delta_layers(model):
        d.finalize()
        ex = d.export()
        pos = ex["positions"].numpy()
        entry = {"shape": list(d.shape), "nnz": int(pos.size), "bits": d.bits}
        if d.mask_seed is not None:
            entry["seed"] = d.mask_seed  # positions are a function of (numel, nnz, seed)
        else:
            tensors[f"w.{name}.positions"] = torch.from_numpy(encode_positions(pos))
        if d.bits == 16:
            tensors[f"w.{name}.values"] = ex["values"].contiguous()
        else:
            qmin, _ = symmetric_qrange(d.bits)
            codes = (ex["q"].numpy() - qmin).astype(np.uint16)
            tensors[f"w.{name}.codes"] = torch.from_numpy(pack_codes(codes, d.bits))
            tensors[f"w.{name}.scales"] = ex["scales"].float().contiguous()
        layers[name] = entry
    bns = []
    if cfg.bn == "adapt":
        for name, bn in _delta_bns(model, cfg):
            for t in _BN_TENSORS:
                tensors[f"bn.{name}.{t}"] = getattr(bn, t).detach().float().cpu().contiguous()
            bns.append(name)
    tensors["head.weight"] = model.fc.weight.detach().float().cpu().contiguous()
    tensors["head.bias"] = model.fc.bias.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "superclass": superclass,
        "layers": layers,
        "bn": bns,
        "first_stage": cfg.first_stage,
        "config": {"keep": cfg.keep, "bits": cfg.bits, "mask": cfg.mask, "qat": cfg.qat, "sparsify": cfg.sparsify},
    }
    return PackedDelta(tensors, meta)


# ------------------------------------------------------------------------------ apply
@dataclass(eq=False)  # holds tensors: identity, not value, equality
class MaterializedDelta:
    """A packed delta decoded for one device: flat positions and fp32 values per weight."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bn: dict[str, dict[str, torch.Tensor]]
    head: nn.Linear
    first_stage: int
    nbytes: int = field(default=0)


def materialize(packed: PackedDelta, device: torch.device | str = "cpu") -> MaterializedDelta:
    t = packed.tensors
    weights = {}
    for name, entry in packed.meta["layers"].items():
        numel, nnz, bits = int(np.prod(entry["shape"])), entry["nnz"], entry["bits"]
        if "seed" in entry:
            pos = seeded_positions(numel, nnz, entry["seed"])
        else:
            pos = decode_positions(t[f"w.{name}.positions"].numpy())
        pos_t = torch.from_numpy(pos)
        if bits == 16:
            values = t[f"w.{name}.values"].float()
        else:
            qmin, _ = symmetric_qrange(bits)
            q = torch.from_numpy(unpack_codes(t[f"w.{name}.codes"].numpy(), bits, nnz) + qmin)
            fan = numel // entry["shape"][0]
            values = q.float() * t[f"w.{name}.scales"][pos_t // fan]  # the forward's q * s, exactly
        weights[name] = (pos_t.to(device), values.to(device))
    bn = {n: {k: t[f"bn.{n}.{k}"].to(device) for k in _BN_TENSORS} for n in packed.meta["bn"]}
    w = t["head.weight"]
    head = nn.Linear(w.shape[1], w.shape[0]).to(device)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(t["head.bias"])
    head.eval()
    nbytes = sum(p.numel() * 8 + v.numel() * 4 for p, v in weights.values())
    nbytes += sum(x.numel() * 4 for d in bn.values() for x in d.values()) + w.numel() * 4
    return MaterializedDelta(weights, bn, head, packed.meta["first_stage"], nbytes)


@contextlib.contextmanager
def applied(model: nn.Module, delta: MaterializedDelta) -> Iterator[nn.Linear]:
    """Adds ``delta`` to ``model``'s weights in place (and swaps in its BN tensors), yields the
    specialist head, and restores the exact original values on exit (saved entries, not a
    subtraction: ``(w + d) - d`` is not always ``w`` in floating point)."""
    modules = dict(model.named_modules())
    saved_w, saved_bn = [], []
    try:
        with torch.no_grad():
            for name, (pos, values) in delta.weights.items():
                flat = modules[name].weight.view(-1)
                saved_w.append((flat, pos, flat[pos].clone()))
                flat[pos] = flat[pos] + values
            for name, tensors in delta.bn.items():
                bn = modules[name]
                saved_bn.append((bn, {k: getattr(bn, k).clone() for k in _BN_TENSORS}))
                for k, v in tensors.items():
                    getattr(bn, k).copy_(v)
        yield delta.head
    finally:
        with torch.no_grad():
            for flat, pos, orig in saved_w:
                flat[pos] = orig
            for bn, orig in saved_bn:
                for k, v in orig.items():
                    getattr(bn, k).copy_(v)
