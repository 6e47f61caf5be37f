"""Training the trunk router (``generalist.kind=trunk_router``): a small superclass head on the
resident network's frozen trunk (see :mod:`supersub.trunk_router`). It writes ``router.safetensors``
and ``router.json`` (its :class:`~supersub.trunk_router.RouterSpec`).

``trunk="finetune"``: the whole network is finetuned with the router as a second head (fine CE +
superclass CE); the task then also writes that network (``model.safetensors``, ``network.json``),
which is the resident the specialists' deltas are taken against."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from supersub import atomic
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec
from supersub.epoch import OptimConfig, evaluate, seed_everything
from supersub.fit import fit, peak_lr, summary
from supersub.metrics import superclass_probs
from supersub.networks import OUTPUT_FILES, load_network, load_weights, save_network, save_weights
from supersub.tasks.base import DataOptions, Task, optim_identity, register, runner_identity
from supersub.trunk_router import (
    ROUTER_FILE,
    MultitaskTrunk,
    RoutedTrunk,
    RouterSpec,
    TrunkRouter,
    router_spec,
)

SPEC_FILE = "router.json"


@register
@dataclass
class RouterTask(Task):
    kind: ClassVar[str] = "router"

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
    trunk: Literal["frozen", "finetune"] = "frozen"  # finetune: the whole network with the router (module doc)

    @property
    def name(self) -> str:
        return "router" if self.seed == 0 else f"router_seed{self.seed}"

    @property
    def resources(self) -> str:  # type: ignore[override]
        """A head's worth of training runs beside the specialists; finetuning the trunk is a network's."""
        return "network" if self.trunk == "finetune" else "specialist"

    def identity(self) -> dict[str, Any]:
        return {"first_stage": self.first_stage, "width": self.width, "optim": optim_identity(self.optim),
                "data": self.data.identity(), "seed": self.seed, "inputs": dict(sorted(self.inputs.items())),
                **({"distill": self.distill, "distill_temperature": self.distill_temperature} if self.distill else {}),
                **runner_identity(self.runner), **({"trunk": self.trunk} if self.trunk != "frozen" else {})}

    def multitask_loss(self, model: MultitaskTrunk, hierarchy, label_smoothing: float):
        """Fine CE on the network's head + superclass CE on the router, from the same trunk features
        (the superclass label is the fine label's superclass)."""
        coarse = torch.tensor(hierarchy.fine_to_coarse)

        def loss(logits, y, x):
            fine = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            router = model.router_logits.float()
            return fine + F.cross_entropy(router, coarse.to(y.device)[y], label_smoothing=label_smoothing)

        return loss

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
        target = "fine" if self.trunk == "finetune" else "coarse"  # finetune: fine labels, superclass derived
        specs = {"train": LoaderSpec("train", target, True, bs, seed=self.seed),
                 "val": LoaderSpec("val", target, False, bs * 2, seed=self.seed)}
        if self.trunk == "finetune":  # the router's own accuracy, at the end
            specs["val_coarse"] = LoaderSpec("val", "coarse", False, bs * 2, seed=self.seed)
        return specs

    def run(self, ctx) -> dict[str, Any]:
        out_dir = Path(self.out_dir)
        t0 = time.perf_counter()
        seed_everything(self.seed * 7919 + 7883)
        manifest = load_manifest(self.data.manifest_dir)
        h = manifest.hierarchy
        finetune = self.trunk == "finetune"
        # In the hierarchy's class order: a finetuned head is trained on these labels.
        base, net_spec, _ = load_network(self.resident_dir, h.subclass_ids)
        spec = router_spec(base, self.first_stage, self.data.image_size, self.width, h.num_superclasses)
        router = spec.build()
        specs = self.loader_specs()
        train, val = self.loader(ctx, manifest, specs["train"]), self.loader(ctx, manifest, specs["val"])
        if finetune:
            model = MultitaskTrunk(base, router, self.first_stage).to(ctx.device)
            loss_hook = self.multitask_loss(model, h, self.optim.label_smoothing)
        else:
            model = RoutedTrunk(base, router, self.first_stage).to(ctx.device)
            loss_hook = self.distill_loss(base, h, self.optim.label_smoothing) if self.distill > 0 else None
        history = fit(model, train, val, self.optim, ctx, out_dir, self.name, loss_hook=loss_hook)
        result = {"name": self.name, "peak_lr": peak_lr(self.optim, ctx.world_size),
                  **summary(history, time.perf_counter() - t0), "router": spec.to_dict()}
        if finetune:  # the history scored the network's fine head; val_acc is the router's, as when frozen
            result["network_val_acc"] = history[-1]["val_acc"] if history else float("nan")
            val_coarse = self.loader(ctx, manifest, specs["val_coarse"])
            result["val_acc"] = evaluate(RoutedTrunk(base, router, self.first_stage), val_coarse, ctx.device,
                                         self.optim)["top1"]
        else:
            result["val_acc"] = history[-1]["val_acc"] if history else float("nan")  # superclass accuracy on val
        if self.distill > 0:  # the teacher's forward passes: training compute beside train_images
            result["teacher_images"] = result["train_images"]
        if ctx.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_weights(router, out_dir / ROUTER_FILE)
            atomic.write_text(out_dir / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
            outputs = [ROUTER_FILE, SPEC_FILE]
            if finetune:
                save_network(base, net_spec, out_dir, h.subclass_ids)
                outputs += OUTPUT_FILES
            self.write_result(result, outputs)
        return result


def load_router(folder: str | Path) -> tuple[TrunkRouter, RouterSpec]:
    """A trained router (eval mode, CPU) and its spec, from a router task's folder."""
    folder = Path(folder)
    spec = RouterSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    return load_weights(spec.build(), folder / ROUTER_FILE), spec
