"""ResNet backbones by name, with a width multiplier, a depth choice and a small-input stem.

The network is torchvision's ResNet (its ``BasicBlock``/``Bottleneck`` blocks and parameter
names: ``conv1``, ``bn1``, ``layer1``…``layer4``, ``fc``), rebuilt so that widths and blocks per
stage are options: the framework has to be compared against "just make the vanilla network
wider or deeper". It is also cut into named stages so that a two-stage predictor can run the
early stages once and share them between generalist and specialist (the *shared trunk*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from supersub.config import field

# name → (block, blocks per stage). resnet10 is the light variant used on CPU and in tests.
BACKBONES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


@dataclass
class ModelConfig:
    backbone: str = field("resnet18", help=f"backbone name: one of {', '.join(BACKBONES)}")
    width: float = field(1.0, help="width multiplier on every stage's channels (1.0 = torchvision's widths)")
    depths: list[int] | None = field(
        None, help="blocks per stage, overriding the backbone's (e.g. [2, 2, 2, 2]); null keeps them"
    )
    stem: Literal["imagenet", "small", "auto"] = field(
        "auto",
        help="imagenet: 7x7/2 conv + max-pool (224 px inputs); small: 3x3/1 conv, no pool (32-64 px); "
        "auto: small below 96 px",
    )
    zero_init_residual: bool = field(True, help="zero the last BN of each block (He et al. 2019 'bag of tricks')")

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not 0.05 <= self.width <= 8:
            raise ValueError(f"width multiplier {self.width} is out of range [0.05, 8]")
        if self.depths is not None and (len(self.depths) != 4 or min(self.depths) < 1):
            raise ValueError(f"depths must be four positive block counts, got {self.depths}")


def _channels(base: int, width: float) -> int:
    # Round to a multiple of 8 (tensor-core friendly), never below 8.
    return max(8, int(round(base * width / 8)) * 8)


class ResNet(nn.Module):
    """torchvision's ResNet with configurable widths, depths and stem, cut into :data:`STAGES`.

    ``forward(x)``: images ``[B, 3, H, W]`` → logits ``[B, num_classes]``.
    ``forward_stages(h, start, end)`` runs stages ``start..end-1`` (0 = stem … 4 = layer4);
    ``forward_head(h)`` pools the output of layer4 and applies ``fc``.
    """

    def __init__(
        self,
        block: type[nn.Module],
        depths: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
        small_stem: bool = False,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        widths = [_channels(c, width) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], depths[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], depths[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], depths[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[3] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if i == 0:
            return self.maxpool(self.relu(self.bn1(self.conv1(h))))
        return getattr(self, STAGES[i])(h)

    def forward_stages(self, h: torch.Tensor, start: int = 0, end: int = len(STAGES)) -> torch.Tensor:
        for i in range(start, end):
            h = self._stage(i, h)
        return h

    def forward_head(self, h: torch.Tensor, fc: nn.Module | None = None) -> torch.Tensor:
        return (fc or self.fc)(torch.flatten(self.avgpool(h), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x))

    def forward_stages_with(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        weights: dict[str, torch.Tensor],
        bn: dict[str, dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """:meth:`forward_stages` (eval mode) with some conv weights and BatchNorm tensors given
        by module name instead of the module's own — the module is not touched, so threads may
        share it. Same ops, same order as the modules' own forward: bit for bit equal results."""

        def conv(name: str, m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, weights.get(name, m.weight), m.bias, m.stride, m.padding, m.dilation, m.groups)

        def norm(name: str, m: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
            t = bn.get(name)
            if t is None:
                return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            return F.batch_norm(x, t["running_mean"], t["running_var"], t["weight"], t["bias"], False, 0.0, m.eps)

        def block(prefix: str, b: nn.Module, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(norm(f"{prefix}.bn1", b.bn1, conv(f"{prefix}.conv1", b.conv1, x)))
            out = norm(f"{prefix}.bn2", b.bn2, conv(f"{prefix}.conv2", b.conv2, out))
            if isinstance(b, Bottleneck):
                out = norm(f"{prefix}.bn3", b.bn3, conv(f"{prefix}.conv3", b.conv3, F.relu(out)))
            identity = x
            if b.downsample is not None:
                ds = b.downsample
                identity = norm(f"{prefix}.downsample.1", ds[1], conv(f"{prefix}.downsample.0", ds[0], x))
            return F.relu(out + identity)

        for i in range(start, end):
            if i == 0:
                h = self.maxpool(F.relu(norm("bn1", self.bn1, conv("conv1", self.conv1, h))))
                continue
            name = STAGES[i]
            for j, b in enumerate(getattr(self, name)):
                h = block(f"{name}.{j}", b, h)
        return h


def stage_of(param_name: str) -> int:
    """Index in :data:`STAGES` of the stage a parameter or module name belongs to (fc → 5)."""
    top = param_name.split(".")[0]
    if top in ("conv1", "bn1"):
        return 0
    if top.startswith("layer"):
        return int(top[5:])
    return len(STAGES)


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> ResNet:
    block, depths = BACKBONES[cfg.backbone]
    small = cfg.stem == "small" or (cfg.stem == "auto" and image_size < 96)
    return ResNet(
        block,
        tuple(cfg.depths) if cfg.depths else depths,
        num_classes,
        width=cfg.width,
        small_stem=small,
        zero_init_residual=cfg.zero_init_residual,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at its dtype: the size of one stored network."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
