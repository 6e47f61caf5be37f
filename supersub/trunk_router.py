"""The trunk router: stage one on the shared trunk, so the two-stage model costs about one network.

With the vanilla network resident, stage one is its whole forward (superclass = sum of its
subclass probabilities) and every specialist pass comes on top: at least 1.23 networks of FLOPs
with deltas on ``layer4`` alone. The designs that win in this field route on the shared
early layers instead — Network of Experts (Ahmed, Baig and Torresani, ECCV 2016) and HD-CNN (Yan
et al., ICCV 2015) — and run only the routed expert's tail. Here:

* **stage one** = the resident's stages before the first delta stage (the *trunk*, run once)
  + :class:`TrunkRouter`, a small superclass head on the trunk's feature map;
* **stage two** = only the routed specialist's tail (resident tail + its delta) and head.

Hard routing then costs one network of FLOPs (the specialist's head has fewer rows than the
vanilla one's) plus the router head; soft routing adds a tail for each extra superclass an unsure
image goes to. The router head is trained on the frozen trunk
(:class:`supersub.tasks.RouterTask`), so the trunk stays the resident's own, bit for bit, and
the specialists are the same deltas as with any vanilla resident.

``generalist.router_trunk=finetune`` is the Network-of-Experts order instead: the whole vanilla
network is finetuned with the router as a second head (:class:`MultitaskTrunk`: fine CE + superclass
CE on the router), so the trunk learns features that route; that finetuned network is then the
resident every specialist's delta is taken against. It costs a network's training for the
router's epochs, which the equal-images controls are given too.

``generalist.router_trunk=joint`` goes the whole way (:class:`JointExperts`): trunk, router and
every expert's delta train together, for the specialists' epochs and images, each image through
the router and its own superclass's expert on the same trunk features (the experts then shape the
trunk, as Network of Experts trains end to end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from supersub.resnet import STAGES, ResNet, stage_of

ROUTER_FILE = "router.safetensors"


@dataclass
class RouterSpec:
    """What rebuilds a stored router: where it reads the trunk, its widths, its outputs."""

    first_stage: int  # the trunk is stages 0 .. first_stage-1 (the first delta stage is first_stage)
    in_channels: int  # channels of the trunk's feature map
    channels: int  # channels of the router's own conv (0: a linear head on the pooled trunk)
    num_superclasses: int

    def to_dict(self) -> dict[str, Any]:
        return {"first_stage": self.first_stage, "in_channels": self.in_channels, "channels": self.channels,
                "num_superclasses": self.num_superclasses}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterSpec:
        spec = cls(int(d["first_stage"]), int(d["in_channels"]), int(d["channels"]), int(d["num_superclasses"]))
        if not 1 <= spec.first_stage < len(STAGES) or spec.in_channels < 1 or spec.channels < 0 or spec.num_superclasses < 1:
            raise ValueError(f"router spec out of range: {spec.to_dict()}")
        return spec

    def build(self) -> TrunkRouter:
        return TrunkRouter(self.in_channels, self.channels, self.num_superclasses)


class TrunkRouter(nn.Module):
    """Superclass logits ``[B, S]`` from trunk features ``[B, C, H, W]``.

    One 3×3 stride-2 conv (BN, ReLU) before pooling: a linear probe on pooled early features
    routes poorly, and a conv at half the next stage's resolution costs a few percent of a
    network (``channels=0`` gives the linear probe, for comparison)."""

    def __init__(self, in_channels: int, channels: int, num_superclasses: int) -> None:
        super().__init__()
        if channels > 0:
            self.conv = nn.Sequential(
                nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
        else:
            self.conv = nn.Identity()
        self.fc = nn.Linear(channels or in_channels, num_superclasses)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(trunk), 1), 1))


def trunk_channels(base: ResNet, first_stage: int, image_size: int) -> int:
    """Channels of ``base``'s trunk output (stages before ``first_stage``)."""
    with torch.no_grad():
        x = torch.zeros(1, 3, image_size, image_size)
        return int(base.eval().forward_stages(x, 0, first_stage).shape[1])


