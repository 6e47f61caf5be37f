"""Configuration of a specialist's delta: which weights, how sparse, how many bits, and how trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from supersub.config import field

SUPPORTED_BITS = (2, 3, 4, 8, 16)


@dataclass
class DeltaConfig:
    # Checked against the registry (supersub.delta.METHODS) by the config that holds this one: the
    # registry's modules import this one.
    method: str = field("sparse_qat", help="delta method, one of supersub.delta.METHODS (sparse_qat)")
    stages: list[str] = field(
        default_factory=lambda: ["stem", "layer1", "layer2", "layer3", "layer4"],
        help="backbone stages whose conv weights get a delta; leaving out early stages gives a shared trunk "
        "(they run once for generalist and specialist)",
    )
    keep: float = field(0.05, help="fraction of each weight's entries that the delta may change (0 < keep <= 1)")
    bits: int = field(
        4, help="bits per stored delta value: 2, 3, 4 or 8 (symmetric, per-output-channel scales), 16 = fp16"
    )
    qat: bool = field(
        True,
        help="fake-quantise the delta during finetuning (straight-through gradients); false quantises only at export",
    )
    sparsify: Literal["gradual", "post"] = field(
        "gradual",
        help="gradual: magnitude pruning towards `keep` during finetuning (Zhu & Gupta 2017); "
        "post: finetune a dense delta, prune once at export",
    )
    mask: Literal["magnitude", "fisher", "random"] = field(
        "magnitude",
        help="magnitude: gradual pruning by |delta| (positions stored, ~1 byte each); fisher: fixed before "
        "finetuning by the largest squared gradients (Sung et al. 2021, positions stored); random: fixed "
        "positions from a seed (SHiRA-style, nothing stored but the seed)",
    )
    fisher_batches: int = field(16, help="batches whose squared gradients choose a fisher mask")
    prune_end: float = field(0.6, help="fraction of the finetuning steps by which `keep` is reached (gradual)")
    prune_updates: int = field(20, help="number of mask updates between the start and prune_end (gradual)")
    bn: Literal["frozen", "adapt"] = field(
        "adapt",
        help="BatchNorm in delta stages: frozen (eval mode, the base's statistics) or adapt (own statistics "
        "and affine, stored dense in the delta; ~0.2% of a ResNet-18)",
    )
    seed: int = field(0, help="seed of random masks")

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"delta.keep must be in (0, 1], got {self.keep}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"delta.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not 0 < self.prune_end <= 1:
            raise ValueError(f"delta.prune_end must be in (0, 1], got {self.prune_end}")
        if self.prune_updates < 1:
            raise ValueError("delta.prune_updates must be at least 1")
        if self.sparsify == "post" and self.mask != "magnitude":
            raise ValueError(f"delta.mask={self.mask} fixes positions before training; it cannot be combined with sparsify=post")
        from supersub.resnet import STAGES

        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"delta.stages must be a non-empty subset of {list(STAGES)}, got {self.stages}")

    @property
    def first_stage(self) -> int:
        """Index of the earliest stage with a delta: stages before it form the shared trunk."""
        from supersub.resnet import STAGES

        return min(STAGES.index(s) for s in self.stages)
