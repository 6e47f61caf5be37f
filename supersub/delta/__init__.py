"""Specialist deltas, PEFT-like: ``config.py`` (what), ``layer.py`` (one weight), ``model.py``
(a whole specialist: attach, prune, export, apply), ``packing.py`` (bytes).

Methods are looked up by name in :data:`METHODS`; ``sparse_qat`` is the one the paper's idea
needs (sparse + quantisation-aware). A new method registers its ``add_delta``/``export_delta``.
"""

from supersub.delta.config import DeltaConfig
from supersub.delta.layer import SparseQuantDelta
from supersub.delta.model import (
    MaterializedDelta,
    PackedDelta,
    PruningSchedule,
    add_delta,
    applied,
    choose_fisher_masks,
    delta_layers,
    export_delta,
    materialize,
    set_train_mode,
)

METHODS = {"sparse_qat": (add_delta, export_delta)}


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown delta method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = [
    "DeltaConfig",
    "MaterializedDelta",
    "PackedDelta",
    "PruningSchedule",
    "SparseQuantDelta",
    "add_delta",
    "applied",
    "choose_fisher_masks",
    "delta_layers",
    "export_delta",
    "get_method",
    "materialize",
    "set_train_mode",
]
