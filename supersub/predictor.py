"""Two-stage inference over one resident network: superclass first, then its specialist.

The resident network (the paper's generalist, or the vanilla network whose subclass
probabilities sum to superclass probabilities) stays on the device and is never modified.

* **Trunk once.** Stage one runs every image through the resident network once and keeps the
  output of the stages before the first delta stage (the *trunk*). A specialist only runs the
  stages that carry its delta, and its head, on the trunk of the images routed to it: with
  deltas on ``layer4`` alone, a specialist pass costs ~a fifth of a network.
* **A delta costs its own entries, not a copy of the network.** For a routed group the delta is
  decoded on the device (:meth:`supersub.delta.CompactDelta.decode`) and added at its positions
  of the resident's weights, the delta stages run with the specialist's BatchNorm tensors passed
  in (:meth:`supersub.resnet.ResNet.forward_stages_with`), and the saved entries are written
  back: one gather and two scatters of the kept entries (5 % of a stage's weights) over the
  resident's delta-stage weights, which live in one flat buffer (:class:`supersub.delta.FlatLayout`),
  no copy of the stage's weights — which on a ResNet is most of the network. The same arithmetic
  as :func:`supersub.delta.applied`, bit for bit. One lock serialises a predictor's forward
  passes (stage one must never see a patched network), so threads may share it.
* **Deltas held packed, decoded per group.** Every specialist's delta stays on the device in
  about its stored bytes (:class:`supersub.delta.CompactDelta`: one byte of position gap and
  b bits of code per kept entry, scales per channel) and is decoded just before its group runs;
  the decoded positions and values are freed after it. An LRU of decoded deltas, bounded by
  ``cache_bytes``, saves the decode where that pays (0, the default: measured in
  ``docs/benchmarks.md``, decoding costs a few percent of a group's forward; evaluation keeps
  them all). :meth:`TwoStagePredictor.resident_bytes` says what the predictor holds.

Routing (which specialists, how answers combine) is :mod:`supersub.routing`'s business.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

import torch
from torch import nn

from supersub.cache import LRU
from supersub.delta import CompactDelta, DecodedDelta, FlatLayout, PackedDelta, get_method
from supersub.hierarchy import Hierarchy
from supersub.metrics import superclass_probs
from supersub.resnet import STAGES, ResNet, state_bytes
from supersub.routing import Plan, Routing, StageOutputs, assemble, combine, plan


class TwoStagePredictor:
    """Generalist → superclass → specialist (resident + delta) → subclass, on one network.

    ``deltas`` maps superclass index → :class:`PackedDelta`; the predictor keeps each as a
    :class:`CompactDelta` on ``device`` (:attr:`deltas`), not the packed objects it was given.
    ``resident``: ``generalist`` (its head is over superclasses) or ``vanilla`` (over subclasses).
    ``router``: a :class:`supersub.trunk_router.TrunkRouter` on the vanilla resident's trunk — stage one
    is then the trunk + router, not the resident's whole forward.
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
        cache_items: float = float("inf"),
        router: nn.Module | None = None,
    ) -> None:
        missing = sorted(set(range(hierarchy.num_superclasses)) - set(deltas))
        if missing:
            raise ValueError(f"no specialist delta for superclass(es) {missing}")
        if resident not in ("generalist", "vanilla"):
            raise ValueError(f"resident must be 'generalist' or 'vanilla', got {resident!r}")
        self.device = torch.device(device)
        self.base = base.to(self.device).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.hierarchy, self.resident = hierarchy, resident
        self.amp, self.cache_bytes = amp, cache_bytes
        self.first_stage = min(int(d.meta["first_stage"]) for d in deltas.values())  # earlier stages: the trunk
        if router is not None:
            if resident != "vanilla":
                raise ValueError("a trunk router reads the vanilla resident's trunk; this resident is a generalist")
            if self.first_stage < 1:
                raise ValueError("a trunk router needs a trunk: the deltas start at the stem")
            router = router.to(self.device).eval()
            for p in router.parameters():
                p.requires_grad_(False)
        self.router = router
        # The weights any delta changes, in one flat buffer: a delta is one gather and two scatters.
        self.layout = FlatLayout(self.base, {n for d in deltas.values() for n in d.meta["layers"]})
        self.deltas: dict[int, CompactDelta] = {
            s: get_method(d.meta.get("method", "sparse_qat")).compact(d, self.layout, self.device)
            for s, d in sorted(deltas.items())
        }
        self._lock = threading.RLock()
        self._cache: LRU[DecodedDelta] = LRU(cache_bytes, cache_items, size=lambda m: m.nbytes)
        self._caching = cache_bytes > 0 and cache_items >= 1
        self.timings = {"stage1_s": 0.0, "stage2_s": 0.0, "specialist_passes": 0, "images": 0}

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def materialized(self, s: int) -> DecodedDelta:
        """Superclass ``s``'s decoded delta: from the LRU when it is there, else decoded now
        (and kept when the LRU's bounds allow)."""
        return self._cache.get_or_make(s, self.deltas[s].decode)

    @property
    def cached_bytes(self) -> int:
        return self._cache.nbytes

    def resident_bytes(self) -> dict[str, int]:
        """What this predictor holds on its device, in bytes, by component; their sum is its
        memory apart from activations:

        * ``network`` — the resident network's parameters and buffers (with the flat buffer's
          alignment padding);
        * ``router`` — the trunk router's (0 without one);
        * ``deltas`` — every specialist's delta as held (:class:`CompactDelta`: about its stored
          bytes);
        * ``decoded_cache`` — decoded deltas kept in the LRU (``cache_bytes`` bounds it);
        * ``decode_working_set`` — the most that decoding and applying one routed group's delta
          holds at once (positions, values, the resident's saved entries), freed after the group.
        """
        return {
            "network": state_bytes(self.base) + self.layout.padding_bytes,
            "router": 0 if self.router is None else state_bytes(self.router),
            "deltas": sum(d.nbytes for d in self.deltas.values()),
            "decoded_cache": self._cache.nbytes,
            "decode_working_set": max((d.working_set for d in self.deltas.values()), default=0),
        }

    @torch.no_grad()
    def stage1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Trunk ``[B, ...]`` (the output of the stages before the first delta stage), superclass
        probabilities ``[B, S]`` and, for a vanilla resident routing with its own forward, its
        subclass probabilities ``[B, C]``. With a trunk router, stage one is the trunk and the
        router head only: no resident tail runs, so there is no resident answer to pool with."""
        with self._lock, self._autocast():
            trunk = self.base.forward_stages(x, 0, self.first_stage)
            if self.router is not None:
                return trunk, torch.softmax(self.router(trunk).float(), 1), None
            logits = self.base.forward_head(self.base.forward_stages(trunk, self.first_stage, len(STAGES))).float()
        probs = torch.softmax(logits, 1)
        if self.resident == "vanilla":
            return trunk, superclass_probs(probs, self.hierarchy), probs
        return trunk, probs, None

    @torch.no_grad()
    def specialist(self, s: int, trunk: torch.Tensor, delta: DecodedDelta | None = None) -> torch.Tensor:
        """Softmax ``[b, n_sub(+1)]`` of superclass ``s``'s specialist on trunk features ``[b, ...]``
        (``delta``: an already decoded delta, e.g. from a serving cache)."""
        d, owned = delta, False
        if d is None:
            d = self._cache.get(s)
        if d is None:
            d = self.deltas[s].decode()
            if self._caching:
                self._cache.put(s, d)
            else:
                owned = True  # this group's alone: the resident's entries can be added into its values
        buf, pos = self.layout.buffer, d.positions
        with self._lock:  # decoded outside it: another thread's group may run meanwhile
            self.layout.check()
            orig = buf.index_select(0, pos)
            try:  # W0[pos] + values, as applied() does (one add, in fp32)
                buf.scatter_(0, pos, d.values.add_(orig) if owned else orig + d.values)
                with self._autocast():
                    h = self.base.forward_stages_with(trunk, self.first_stage, len(STAGES), {}, d.bn)
                    return torch.softmax(self.base.forward_head(h, d.head).float(), 1)
            finally:
                buf.scatter_(0, pos, orig)  # the exact entries back, never a subtraction

    @torch.no_grad()
    def specialists(self, trunk: torch.Tensor, p: Plan) -> dict[int, torch.Tensor]:
        """Every routed group of a plan: ``{s: softmax [m_s, n_sub(+1)]}`` on its images' trunks."""
        return {s: self.specialist(s, trunk[b]) for s, (b, _) in p.calls.items()}

    # ------------------------------------------------------------------ batches
    @torch.no_grad()
    def outputs(self, x: torch.Tensor, routing: Routing, forced: torch.Tensor | None = None) -> StageOutputs:
        """Stage one and the specialists ``routing`` needs (or the ``forced`` superclass per
        image), as :class:`StageOutputs` for :func:`supersub.routing.combine`."""
        x = x.to(self.device)
        t0 = time.perf_counter()
        trunk, sup, resident_fine = self.stage1(x)
        t1 = time.perf_counter()
        p = plan(sup, routing, forced)
        out = assemble(self.hierarchy, sup, resident_fine, p, self.specialists(trunk, p))  # copies to the CPU
        self.timings["stage1_s"] += t1 - t0
        self.timings["stage2_s"] += time.perf_counter() - t1
        self.timings["specialist_passes"] += p.passes
        self.timings["images"] += x.shape[0]
        return out

    def run(self, x: torch.Tensor, top: int = 1, forced: torch.Tensor | None = None) -> StageOutputs:
        """Stage one and the specialists of every image's ``top`` most probable superclasses (or
        of the ``forced`` superclass per image: oracle routing), for recombining under several
        routings (calibration)."""
        top = min(top, self.hierarchy.num_superclasses)
        return self.outputs(x, Routing("soft", top) if top > 1 else Routing("hard"), forced)

    def predict(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine probabilities ``[B, C]`` and superclass probabilities ``[B, S]`` for images
        ``[B, 3, H, W]``, running only the specialists that ``routing`` needs."""
        out = self.outputs(x, routing)
        return combine(out, routing), out.super_probs

