"""Two-stage inference over one resident network: superclass first, then its specialist.

The resident network (the paper's generalist, or the vanilla network whose subclass
probabilities sum to superclass probabilities) stays in device memory; specialists are packed
deltas in host memory, put onto the resident weights in place for the images routed to them and
taken off again (:func:`supersub.delta.applied`). Device memory is one network, one materialised
delta and activations, whatever the number of specialists.

Routing (:class:`RoutingConfig`):

* ``hard`` — the paper's: the top-1 superclass's specialist answers.
* ``soft`` — beyond the paper: ``p(sub) ∝ Σ_{s in top-k} p(s) · p_s(sub)``, to recover generalist
  mistakes. ``p_s`` is specialist ``s``'s softmax; if it was trained with an "other" output
  (images of other superclasses), the mass it puts there is dropped, so a specialist that does
  not recognise the image contributes little. A confidence ``threshold`` routes an image to its
  top superclass alone when ``p(top-1) >= threshold`` (saving specialist passes).
* ``resident_weight`` α (vanilla resident only) pools the result log-linearly with the resident
  network's own subclass probabilities inside the routed superclasses:
  ``log p(sub) = log mix(sub) + α · log p_resident(sub) + const``. The resident forward is stage
  one anyway, so this costs nothing; α = 0 is the pure two-stage model.

Calibration picks ``k``, ``threshold`` and α on the ``val`` split; numbers are reported on ``test``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from supersub.config import field
from supersub.delta import MaterializedDelta, PackedDelta, applied, materialize
from supersub.hierarchy import Hierarchy
from supersub.metrics import superclass_probs
from supersub.models import STAGES, ResNet


@dataclass
class RoutingConfig:
    mode: Literal["hard", "soft"] = field("soft", help="hard: top-1 superclass (the paper); soft: top-k mixture")
    k: int = field(2, help="soft: number of superclasses whose specialists are mixed")
    threshold: float = field(1.0, help="soft: route to the top-1 superclass alone when its probability >= threshold")
    resident_weight: float = field(
        0.0, help="α: log-linear pooling with the vanilla resident network's subclass probabilities (0 = off)"
    )
    calibrate: bool = field(True, help="choose k, threshold and resident_weight on the val split")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("routing.k must be at least 1")
        if not 0 < self.threshold <= 1:
            raise ValueError("routing.threshold must be in (0, 1]")
        if self.resident_weight < 0:
            raise ValueError("routing.resident_weight must be >= 0")

    @classmethod
    def parse(cls, text: str) -> RoutingConfig:
        """``hard``, ``soft`` or ``soft:K`` (the CLI's ``--routing``)."""
        if text == "hard":
            return cls(mode="hard", k=1, calibrate=False)
        if text == "soft":
            return cls(mode="soft")
        if text.startswith("soft:") and text[5:].isdigit():
            return cls(mode="soft", k=int(text[5:]))
        raise ValueError(f"routing must be hard, soft or soft:K, got {text!r}")


@dataclass
class StageOutputs:
    """Everything routing needs for a batch of ``B`` images, with the top ``K`` superclasses run.

    ``spec_fine[b, r]`` is the softmax of the specialist of superclass ``routes[b, r]`` scattered
    into fine-class positions (zeros outside that superclass; an "other" output is left out)."""

    super_probs: torch.Tensor  # [B, S]
    resident_fine: torch.Tensor | None  # [B, C] subclass probabilities of a vanilla resident
    routes: torch.Tensor  # [B, K] superclass indices, most probable first
    spec_fine: torch.Tensor  # [B, K, C]

    @staticmethod
    def cat(parts: list[StageOutputs]) -> StageOutputs:
        res = [p.resident_fine for p in parts]
        return StageOutputs(
            torch.cat([p.super_probs for p in parts]),
            None if res[0] is None else torch.cat(res),
            torch.cat([p.routes for p in parts]),
            torch.cat([p.spec_fine for p in parts]),
        )


def combine(out: StageOutputs, routing: RoutingConfig) -> torch.Tensor:
    """Fine-class probabilities ``[B, C]`` from stage outputs under a routing configuration."""
    B, K, _ = out.spec_fine.shape
    k = 1 if routing.mode == "hard" else min(routing.k, K)
    w = torch.zeros(B, K)
    if routing.mode == "hard":
        w[:, 0] = 1.0
    else:
        w[:, :k] = out.super_probs.gather(1, out.routes[:, :k])
        confident = out.super_probs.gather(1, out.routes[:, :1]).squeeze(1) >= routing.threshold
        w[confident, 1:] = 0.0
    mix = (w[:, :, None] * out.spec_fine).sum(1)
    if routing.resident_weight > 0 and out.resident_fine is not None:
        logp = mix.clamp_min(1e-30).log() + routing.resident_weight * out.resident_fine.clamp_min(1e-30).log()
        logp = logp.masked_fill(mix <= 0, float("-inf"))
        return torch.softmax(logp, 1)
    return mix / mix.sum(1, keepdim=True).clamp_min(1e-30)


@dataclass
class Plan:
    """Which specialist answers which image: ``routes [B, K]`` are the superclasses considered per
    image (most probable first); ``calls[s] = (image indices [m], route slots [m])``."""

    routes: torch.Tensor
    calls: dict[int, tuple[torch.Tensor, torch.Tensor]]


def plan(super_probs: torch.Tensor, routing: RoutingConfig, forced: torch.Tensor | None = None) -> Plan:
    """Routes for ``super_probs [B, S]``: the top-1 (hard) or top-k (soft) superclasses, where an
    image whose top-1 probability reaches ``threshold`` needs its top-1 specialist only (``combine``
    gives its other routes no weight). ``forced [B]`` routes each image to one given superclass
    (oracle routing)."""
    if forced is not None:
        routes = forced.to(super_probs.device).long()[:, None]
        needed = torch.ones_like(routes, dtype=torch.bool)
    else:
        k = 1 if routing.mode == "hard" else min(routing.k, super_probs.shape[1])
        top = super_probs.topk(k, 1)
        routes = top.indices
        needed = torch.zeros(routes.shape, dtype=torch.bool, device=routes.device)
        needed[:, 0] = True
        needed[top.values[:, 0] < routing.threshold, 1:] = True
    calls = {}
    for s in routes[needed].unique().tolist():
        b, r = ((routes == s) & needed).nonzero(as_tuple=True)
        calls[s] = (b, r)
    return Plan(routes, calls)


def assemble(
    hierarchy: Hierarchy,
    super_probs: torch.Tensor,
    resident_fine: torch.Tensor | None,
    p: Plan,
    answers: dict[int, torch.Tensor],
) -> StageOutputs:
    """:class:`StageOutputs` (on the CPU) from stage one and each called specialist's softmax
    ``answers[s]`` (rows in the order of ``p.calls[s]``), scattered into fine-class positions; an
    "other" output is dropped; routes no specialist answered stay zero."""
    B, K = p.routes.shape
    spec = torch.zeros(B, K, hierarchy.num_subclasses)
    for s, (b, r) in p.calls.items():
        cols = torch.tensor(hierarchy.coarse_to_fine[s])
        spec[b.cpu()[:, None], r.cpu()[:, None], cols[None, :]] = answers[s][:, : len(cols)].float().cpu()
    return StageOutputs(
        super_probs.float().cpu(), None if resident_fine is None else resident_fine.float().cpu(), p.routes.cpu(), spec
    )


class TwoStagePredictor:
    """Generalist → superclass → specialist (resident + delta) → subclass, on one network.

    ``deltas`` maps superclass index → :class:`PackedDelta` (kept in host memory).
    ``resident``: ``generalist`` (its head is over superclasses) or ``vanilla`` (over subclasses).
    ``cache_bytes`` bounds an LRU of materialised deltas on the device (0: decode on each use).
    """

    def __init__(
        self,
        base: ResNet,
        hierarchy: Hierarchy,
        deltas: dict[int, PackedDelta],
        resident: Literal["generalist", "vanilla"],
        device: torch.device | str = "cpu",
        *,
        amp: torch.dtype | None = None,
        cache_bytes: int = 0,
    ) -> None:
        missing = sorted(set(range(hierarchy.num_superclasses)) - set(deltas))
        if missing:
            raise ValueError(f"no specialist delta for superclass(es) {missing}")
        self.device = torch.device(device)
        self.base = base.to(self.device).eval()
        self.hierarchy, self.deltas, self.resident = hierarchy, deltas, resident
        self.amp, self.cache_bytes = amp, cache_bytes
        stages = {d.meta["first_stage"] for d in deltas.values()}
        self.first_stage = min(stages)  # stages before it are the shared trunk
        self._cache: OrderedDict[int, MaterializedDelta] = OrderedDict()
        self.timings = {"stage1_s": 0.0, "stage2_s": 0.0, "specialist_passes": 0, "images": 0}

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _delta(self, s: int) -> MaterializedDelta:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        m = materialize(self.deltas[s], self.device)
        if self.cache_bytes > 0:
            self._cache[s] = m
            while sum(d.nbytes for d in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return m

    @torch.no_grad()
    def stage1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Shared trunk ``[B, ...]``, superclass probabilities ``[B, S]`` and, for a vanilla
        resident, its subclass probabilities ``[B, C]``."""
        with self._autocast():
            trunk = self.base.forward_stages(x, 0, self.first_stage)
            logits = self.base.forward_head(self.base.forward_stages(trunk, self.first_stage, len(STAGES))).float()
        probs = torch.softmax(logits, 1)
        if self.resident == "vanilla":
            return trunk, superclass_probs(probs, self.hierarchy), probs
        return trunk, probs, None

    @torch.no_grad()
    def specialist(self, s: int, trunk: torch.Tensor, delta: MaterializedDelta | None = None) -> torch.Tensor:
        """Softmax ``[b, n_sub(+1)]`` of superclass ``s``'s specialist on trunk features (the
        output of the stages before ``first_stage``). ``delta`` overrides this predictor's own
        (serving keeps its own cache). Not thread-safe: the delta is applied to ``self.base``."""
        with applied(self.base, delta or self._delta(s)) as head, self._autocast():
            h = self.base.forward_stages(trunk, self.first_stage, len(STAGES))
            return torch.softmax(self.base.forward_head(h, head).float(), 1)

    # ------------------------------------------------------------------ batches
    @torch.no_grad()
    def _outputs(self, x: torch.Tensor, routing: RoutingConfig, forced: torch.Tensor | None = None) -> StageOutputs:
        x = x.to(self.device)
        t0 = time.perf_counter()
        trunk, sup, resident_fine = self.stage1(x)
        t1 = time.perf_counter()
        p = plan(sup, routing, forced)
        answers = {s: self.specialist(s, trunk[b]) for s, (b, _) in p.calls.items()}
        out = assemble(self.hierarchy, sup, resident_fine, p, answers)  # copies to the CPU: synchronises
        self.timings["stage1_s"] += t1 - t0
        self.timings["stage2_s"] += time.perf_counter() - t1
        self.timings["specialist_passes"] += len(p.calls)
        self.timings["images"] += x.shape[0]
        return out

    def run(self, x: torch.Tensor, top: int = 1, forced: torch.Tensor | None = None) -> StageOutputs:
        """Stage one and the specialists of every image's ``top`` most probable superclasses (or
        of the ``forced`` superclass per image: oracle routing), for recombining under several
        routing configurations (calibration)."""
        top = min(top, self.hierarchy.num_superclasses)
        return self._outputs(x, RoutingConfig(mode="soft", k=top, calibrate=False), forced)

    def predict(self, x: torch.Tensor, routing: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine probabilities ``[B, C]`` and superclass probabilities ``[B, S]`` for images
        ``[B, 3, H, W]``, running only the specialists that routing needs."""
        out = self._outputs(x, routing)
        return combine(out, routing), out.super_probs


def permute_head(fc: nn.Linear, old_ids: list[str], new_ids: list[str]) -> None:
    """Reorders a subclass head's rows from one fine order to another (e.g. to a learned
    hierarchy's order), exactly, in place."""
    index = {c: i for i, c in enumerate(old_ids)}
    order = torch.tensor([index[c] for c in new_ids])
    with torch.no_grad():
        fc.weight.copy_(fc.weight[order])
        fc.bias.copy_(fc.bias[order])
