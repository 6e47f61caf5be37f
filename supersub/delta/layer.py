"""One weight's sparse, quantised delta: ``W = W0 + Q_b(D ⊙ M)``.

It is registered as a ``torch.nn.utils.parametrize`` parametrisation of a conv or linear
``weight``, so the module keeps its type and ``W0`` (the resident network's weight) stays frozen
as ``parametrizations.weight.original``; only ``D`` trains.

* ``M`` (``mask``) is a fixed-size boolean buffer: all ones at first for gradual magnitude
  pruning, shrunk by :meth:`prune_to`; or a seeded random set fixed from the start.
* ``Q_b`` is symmetric per-output-channel fake quantisation (``torch.fake_quantize_per_channel_affine``,
  whose backward is the straight-through estimator), with the scale taken from the current
  delta: ``s_c = max|D_c ⊙ M_c| / (2**(b-1) - 1)``. 16 bits means fp16 values (no scale).
* The exported codes are computed from exactly this forward, so base + unpacked delta reproduces
  the finetuned network bit for bit (see ``tests/test_delta.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from supersub.delta.packing import seeded_positions, symmetric_qrange


class SparseQuantDelta(nn.Module):
    def __init__(self, shape: torch.Size, bits: int, quantize: bool, mask_seed: int | None, keep: float) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.bits = bits
        # quantize=False trains a float delta (no QAT); finalize() turns quantisation on for export.
        self.quantize = quantize
        self.delta = nn.Parameter(torch.zeros(shape))
        numel = int(np.prod(shape))
        self.k_final = max(1, round(keep * numel))
        mask = torch.ones(numel, dtype=torch.bool)
        self.mask_seed = mask_seed
        self.fixed = mask_seed is not None  # a fixed mask is never pruned
        if mask_seed is not None:  # fixed random positions, chosen before training
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[torch.from_numpy(seeded_positions(numel, self.k_final, mask_seed))] = True
        self.register_buffer("mask", mask.view(shape))

    # ------------------------------------------------------------------ forward
    def scales(self, masked: torch.Tensor) -> torch.Tensor:
        """Per-output-channel scales ``[out]`` (float32) for the current masked delta."""
        _, qmax = symmetric_qrange(self.bits)
        amax = masked.detach().abs().flatten(1).amax(1).float()
        return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))

    def get_delta_weight(self) -> torch.Tensor:
        """The dense delta that is added to the frozen weight (same shape as the weight)."""
        masked = self.delta * self.mask
        if not self.quantize:
            return masked
        if self.bits == 16:
            # Round to fp16 with a straight-through gradient.
            return masked + (masked.half().float() - masked).detach()
        qmin, qmax = symmetric_qrange(self.bits)
        scale = self.scales(masked)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(masked.float(), scale, zero, 0, qmin, qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.get_delta_weight().to(weight.dtype)

    # ------------------------------------------------------------------ sparsity
    @torch.no_grad()
    def prune_to(self, keep_fraction: float) -> None:
        """Shrinks the mask to the ``keep_fraction`` largest-magnitude entries of the current delta
        (never re-growing pruned ones). Ties break by position, so every DDP rank agrees."""
        if self.fixed:
            return
        numel = self.mask.numel()
        k = max(self.k_final, min(numel, round(keep_fraction * numel)))
        if k >= int(self.mask.sum()):
            return
        score = (self.delta.abs() * self.mask).flatten().float()
        score[~self.mask.flatten()] = -1.0  # pruned entries never come back
        idx = torch.topk(score, k, sorted=False).indices
        new = torch.zeros(numel, dtype=torch.bool, device=self.mask.device)
        new[idx] = True
        self.mask.copy_(new.view(self.shape))
        self.delta.mul_(self.mask)  # pruned values are gone, not just hidden

    @torch.no_grad()
    def fix_mask(self, scores: torch.Tensor) -> None:
        """Fixes the mask to the ``k_final`` entries with the largest ``scores`` (same shape)."""
        idx = torch.topk(scores.flatten().float(), self.k_final, sorted=False).indices
        new = torch.zeros(self.mask.numel(), dtype=torch.bool, device=self.mask.device)
        new[idx] = True
        self.mask.copy_(new.view(self.shape))
        self.delta.mul_(self.mask)
        self.fixed = True

    @torch.no_grad()
    def finalize(self) -> None:
        """Reaches the final sparsity (``post`` pruning) and turns quantisation on: from here the
        forward is exactly what the exported delta reproduces."""
        self.prune_to(0.0)
        self.quantize = True

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor | np.ndarray | int]:
        """Positions (flat, sorted), integer values and scales of the finalised delta."""
        if not self.quantize:
            raise RuntimeError("finalize() the delta before exporting it")
        positions = self.mask.flatten().nonzero().flatten().cpu()
        dense = self.get_delta_weight().detach().float().cpu()
        if self.bits == 16:
            return {"positions": positions, "values": dense.flatten()[positions].half()}
        scale = self.scales(self.delta * self.mask).cpu()  # the forward's own scales
        per_entry = scale[positions // int(np.prod(self.shape[1:]))]
        q = torch.round(dense.flatten()[positions] / per_entry).to(torch.int64)
        return {"positions": positions, "q": q, "scales": scale}
