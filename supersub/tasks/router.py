"""Training the trunk router (``generalist.kind=trunk_router``): a small superclass head on the
resident network's frozen trunk (see :mod:`supersub.router`). It writes ``router.safetensors``
and ``router.json`` (its :class:`~supersub.router.RouterSpec`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from supersub import atomic
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec
from supersub.fit import fit, peak_lr, summary
from supersub.metrics import superclass_probs
from supersub.networks import load_network, load_weights, save_weights
from supersub.router import ROUTER_FILE, RoutedTrunk, RouterSpec, TrunkRouter, router_spec
from supersub.tasks.base import DataOptions, Task, optim_identity, register, runner_identity
from supersub.train import OptimConfig, seed_everything

SPEC_FILE = "router.json"


@register
@dataclass
class RouterTask(Task):
    kind: ClassVar[str] = "router"
    resources: ClassVar[str] = "specialist"  # a head's worth of training: runs beside the specialists

    resident_dir: str  # the network whose trunk the router reads (frozen)
    first_stage: int  # the trunk: stages before the first delta stage
    width: float  # router conv channels, as a fraction of the trunk's (0: linear probe)
    optim: OptimConfig
    data: DataOptions
    out_dir: str
    seed: int = 0
    inputs: dict[str, str | None] = field(default_factory=dict)  # sha256 of the resident's weights
    distill: float = 0.0  # weight of distillation from the resident's own superclass answer
    distill_temperature: float = 2.0
    runner: str = "ray"  # which runner trains it: see runner_identity

    @property
    def name(self) -> str:
        return "router" if self.seed == 0 else f"router_seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        return {"first_stage": self.first_stage, "width": self.width, "optim": optim_identity(self.optim),
                "data": self.data.identity(), "seed": self.seed, "inputs": dict(sorted(self.inputs.items())),
                **({"distill": self.distill, "distill_temperature": self.distill_temperature} if self.distill else {}),
                **runner_identity(self.runner)}

    def distill_loss(self, base, hierarchy, label_smoothing: float):
        """``(1 - λ) CE + λ T² KL(teacher ‖ router)``: the teacher is the resident network's own
        superclass answer (its subclass probabilities summed), which routes better than a head
        on its trunk learns to from labels alone. Its forward costs one network an image."""
        lam, T = self.distill, self.distill_temperature

        def loss(logits, y, x):
            with torch.no_grad():
                fine = torch.softmax(base(x).float() / T, 1)
                target = superclass_probs(fine, hierarchy)
            kd = F.kl_div(F.log_softmax(logits / T, 1), target, reduction="batchmean") * T * T
            return (1 - lam) * F.cross_entropy(logits, y, label_smoothing=label_smoothing) + lam * kd

        return loss

    def loader_specs(self) -> dict[str, LoaderSpec]:
        bs = self.optim.batch_size
        return {"train": LoaderSpec("train", "coarse", True, bs, seed=self.seed),
                "val": LoaderSpec("val", "coarse", False, bs * 2, seed=self.seed)}

    def run(self, ctx) -> dict[str, Any]:
        out_dir = Path(self.out_dir)
        t0 = time.perf_counter()
        seed_everything(self.seed * 7919 + 7883)
        manifest = load_manifest(self.data.manifest_dir)
        h = manifest.hierarchy
        base, _, _ = load_network(self.resident_dir)
        spec = router_spec(base, self.first_stage, self.data.image_size, self.width, h.num_superclasses)
        router = spec.build()
        model = RoutedTrunk(base, router, self.first_stage).to(ctx.device)
        specs = self.loader_specs()
        train, val = self.loader(ctx, manifest, specs["train"]), self.loader(ctx, manifest, specs["val"])
        loss_hook = self.distill_loss(base, h, self.optim.label_smoothing) if self.distill > 0 else None
        history = fit(model, train, val, self.optim, ctx, out_dir, self.name, loss_hook=loss_hook)
        result = {"name": self.name, "peak_lr": peak_lr(self.optim, ctx.world_size),
                  **summary(history, time.perf_counter() - t0), "router": spec.to_dict()}
        result["val_acc"] = history[-1]["val_acc"] if history else float("nan")  # superclass accuracy on val
        if self.distill > 0:  # the teacher's forward passes: training compute beside train_images
            result["teacher_images"] = result["train_images"]
        if ctx.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_weights(router, out_dir / ROUTER_FILE)
            atomic.write_text(out_dir / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
            self.write_result(result, [ROUTER_FILE, SPEC_FILE])
        return result


def load_router(folder: str | Path) -> tuple[TrunkRouter, RouterSpec]:
    """A trained router (eval mode, CPU) and its spec, from a router task's folder."""
    folder = Path(folder)
    spec = RouterSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    return load_weights(spec.build(), folder / ROUTER_FILE), spec
