"""Training trunk, router and experts together (``generalist.router_trunk=joint``): the Network of
Experts recipe on the trunk router's design (see :mod:`supersub.trunk_router`).

One task replaces the router task and the specialist tasks. Every step, a batch of all classes
runs through the trunk once; the router learns the superclass, each image's own superclass's
expert (resident tail + a sparse quantised delta + its head) learns its subclass, and
``negatives`` × the batch go to a random other expert labelled "other", as the separate
specialists see them. The budget is the separate specialists' (``train_images``: expert passes,
negatives included), so the equal-images controls are the same as theirs.

It writes the finetuned resident (``model.safetensors``, ``network.json``: the trunk changed, the
tail and head are the vanilla network's), the router (``router.safetensors``, ``router.json``)
and each expert's packed delta (``specialists/specialist_<s>/delta.safetensors``): the formats
the separate tasks write, so evaluation, bundle and serving read them as they are.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from supersub import atomic
from supersub.config import to_dict
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec
from supersub.delta import DeltaConfig, get_method, set_train_mode
from supersub.epoch import OptimConfig, evaluate, seed_everything, unwrap
from supersub.fit import fit, peak_lr, summary
from supersub.networks import OUTPUT_FILES, load_network, save_network, save_weights
from supersub.resnet import state_bytes
from supersub.tasks.base import DataOptions, Task, optim_identity, register, runner_identity
from supersub.tasks.router import SPEC_FILE
from supersub.tasks.specialist import DELTA_FILE, delta_stats
from supersub.trunk_router import ROUTER_FILE, JointExperts, RoutedTrunk, router_spec

EXPERTS_DIR = "specialists"


def expert_dir(out_dir: str | Path, superclass: int) -> str:
    """Where a joint task keeps expert ``superclass``'s delta (a specialist task's folder layout)."""
    return str(Path(out_dir) / EXPERTS_DIR / f"specialist_{superclass}")


def local_index(hierarchy) -> torch.Tensor:
    """Each subclass's position among its superclass's members: its expert's output index."""
    local = torch.zeros(hierarchy.num_subclasses, dtype=torch.long)
    for members in hierarchy.coarse_to_fine:
        local[torch.tensor(members)] = torch.arange(len(members))
    return local