def router_spec(base: ResNet, first_stage: int, image_size: int, width: float, num_superclasses: int) -> RouterSpec:
    """The spec of a router on ``base``'s trunk; ``width`` × the trunk's channels (rounded to 8)."""
    if first_stage < 1:
        raise ValueError("a trunk router needs a trunk: delta.stages must leave out the stem (e.g. [layer4])")
    c = trunk_channels(base, first_stage, image_size)
    channels = 0 if width <= 0 else max(8, int(round(c * width / 8)) * 8)
    return RouterSpec(first_stage, c, channels, num_superclasses)


class RoutedTrunk(nn.Module):
    """For training the router: the resident's trunk, frozen (eval mode, no gradients), then the
    router head. ``train()`` only ever puts the head in training mode, so the trunk's BatchNorm
    statistics stay the resident's own."""

    def __init__(self, base: ResNet, router: TrunkRouter, first_stage: int) -> None:
        super().__init__()
        self.base, self.router, self.first_stage = base, router, first_stage
        for p in self.base.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> RoutedTrunk:
        super().train(mode)
        self.base.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            trunk = self.base.forward_stages(x, 0, self.first_stage)
        return self.router(trunk)


class MultitaskTrunk(nn.Module):
    """For finetuning trunk and router together: the whole resident network trains on its fine
    labels while the router, reading the same trunk features, trains on the superclass labels.
    ``forward`` returns the fine logits (what :func:`supersub.fit.fit` scores); the router's
    logits of the same batch are kept in :attr:`router_logits` for the loss."""

    def __init__(self, base: ResNet, router: TrunkRouter, first_stage: int) -> None:
        super().__init__()
        self.base, self.router, self.first_stage = base, router, first_stage
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.base.forward_stages(x, 0, self.first_stage)
        self.router_logits = self.router(trunk)
        return self.base.forward_head(self.base.forward_stages(trunk, self.first_stage))


class JointExperts(nn.Module):
    """For training trunk, router and experts together: one trunk forward per batch feeds the
    router, every image's expert (resident tail + its delta + its head, a specialist built by
    :func:`supersub.delta.add_delta`) and the resident's own tail and head.

    Trainable: the trunk (``lr_scale`` on its parameters: it is finetuned, the heads are fresh),
    the router, each expert's delta, head and adapted BatchNorms. The resident's tail and head stay
    frozen, so they are still the base every delta is taken against; the resident's own answer
    (what ``forward`` returns, scored by :func:`supersub.fit.fit`) trains the trunk to keep it a
    working network. The experts run in the loss (they need the labels to route): ``forward``
    keeps the trunk features in :attr:`trunk`. The experts' own copies of the trunk stages are
    never run."""

    def __init__(self, base: ResNet, router: TrunkRouter, experts: list[ResNet], first_stage: int,
                 train_mode, trunk_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.base, self.router, self.experts, self.first_stage = base, router, nn.ModuleList(experts), first_stage
        self._expert_train_mode = train_mode  # supersub.delta.set_train_mode with the delta config
        self.trunk: torch.Tensor | None = None
        for name, p in base.named_parameters():
            in_trunk = stage_of(name) < first_stage
            p.requires_grad_(in_trunk)
            if in_trunk:
                p.lr_scale = trunk_lr_scale

    def train(self, mode: bool = True) -> JointExperts:
        super().train(mode)
        if mode:
            for name, m in self.base.named_children():
                if stage_of(name) >= self.first_stage:
                    m.eval()  # the resident's tail keeps its statistics: the experts' base
            for expert in self.experts:
                self._expert_train_mode(expert)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trunk = self.base.forward_stages(x, 0, self.first_stage)
        return self.base.forward_head(self.base.forward_stages(self.trunk, self.first_stage))

    def expert(self, s: int, trunk: torch.Tensor) -> torch.Tensor:
        """Expert ``s``'s logits on trunk features."""
        e = self.experts[s]
        return e.forward_head(e.forward_stages(trunk, self.first_stage))
