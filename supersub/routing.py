"""Routing: which specialists answer an image, and how their answers combine.

One spelling everywhere (YAML, command lines, Serve arguments, bundles, responses)::

    hard            the paper's: the top-1 superclass's specialist answers
    hard+0.5        ... pooled with the resident network's own answer, weight α = 0.5
    soft:3          p(sub) ∝ Σ_{s in top-3} p(s) · p_s(sub)
    soft:3@0.7      ... but an image whose top-1 superclass probability is >= 0.7 goes to it alone
    soft:3@0.7+0.25 ... pooled with α = 0.25

* ``soft`` (beyond the paper) recovers some of the generalist's mistakes. ``p_s`` is specialist
  ``s``'s softmax; if it was trained with an "other" output, the mass it puts there is dropped,
  so a specialist that does not recognise the image contributes little.
* α (vanilla resident only) pools log-linearly with the resident's own subclass probabilities
  inside the routed superclasses: ``log p(sub) = log mix(sub) + α · log p_resident(sub) + c``.
  The resident's forward is stage one anyway, so this costs nothing; α = 0 is the pure
  two-stage model, and the reported models keep the two apart (``two_stage_hard`` is the
  paper's routing, ``two_stage_hard_pooled`` is not).

:func:`plan` says which specialist runs on which image, :func:`assemble` gathers their answers
into :class:`StageOutputs`, :func:`combine` turns those into fine probabilities under a routing,
and :func:`calibrate` picks k, threshold and α on held-out outputs (an evaluation step, not a
routing setting).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from supersub.hierarchy import Hierarchy

_SPEC = re.compile(r"^(hard|soft)(?::(\d+))?(?:@([0-9.eE+-]+?))?(?:\+([0-9.eE+-]+))?$")


@dataclass(frozen=True)
class Routing:
    """A routing: ``mode``, soft ``k`` and ``threshold``, pooling weight α (``resident_weight``)."""

    mode: Literal["hard", "soft"] = "soft"
    k: int = 2
    threshold: float = 1.0
    resident_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"routing mode must be hard or soft, got {self.mode!r}")
        if self.mode == "hard" and (self.k != 1 or self.threshold != 1.0):
            object.__setattr__(self, "k", 1)  # hard routing has one route, no threshold
            object.__setattr__(self, "threshold", 1.0)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"routing k must be a whole number >= 1, got {self.k!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and 0 < self.threshold <= 1):
            raise ValueError(f"routing threshold must be in (0, 1], got {self.threshold!r}")
        w = self.resident_weight
        if not (isinstance(w, (int, float)) and math.isfinite(w) and 0 <= w <= 100):
            raise ValueError(f"routing resident weight α must be a finite number in [0, 100], got {w!r}")

    @classmethod
    def parse(cls, text: str) -> Routing:
        """``hard``, ``hard+A``, ``soft``, ``soft:K``, ``soft:K@T``, ``soft:K@T+A`` (see the module doc)."""
        m = _SPEC.match(str(text).strip())
        if not m:
            raise ValueError(f"routing {text!r} is not of the form hard[+A] or soft[:K][@T][+A] (e.g. soft:2@0.7+0.5)")
        mode, k, t, a = m.groups()
        if mode == "hard" and (k or t):
            raise ValueError(f"routing {text!r}: hard routing takes no :K or @T (only +A)")
        try:
            return cls(mode, int(k) if k else (1 if mode == "hard" else 2), float(t) if t else 1.0, float(a) if a else 0.0)
        except ValueError as e:
            raise ValueError(f"routing {text!r}: {e}") from None

    def __str__(self) -> str:
        s = "hard" if self.mode == "hard" else f"soft:{self.k}" + (f"@{self.threshold:g}" if self.threshold < 1 else "")
        return s + (f"+{self.resident_weight:g}" if self.resident_weight > 0 else "")

    @property
    def pooled(self) -> bool:
        return self.resident_weight > 0


HARD = Routing("hard")


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


def _confident(super_probs: torch.Tensor, routes: torch.Tensor, threshold: float) -> torch.Tensor:
    return super_probs.gather(1, routes[:, :1]).squeeze(1) >= threshold


def combine(out: StageOutputs, routing: Routing) -> torch.Tensor:
    """Fine-class probabilities ``[B, C]`` from stage outputs under a routing."""
    B, K, _ = out.spec_fine.shape
    k = min(routing.k, K)
    w = torch.zeros(B, K)
    if routing.mode == "hard":
        w[:, 0] = 1.0
    else:
        w[:, :k] = out.super_probs.gather(1, out.routes[:, :k])
        w[_confident(out.super_probs, out.routes, routing.threshold), 1:] = 0.0
    mix = (w[:, :, None] * out.spec_fine).sum(1)
    if routing.resident_weight > 0 and out.resident_fine is not None:
        logp = mix.clamp_min(1e-30).log() + routing.resident_weight * out.resident_fine.clamp_min(1e-30).log()
        logp = logp.masked_fill(mix <= 0, float("-inf"))
        return torch.softmax(logp, 1)
    return mix / mix.sum(1, keepdim=True).clamp_min(1e-30)


def specialist_passes(out: StageOutputs, routing: Routing) -> float:
    """Mean number of specialist passes per image under ``routing`` (1 for hard)."""
    if routing.mode == "hard":
        return 1.0
    k = min(routing.k, out.routes.shape[1])
    confident = _confident(out.super_probs, out.routes, routing.threshold)
    return (confident.float() + (~confident).float() * k).mean().item()


@dataclass
class Plan:
    """Which specialist answers which image: ``routes [B, K]`` are the superclasses considered per
    image (most probable first); ``calls[s] = (image indices [m], route slots [m])``."""

    routes: torch.Tensor
    calls: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def passes(self) -> int:
        """Specialist passes (image × specialist) the plan runs."""
        return sum(int(b.numel()) for b, _ in self.calls.values())


def plan(super_probs: torch.Tensor, routing: Routing, forced: torch.Tensor | None = None) -> Plan:
    """Routes for ``super_probs [B, S]``: the top-1 (hard) or top-k (soft) superclasses; an image
    whose top-1 probability reaches ``threshold`` needs its top-1 specialist only (``combine``
    gives its other routes no weight). ``forced [B]`` routes each image to one given superclass
    (oracle routing)."""
    if forced is not None:
        routes = forced.to(super_probs.device).long()[:, None]
        needed = torch.ones_like(routes, dtype=torch.bool)
    else:
        k = min(routing.k, super_probs.shape[1])
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


# ----------------------------------------------------------------------------- calibration
# The grid searched on val. k beyond 3 rarely helps and costs a specialist pass per image each.
K_GRID = (1, 2, 3)
THRESHOLD_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
RESIDENT_WEIGHT_GRID = (0.25, 0.5, 1.0, 2.0)

# The routings every evaluation reports, by name; ``*_pooled`` only with a vanilla resident.
FAMILIES = ("hard", "soft", "hard_pooled", "soft_pooled")


def calibrate(out: StageOutputs, labels: torch.Tensor, family: str, max_k: int) -> Routing:
    """The routing of ``family`` with the best top-1 on these (val) outputs; ties go to the
    cheaper one (fewer specialist passes, then smaller α, k, threshold)."""
    if family == "hard":
        return HARD
    pooled = family.endswith("_pooled")
    alphas = RESIDENT_WEIGHT_GRID if pooled else (0.0,)
    if family.startswith("hard"):
        grid = [Routing("hard", resident_weight=a) for a in alphas]
    else:
        ks = [k for k in K_GRID if k <= max_k]
        grid = [Routing("soft", k, t, a) for k, t, a in itertools.product(ks, THRESHOLD_GRID, alphas)]
    scored = []
    for r in grid:
        acc = combine(out, r).argmax(1).eq(labels).float().mean().item()
        scored.append((-acc, specialist_passes(out, r), r.resident_weight, r.k, r.threshold, r))
    scored.sort(key=lambda t: t[:5])
    return scored[0][-1]


def default_routing(family: str) -> Routing:
    """A family's routing without calibration."""
    if family == "hard":
        return HARD
    if family == "soft":
        return Routing("soft", 2)
    raise ValueError(f"routing {family} needs calibration (evaluation.calibrate=true) or an explicit form such as hard+0.5")


def resolve(spec: str, chosen: dict[str, Routing]) -> Routing:
    """``spec`` as a family name (the routing chosen for it) or an explicit routing."""
    if spec in chosen:
        return chosen[spec]
    if spec in FAMILIES:
        raise ValueError(f"routing {spec} was not evaluated (have: {', '.join(chosen)})")
    return Routing.parse(spec)


def with_changes(r: Routing, **changes) -> Routing:
    return dataclasses.replace(r, **changes)
