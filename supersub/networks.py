"""A trained network on disk: its weights (safetensors) and what rebuilds it (:class:`NetworkSpec`).

The one place networks are written and read, by the training tasks and by bundles alike::

    model.safetensors   every parameter and buffer, fp32 (never pickled)
    network.json        {"model": ModelConfig, "num_outputs": N, "image_size": S, "class_ids": [...]}

:func:`network_hash` (sha256 of the weights file) is what a task that starts from a network puts
in its fingerprint, so a specialist is retrained when the network under it changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from supersub.atomic import atomic_path, sha256_file, write_text
from supersub.config import from_dict, to_dict
from supersub.resnet import ModelConfig, ResNet, build_model

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "network.json"
OUTPUT_FILES = [WEIGHTS_FILE, SPEC_FILE]  # what save_network writes

__all__ = ["NetworkSpec", "load_network", "network_hash", "save_network", "save_weights", "sha256_file"]


@dataclass
class NetworkSpec:
    """What is needed to rebuild a stored network: its config, output count and input size."""

    model: ModelConfig
    num_outputs: int
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "num_outputs": self.num_outputs, "image_size": self.image_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        return cls(from_dict(ModelConfig, d["model"]), int(d["num_outputs"]), int(d["image_size"]))

    def build(self) -> ResNet:
        return build_model(self.model, self.num_outputs, self.image_size)


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Every parameter and buffer of ``model`` (unwrapped from DDP) as a safetensors file,
    written atomically (:func:`supersub.atomic.atomic_path`)."""
    while hasattr(model, "module"):
        model = model.module
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> nn.Module:
    """``state`` into ``model`` (strict: every tensor, right shapes), in eval mode; a state that
    does not fit raises ``ValueError`` naming ``name`` and the first mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ValueError(f"{name} does not fit its network spec: {first.strip()}") from None
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """A safetensors file into ``model`` (see :func:`load_state`)."""
    return load_state(model, load_file(str(path)), Path(path).name)


def save_network(model: nn.Module, spec: NetworkSpec, out_dir: str | Path, class_ids: list[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / WEIGHTS_FILE)
    write_text(out_dir / SPEC_FILE, json.dumps({**spec.to_dict(), "class_ids": class_ids}, indent=2))


def load_network(folder: str | Path, order: list[str] | None = None) -> tuple[ResNet, NetworkSpec, list[str]]:
    """A trained network (eval mode, CPU), its spec, and the ids its outputs stand for.

    ``order``: the class ids in the order the caller's hierarchy has them (a learned hierarchy
    reorders the classes); the head's rows are permuted to it, exactly."""
    folder = Path(folder)
    meta = json.loads((folder / SPEC_FILE).read_text())
    spec = NetworkSpec.from_dict(meta)
    model, ids = load_weights(spec.build(), folder / WEIGHTS_FILE), list(meta["class_ids"])
    if order is not None and list(order) != ids:
        if sorted(order) != sorted(ids):
            raise ValueError(f"{folder}: the network's {len(ids)} outputs are not the {len(order)} classes asked for")
        permute_head(model.fc, ids, list(order))
        ids = list(order)
    return model, spec, ids


def permute_head(fc: nn.Linear, old_ids: list[str], new_ids: list[str]) -> None:
    """Reorders a head's rows from one class order to another, exactly, in place."""
    index = {c: i for i, c in enumerate(old_ids)}
    order = torch.tensor([index[c] for c in new_ids])
    with torch.no_grad():
        fc.weight.copy_(fc.weight[order])
        fc.bias.copy_(fc.bias[order])


def network_hash(folder: str | Path) -> str:
    """sha256 of a stored network's weights: its identity for the tasks that start from it."""
    return sha256_file(Path(folder) / WEIGHTS_FILE)

