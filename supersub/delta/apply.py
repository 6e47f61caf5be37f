"""Using a stored delta: decode it once (:func:`materialize`: flat positions and fp32 values per
weight), then put it onto a network in place and take it off again exactly (:func:`applied`:
the reference that :class:`supersub.predictor.TwoStagePredictor` is tested against, bit for bit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from supersub.delta.format import PackedDelta
from supersub.delta.packing import layer_positions, symmetric_qrange, unpack_codes
from supersub.delta.tuner import BN_TENSORS


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
        pos = layer_positions(t, name, entry)
        pos_t = torch.from_numpy(pos)
        if bits == 16:
            values = t[f"w.{name}.values"].float()
        else:
            qmin, _ = symmetric_qrange(bits)
            q = torch.from_numpy(unpack_codes(t[f"w.{name}.codes"].numpy(), bits, nnz) + qmin)
            fan = numel // entry["shape"][0]
            values = q.float() * t[f"w.{name}.scales"][pos_t // fan]  # the forward's q * s, exactly
        weights[name] = (pos_t.to(device), values.to(device))
    bn = {n: {k: t[f"bn.{n}.{k}"].to(device) for k in BN_TENSORS} for n in packed.meta["bn"]}
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
                saved_bn.append((bn, {k: getattr(bn, k).clone() for k in BN_TENSORS}))
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

