"""The stored form of a specialist's delta: :class:`PackedDelta`, one safetensors file.

Tensors: per delta weight ``w.<module>.positions`` (varint gaps, absent for seeded masks),
``w.<module>.codes`` (b-bit codes) and ``w.<module>.scales`` (fp32, one per output channel) or
``w.<module>.values`` (fp16 at 16 bits); ``bn.<module>.<tensor>`` (fp32) when BatchNorm adapts;
``head.weight`` / ``head.bias``. The JSON metadata (key ``supersub_delta``) holds the format,
the method, the superclass, each layer's shape, nnz and bits, and the first delta stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from supersub.delta.config import DeltaConfig
from supersub.delta.packing import encode_positions, pack_codes, symmetric_qrange
from supersub.delta.tuner import BN_TENSORS, delta_bns, delta_layers

FORMAT = "supersub.sparse_qat.v1"


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
        """Parses a delta file; anything else (another safetensors file, other bytes) is a
        ``ValueError`` that says so, never a parser's own exception."""
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            meta = json.loads(header.get("__metadata__", {}).get("supersub_delta", "{}"))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad bytes
            raise ValueError(f"not a safetensors file ({type(e).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"not a supersub delta (format {meta.get('format')!r}, expected {FORMAT})")
        return cls(tensors, meta)

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


@torch.no_grad()
def export_delta(model: nn.Module, cfg: DeltaConfig, superclass: int | None) -> PackedDelta:
    """Finalises every delta layer of a specialist and packs it (``superclass`` None: a delta over
    all classes, the ``delta_all`` control)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, d in delta_layers(model):
        d.finalize()
        ex = d.export()
        pos = ex["positions"].numpy()
        entry = {"shape": list(d.shape), "nnz": int(pos.size), "bits": d.bits}
        if d.mask_seed is not None:
            entry["seed"] = d.mask_seed  # positions are a function of (numel, nnz, seed)
        elif pos.size == int(np.prod(d.shape)):
            entry["dense"] = True  # every entry kept: positions are 0..numel-1, nothing to store
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
        for name, bn in delta_bns(model, cfg):
            for t in BN_TENSORS:
                tensors[f"bn.{name}.{t}"] = getattr(bn, t).detach().float().cpu().contiguous()
            bns.append(name)
    tensors["head.weight"] = model.fc.weight.detach().float().cpu().contiguous()
    tensors["head.bias"] = model.fc.bias.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "method": cfg.method,
        "superclass": superclass,
        "layers": layers,
        "bn": bns,
        "first_stage": cfg.first_stage,
        "config": {"keep": cfg.keep, "bits": cfg.bits, "mask": cfg.mask, "qat": cfg.qat, "sparsify": cfg.sparsify},
    }
    return PackedDelta(tensors, meta)

