"""Specialist deltas, PEFT-like: one small module per concern.

* ``config.py`` — :class:`DeltaConfig` (what a delta is: stages, sparsity, bits, training);
* ``layer.py`` — :class:`SparseQuantDelta`, one weight's ``W0 + Q_b(D ⊙ M)``;
* ``tuner.py`` — attaching deltas to a specialist, pruning schedule, fisher masks;
* ``format.py`` — :class:`PackedDelta`, the stored file, and :func:`export_delta`;
* ``apply.py`` — decoding a stored delta and computing with it (the reference);
* ``compact.py`` — a stored delta held for serving in about its stored bytes, decoded per use;
* ``packing.py`` — bytes: b-bit codes, varint positions, seeded positions.

A delta *method* is what a specialist task calls through :func:`get_method` (the config's
``delta.method``, validated against :data:`METHODS`): ``attach`` (make a copy of the resident
network trainable), ``schedule`` (a hook run after every optimiser step), ``export`` (the trained
delta as a :class:`PackedDelta`), ``materialize`` (a stored delta decoded for a device, per
weight) and ``compact`` (a stored delta held on the predictor's device over its
:class:`FlatLayout`, with a ``decode()`` to positions + values of the layout). The predictor
only needs what ``compact`` returns, so a new method that decodes to positions + values
(low-rank, block-sparse, ...) plugs in by registering one object here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from supersub.delta.apply import MaterializedDelta, applied, materialize
from supersub.delta.compact import CompactDelta, DecodedDelta, FlatLayout
from supersub.delta.config import DeltaConfig
from supersub.delta.format import PackedDelta, export_delta
from supersub.delta.layer import SparseQuantDelta
from supersub.delta.tuner import (
    PruningSchedule,
    add_delta,
    choose_fisher_masks,
    delta_layers,
    set_train_mode,
    start_from,
)


class DeltaMethod(Protocol):
    """What a specialist task needs from a delta method."""

    name: str

    def attach(self, model: nn.Module, cfg: DeltaConfig, head: nn.Linear) -> list[nn.Module]: ...

    def schedule(self, layers: list[nn.Module], cfg: DeltaConfig, total_steps: int) -> Callable[[int], None]: ...

    def export(self, model: nn.Module, cfg: DeltaConfig, superclass: int | None) -> PackedDelta: ...

    def materialize(self, packed: PackedDelta, device: torch.device | str) -> MaterializedDelta: ...

    def compact(self, packed: PackedDelta, layout: FlatLayout, device: torch.device | str) -> CompactDelta: ...


@dataclass(frozen=True)
class SparseQAT:
    """Sparse + quantisation-aware deltas (the paper's idea): gradual magnitude, fisher or seeded
    random masks; b-bit symmetric per-channel codes trained with straight-through gradients."""

    name: str = "sparse_qat"

    def attach(self, model, cfg, head):
        return add_delta(model, cfg, head)

    def schedule(self, layers, cfg, total_steps):
        return PruningSchedule(layers, cfg, total_steps)

    def export(self, model, cfg, superclass):
        return export_delta(model, cfg, superclass)

    def materialize(self, packed, device):
        return materialize(packed, device)

    def compact(self, packed, layout, device):
        return CompactDelta(packed, layout, device)


METHODS: dict[str, DeltaMethod] = {m.name: m for m in (SparseQAT(),)}


def get_method(name: str) -> DeltaMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown delta method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = [
    "METHODS",
    "CompactDelta",
    "DecodedDelta",
    "DeltaConfig",
    "DeltaMethod",
    "FlatLayout",
    "MaterializedDelta",
    "PackedDelta",
    "PruningSchedule",
    "SparseQAT",
    "SparseQuantDelta",
    "add_delta",
    "applied",
    "choose_fisher_masks",
    "delta_layers",
    "export_delta",
    "get_method",
    "materialize",
    "set_train_mode",
    "start_from",
]
