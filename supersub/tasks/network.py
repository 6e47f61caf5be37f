"""Training one network from scratch: the vanilla network (all subclasses), the paper's generalist
(superclasses), and the baselines (wider, longer-trained, other seeds)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from supersub.config import to_dict
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec
from supersub.epoch import OptimConfig, seed_everything
from supersub.fit import fit, peak_lr, summary
from supersub.networks import OUTPUT_FILES, NetworkSpec, save_network
from supersub.resnet import ModelConfig
from supersub.tasks.base import DataOptions, Task, optim_identity, register, runner_identity


@register
@dataclass
class NetworkTask(Task):
    kind: ClassVar[str] = "network"

    role: str  # what the network is for: vanilla, generalist, vanilla_scaled, vanilla_long
    target: Literal["fine", "coarse"]
    model: ModelConfig
    optim: OptimConfig
    data: DataOptions
    out_dir: str
    seed: int = 0  # initialisation and data order
    train_images: int | None = None  # a budget in images instead of optim.epochs (equal-compute controls)
    runner: str = "ray"  # which runner trains it: see runner_identity

    @property
    def name(self) -> str:
        return self.role if self.seed == 0 else f"{self.role}_seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        # The role is a name only: the vanilla network of seed 1 *is* the second member of seed 0's
        # ensemble, and is trained once.
        return {"target": self.target, "model": to_dict(self.model), "optim": optim_identity(self.optim),
                "data": self.data.identity(), "seed": self.seed, "train_images": self.train_images,
                **runner_identity(self.runner)}

    def loader_specs(self) -> dict[str, LoaderSpec]:
        bs = self.optim.batch_size
        return {
            "train": LoaderSpec("train", self.target, True, bs, seed=self.seed),
            "val": LoaderSpec("val", self.target, False, bs * 2, seed=self.seed),
        }

    def run(self, ctx) -> dict[str, Any]:
        out_dir = Path(self.out_dir)
        t0 = time.perf_counter()
        seed_everything(self.seed)
        manifest = load_manifest(self.data.manifest_dir)
        h = manifest.hierarchy
        fine = self.target == "fine"
        spec = NetworkSpec(self.model, h.num_subclasses if fine else h.num_superclasses, self.data.image_size)
        model = spec.build().to(ctx.device)
        specs = self.loader_specs()
        train, val = self.loader(ctx, manifest, specs["train"]), self.loader(ctx, manifest, specs["val"])
        history = fit(model, train, val, self.optim, ctx, out_dir, self.name, train_images=self.train_images)
        result = {"name": self.name, "role": self.role, "target": self.target, "seed": self.seed,
                  "peak_lr": peak_lr(self.optim, ctx.world_size), **summary(history, time.perf_counter() - t0)}
        result["val_acc"] = history[-1]["val_acc"] if history else float("nan")
        if ctx.rank == 0:
            save_network(model, spec, out_dir, h.subclass_ids if fine else h.superclass_ids)
            self.write_result(result, OUTPUT_FILES)
        return result
