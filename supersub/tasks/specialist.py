"""Finetuning one delta: a superclass's specialist, or — ``superclass`` None — one delta over all
classes (the ``delta_all`` control: the same budget of delta, no specialisation).

The specialist is the resident network + a sparse quantised delta (``delta.method``) + its own
head, finetuned on its superclass's images (plus "other"-labelled images of other superclasses
when ``negatives`` > 0), optionally distilled from the vanilla network's answer restricted to the
superclass. It writes the packed delta (``delta.safetensors``) and its metrics.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from supersub import atomic
from supersub.config import to_dict
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec
from supersub.delta import (
    DeltaConfig,
    PackedDelta,
    choose_fisher_masks,
    get_method,
    set_train_mode,
    start_from,
)
from supersub.epoch import OptimConfig, evaluate, seed_everything, unwrap
from supersub.fit import fit, peak_lr, resume_state, summary
from supersub.networks import load_network
from supersub.resnet import state_bytes
from supersub.tasks.base import DataOptions, Task, optim_identity, register, runner_identity

DELTA_FILE = "delta.safetensors"


@register
@dataclass
class SpecialistTask(Task):
    kind: ClassVar[str] = "specialist"
    resources: ClassVar[str] = "specialist"

    superclass: int | None  # None: one delta over all classes (delta_all)
    resident_dir: str  # the network every delta is taken against
    init_dir: str | None  # start from this network instead (its delta is then dense at first)
    head_init: Literal["random", "vanilla_rows"]
    vanilla_dir: str | None  # head rows (vanilla_rows) and distillation teacher
    delta: DeltaConfig
    optim: OptimConfig
    negatives: float
    data: DataOptions
    out_dir: str
    seed: int = 0
    train_images: int | None = None  # a budget in images instead of optim.epochs
    distill: float = 0.0  # weight of the distillation loss from the vanilla network
    distill_temperature: float = 2.0
    inputs: dict[str, str | None] = field(default_factory=dict)  # sha256 of resident / init / vanilla weights
    runner: str = "ray"  # which runner trains it: see runner_identity

    @property
    def name(self) -> str:
        base = "delta_all" if self.superclass is None else f"specialist_{self.superclass}"
        return base if self.seed == 0 else f"{base}_seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        return {
            "superclass": self.superclass, "head_init": self.head_init, "delta": to_dict(self.delta),
            "optim": optim_identity(self.optim), "negatives": self.negatives, "data": self.data.identity(),
            "seed": self.seed, "train_images": self.train_images, "inputs": dict(sorted(self.inputs.items())),
            **({"distill": self.distill, "distill_temperature": self.distill_temperature} if self.distill else {}),
            **runner_identity(self.runner),
        }

    def loader_specs(self) -> dict[str, LoaderSpec]:
        bs = self.optim.batch_size
        if self.superclass is None:
            return {"train": LoaderSpec("train", "fine", True, bs, seed=self.seed),
                    "val": LoaderSpec("val", "fine", False, bs * 2, seed=self.seed)}
        s = self.superclass
        return {"train": LoaderSpec("train", "specialist", True, bs, s, self.negatives, self.seed),
                "val": LoaderSpec("val", "specialist", False, bs * 2, s, 0.0, self.seed)}

    # ------------------------------------------------------------------ pieces
    def members(self, hierarchy) -> list[int]:
        return list(range(hierarchy.num_subclasses)) if self.superclass is None else hierarchy.coarse_to_fine[self.superclass]

    def head(self, num_features: int, members: list[int], order: list[str]) -> nn.Linear:
        """``len(members)`` outputs, plus one "other" output when the specialist sees negatives.
        ``vanilla_rows`` copies the vanilla head's rows of the members, so finetuning starts from
        the vanilla network's own answer among them."""
        other = self.superclass is not None and self.negatives > 0
        head = nn.Linear(num_features, len(members) + int(other))
        if self.head_init == "vanilla_rows":
            vanilla, _, _ = load_network(self.vanilla_dir, order)
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
                head.weight[: len(members)] = vanilla.fc.weight[members]
                head.bias[: len(members)] = vanilla.fc.bias[members]
        return head

    def distill_loss(self, teacher: nn.Module, members: list[int], n_out: int, label_smoothing: float):
        """``(1 - λ) CE + λ T² KL(teacher ‖ student)`` at temperature T, the teacher's distribution
        restricted to the members (its mass elsewhere becomes the "other" output's target)."""
        lam, T = self.distill, self.distill_temperature
        idx = torch.tensor(members)

        def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                p = torch.softmax(teacher(x).float() / T, 1)
                inside = p[:, idx.to(p.device)]
                target = torch.cat([inside, 1 - inside.sum(1, keepdim=True)], 1) if n_out > len(members) else inside
                target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
            kd = F.kl_div(F.log_softmax(logits / T, 1), target, reduction="batchmean") * T * T
            return (1 - lam) * F.cross_entropy(logits, y, label_smoothing=label_smoothing) + lam * kd

        return loss

    # ------------------------------------------------------------------ run
    def run(self, ctx) -> dict[str, Any]:
        out_dir = Path(self.out_dir)
        t0 = time.perf_counter()
        seed_everything(self.seed * 7919 + (self.superclass if self.superclass is not None else 7907))
        manifest = load_manifest(self.data.manifest_dir)
        h = manifest.hierarchy
        order = h.subclass_ids
        members = self.members(h)
        method = get_method(self.delta.method)
        resident, _, _ = load_network(self.resident_dir)
        model = copy.deepcopy(resident)
        head = self.head(model.num_features, members, order)
        layers = method.attach(model, self.delta, head)
        if self.init_dir:  # start as another network: the delta begins as (init - resident)
            init, _, _ = load_network(self.init_dir)
            start_from(model, {k: v for k, v in init.state_dict().items() if not k.startswith("fc.")}, self.delta)
        model = model.to(ctx.device)
        specs = self.loader_specs()
        train, val = self.loader(ctx, manifest, specs["train"]), self.loader(ctx, manifest, specs["val"])

        if self.delta.mask == "fisher" and resume_state(ctx, out_dir) is None:
            model.eval()  # gradients under the resident's statistics; no BN state changes
            train.set_epoch(0)
            choose_fisher_masks(model, layers, itertools.islice(iter(train), self.delta.fisher_batches),
                                nn.CrossEntropyLoss(), ctx.device)
        loss_hook = None
        if self.distill > 0:
            teacher, _, _ = load_network(self.vanilla_dir, order)
            loss_hook = self.distill_loss(teacher.to(ctx.device).eval(), members, head.out_features,
                                          self.optim.label_smoothing)
        history = fit(
            model, train, val, self.optim, ctx, out_dir, self.name, train_images=self.train_images,
            train_mode=lambda m: set_train_mode(m, self.delta),
            step_hook_factory=lambda total: method.schedule(layers, self.delta, total),
            loss_hook=loss_hook, eval_classes=len(members),
        )
        plain = unwrap(model)
        packed = method.export(plain, self.delta, self.superclass)
        final = evaluate(plain, val, ctx.device, self.optim, len(members))  # the exported delta's accuracy
        result = {
            "name": self.name,
            "superclass": self.superclass,
            "peak_lr": peak_lr(self.optim, ctx.world_size),
            **summary(history, time.perf_counter() - t0),
            "val_acc": final["top1"],
            "val_acc_before_export": history[-1]["val_acc"] if history else float("nan"),
            **delta_stats(packed, state_bytes(resident)),
        }
        if self.distill > 0:  # the teacher's forward passes: training compute beside train_images
            result["teacher_images"] = result["train_images"]
        if ctx.rank == 0:
            atomic.write_bytes(out_dir / DELTA_FILE, packed.to_bytes())
            self.write_result(result, [DELTA_FILE])
        return result


def delta_stats(packed: PackedDelta, network_bytes: int) -> dict[str, Any]:
    """A packed delta's stored bytes, its share of the network's, and the share of its layers'
    entries it changes: the size fields of a specialist's result."""
    nbytes = packed.nbytes
    nnz = sum(int(e["nnz"]) for e in packed.meta["layers"].values())
    total = sum(int(torch.tensor(e["shape"]).prod()) for e in packed.meta["layers"].values())
    return {"delta_bytes": nbytes, "delta_ratio": nbytes / network_bytes, "delta_density": nnz / max(1, total)}


def load_packed(out_dir: str | Path) -> PackedDelta:
    return PackedDelta.from_bytes((Path(out_dir) / DELTA_FILE).read_bytes())