@register
@dataclass
class JointTask(Task):
    kind: ClassVar[str] = "joint"

    resident_dir: str  # the vanilla network: trunk finetuned, tail and head the experts' base
    first_stage: int  # the trunk: stages before the first delta stage
    router_width: float  # router conv channels, as a fraction of the trunk's
    trunk_lr: float  # the trunk's learning rate (given for 128 images, as optim.lr)
    delta: DeltaConfig
    optim: OptimConfig  # the specialists' optimiser: epochs, batch, the experts' and router's lr
    negatives: float  # images sent to another expert as "other", per image
    train_images: int  # budget in expert passes (negatives included): the separate specialists'
    data: DataOptions
    out_dir: str
    seed: int = 0
    inputs: dict[str, str | None] = field(default_factory=dict)  # sha256 of the resident's weights
    runner: str = "ray"

    @property
    def name(self) -> str:
        return "joint" if self.seed == 0 else f"joint_seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        return {"first_stage": self.first_stage, "router_width": self.router_width, "trunk_lr": self.trunk_lr,
                "delta": to_dict(self.delta), "optim": optim_identity(self.optim), "negatives": self.negatives,
                "train_images": self.train_images, "data": self.data.identity(), "seed": self.seed,
                "inputs": dict(sorted(self.inputs.items())), **runner_identity(self.runner)}

    # ------------------------------------------------------------------ the budget
    @property
    def negatives_per_batch(self) -> int:
        return int(round(self.negatives * self.optim.batch_size))

    @property
    def steps(self) -> int:
        return max(1, self.train_images // (self.optim.batch_size + self.negatives_per_batch))

    @property
    def trunk_images(self) -> int:
        """Images through the trunk (what :func:`supersub.fit.fit` counts)."""
        return self.steps * self.optim.batch_size

    @property
    def expert_passes(self) -> int:
        """Images through an expert, negatives included: the planned ``train_images``."""
        return self.steps * (self.optim.batch_size + self.negatives_per_batch)

    def loader_specs(self) -> dict[str, LoaderSpec]:
        bs = self.optim.batch_size
        return {"train": LoaderSpec("train", "fine", True, bs, seed=self.seed),
                "val": LoaderSpec("val", "fine", False, bs * 2, seed=self.seed),
                "val_coarse": LoaderSpec("val", "coarse", False, bs * 2, seed=self.seed)}  # the router's, at the end

    # ------------------------------------------------------------------ pieces
    def experts(self, resident, hierarchy) -> list[tuple[nn.Module, list[nn.Module]]]:
        """One specialist per superclass, with its delta layers: the resident's copy + a delta + a
        fresh head (its members, and "other" when it sees negatives), as
        :class:`~supersub.tasks.SpecialistTask` builds it."""
        method = get_method(self.delta.method)
        out = []
        for members in hierarchy.coarse_to_fine:
            expert = copy.deepcopy(resident)
            head = nn.Linear(expert.num_features, len(members) + int(self.negatives > 0))
            out.append((expert, method.attach(expert, self.delta, head)))
        return out

    def loss(self, model: JointExperts, hierarchy, label_smoothing: float):
        """Resident CE + router CE + the experts' CE over all their passes (own images and
        negatives), from one trunk forward. Which images are negatives, and whose, follows from the
        batch's labels and the seed, so a resumed run draws what the first one did."""
        coarse = torch.tensor(hierarchy.fine_to_coarse)
        local = local_index(hierarchy)
        S, k = hierarchy.num_superclasses, self.negatives_per_batch
        sizes = torch.tensor([len(m) for m in hierarchy.coarse_to_fine])

        def loss(logits, y, x):
            trunk, dev = model.trunk, y.device
            sup = coarse.to(dev)[y]
            total = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            total = total + F.cross_entropy(model.router(trunk).float(), sup, label_smoothing=label_smoothing)
            rows, owner, target = torch.arange(len(y), device=dev), sup, local.to(dev)[y]
            if k > 0 and S > 1:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + int((y.cpu() * torch.arange(1, len(y) + 1)).sum()))
                neg = torch.randperm(len(y), generator=g)[: min(k, len(y))].to(dev)
                other = (sup[neg] + torch.randint(1, S, (len(neg),), generator=g).to(dev)) % S  # never its own
                rows = torch.cat([rows, neg])
                owner = torch.cat([owner, other])
                target = torch.cat([target, sizes.to(dev)[other]])  # the "other" output follows the members
            expert_loss = torch.zeros((), device=dev)
            for s in owner.unique().tolist():
                pick = owner == s
                out = model.expert(s, trunk[rows[pick]]).float()
                expert_loss = expert_loss + F.cross_entropy(out, target[pick], label_smoothing=label_smoothing,
                                                            reduction="sum")
            return total + expert_loss / len(rows)

        return loss

    @torch.no_grad()
    def expert_accuracy(self, model: JointExperts, val, device, hierarchy) -> list[float]:
        """Each expert's top-1 among its members on val images of its superclass (oracle routing),
        as a specialist task's ``val_acc``."""
        model.eval()
        coarse = torch.tensor(hierarchy.fine_to_coarse)
        local = local_index(hierarchy)
        right, seen = torch.zeros(hierarchy.num_superclasses), torch.zeros(hierarchy.num_superclasses)
        for x, y in val:
            x, y = x.to(device), y.cpu()
            trunk = model.base.forward_stages(x, 0, self.first_stage)
            sup = coarse[y]
            for s in sup.unique().tolist():
                pick = sup == s
                n = len(hierarchy.coarse_to_fine[s])
                pred = model.expert(s, trunk[pick.to(trunk.device)])[:, :n].argmax(1).cpu()
                right[s] += (pred == local[y[pick]]).sum()
                seen[s] += pick.sum()
        return (100.0 * right / seen.clamp_min(1)).tolist()

    # ------------------------------------------------------------------ run
    def run(self, ctx) -> dict[str, Any]:
        if ctx.world_size > 1:  # the experts run outside forward, on the batch's labels: DDP cannot see them
            raise ValueError("joint training (generalist.router_trunk=joint) runs on one worker: set "
                             "resources.num_workers=1")
        out_dir = Path(self.out_dir)
        t0 = time.perf_counter()
        seed_everything(self.seed * 7919 + 7901)
        manifest = load_manifest(self.data.manifest_dir)
        h = manifest.hierarchy
        base, net_spec, _ = load_network(self.resident_dir, h.subclass_ids)
        spec = router_spec(base, self.first_stage, self.data.image_size, self.router_width, h.num_superclasses)
        router = spec.build()
        experts = self.experts(base, h)
        method = get_method(self.delta.method)
        model = JointExperts(base, router, [e for e, _ in experts], self.first_stage, lambda m: set_train_mode(m, self.delta),
                             trunk_lr_scale=self.trunk_lr / self.optim.lr).to(ctx.device)
        specs = self.loader_specs()
        train, val = self.loader(ctx, manifest, specs["train"]), self.loader(ctx, manifest, specs["val"])

        def step_hook_factory(total):
            hooks = [method.schedule(layers, self.delta, total) for _, layers in experts]
            return lambda step: [hook(step) for hook in hooks]

        history = fit(model, train, val, self.optim, ctx, out_dir, self.name, train_images=self.trunk_images,
                      step_hook_factory=step_hook_factory, loss_hook=self.loss(model, h, self.optim.label_smoothing))
        plain = unwrap(model)
        packed = [method.export(e, self.delta, s) for s, e in enumerate(plain.experts)]
        expert_acc = self.expert_accuracy(plain, val, ctx.device, h)  # after export: the stored deltas' accuracy
        router_acc = evaluate(RoutedTrunk(plain.base, plain.router, self.first_stage),
                              self.loader(ctx, manifest, specs["val_coarse"]), ctx.device, self.optim)["top1"]
        result = {"name": self.name, "peak_lr": peak_lr(self.optim, ctx.world_size),
                  **summary(history, time.perf_counter() - t0), "router": spec.to_dict(), "val_acc": router_acc,
                  "network_val_acc": history[-1]["val_acc"] if history else float("nan")}
        # Training images as the controls count them: one per image through an expert (the trunk
        # ran once for it), negatives included; the resident's own tail pass is not counted.
        result["trunk_images"] = result["train_images"]
        result["train_images"] = result["trunk_images"] // self.optim.batch_size * (
            self.optim.batch_size + self.negatives_per_batch)
        network_bytes = state_bytes(plain.base)
        result["specialists"] = [{"superclass": s, "val_acc": expert_acc[s], **delta_stats(p, network_bytes)}
                                 for s, p in enumerate(packed)]
        if ctx.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_network(plain.base, net_spec, out_dir, h.subclass_ids)
            save_weights(plain.router, out_dir / ROUTER_FILE)
            atomic.write_text(out_dir / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
            for s, p in enumerate(packed):
                Path(expert_dir(out_dir, s)).mkdir(parents=True, exist_ok=True)
                atomic.write_bytes(Path(expert_dir(out_dir, s)) / DELTA_FILE, p.to_bytes())
            self.write_result(result, [*OUTPUT_FILES, ROUTER_FILE, SPEC_FILE, EXPERTS_DIR])
        return result
