"""The model deployments: what runs the networks behind the HTTP ingress.

* :class:`TwoStage` — stage one and the routed specialists in one replica, on one resident
  network, with decoded deltas in an LRU. Inside the ingress replica (``graph=single``, the
  default: no hop) or as a deployment of its own behind it (``graph=fused``).
* :class:`Generalist` → :class:`Specialist` — the per-stage graph: stage one and routing in one
  deployment, specialists in another, multiplexed by superclass (Serve sends a superclass to the
  replicas already holding its delta) and batched per superclass. Two hops; what to run when the
  specialists should scale apart from stage one (many superclasses, several GPUs or nodes).
* :class:`Network` — one network over all subclasses (the vanilla baseline), same interface.

Every model deployment answers ``predict(x, routing)`` with fine and superclass probabilities and
its compute time, and ``health()`` by running a real (tiny) forward through every stage — the
ingress's ``/healthz`` is only ok when that works. A replica runs that forward once in its
constructor too, so a bundle or device that cannot work fails ``serve run`` at start, not the
first request. Requests are batched by :class:`serve.batching.Batcher`: what queued while the
model was busy runs as one forward, in one thread per model (the predictor applies a delta to
the resident's weights in place, under its own lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from serve.batching import Batcher, Coalescer
from supersub.bundle import Bundle
from supersub.delta import MaterializedDelta
from supersub.metrics import superclass_probs
from supersub.remote import ShippedBundle, open_resolved
from supersub.routing import Routing, assemble, combine, plan


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here, or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: no such CUDA device on this node")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda devices are served")
    return dev


def open_source(source: str | ShippedBundle) -> Bundle:
    """The bundle the app's builder resolved (serve.app.replica_source): a folder, or files by
    value written under this node's Ray session folder (they go with Ray's other session files)."""
    scratch = None
    if isinstance(source, ShippedBundle):
        with contextlib.suppress(Exception):  # not in a Ray worker (a test, a script): the temporary folder
            import ray._private.worker as worker

            scratch = f"{worker._global_node.get_session_dir_path()}/supersub-bundles"
    return open_resolved(source, scratch)


def _split(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes))


def _groups(keys: list[int]) -> dict[int, list[int]]:
    """Request indices by key: a batch may mix requests for different superclasses."""
    out: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class TwoStage:
    """The fused deployment: stage one and the routed specialists of a batch in one replica."""

    def __init__(self, bundle: str | ShippedBundle, device: str = "cpu", max_deltas: int = 16, batch_size: int = 16,
                 batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.predictor = b.predictor(check_device(device), cache_items=max_deltas, cache_bytes=0)
        self.size = b.image_size
        self.batcher = Batcher(self._batch, batch_size, batch_wait_ms)
        self._forward(torch.zeros(1, 3, self.size, self.size), [b.routing()] * 1)  # fail here, not at a request

    def _forward(self, x: torch.Tensor, routings: list[Routing]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``routings``: one per image. One pass over the union of what they need (stage one
        once, each routed specialist once), then each image combined under its own routing."""
        t0 = time.perf_counter()
        kinds = set(routings)
        union = routings[0] if len(kinds) == 1 else Routing(
            "soft", max(r.k for r in kinds), max(r.threshold if r.mode == "soft" else 0.0 for r in kinds) or 1.0)
        out = self.predictor.outputs(x.to(self.predictor.device), union)
        if len(kinds) == 1:
            fine = combine(out, routings[0])
        else:
            fine = torch.stack([combine(out, r)[i] for i, r in enumerate(routings)])
        return fine, out.super_probs, (time.perf_counter() - t0) * 1000

    def _batch(self, requests: list[tuple[torch.Tensor, str]]) -> list[tuple]:
        per_image = [Routing.parse(r) for x, r in requests for _ in range(x.shape[0])]
        fine, sup, ms = self._forward(torch.cat([x for x, _ in requests]), per_image)
        sizes = [x.shape[0] for x, _ in requests]
        return [(f, s, ms) for f, s in zip(fine.split(sizes), sup.split(sizes))]

    async def predict(self, x: torch.Tensor, routing: str) -> dict[str, Any]:
        fine, sup, ms = await self.batcher.submit((x, routing))
        return {"fine": fine, "super": sup, "timing_ms": {"model": ms}}

    async def health(self) -> bool:
        x = torch.zeros(1, 3, self.size, self.size)
        await asyncio.to_thread(self._forward, x, [Routing("soft", min(2, self.predictor.hierarchy.num_superclasses))])
        return True


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Specialist:
    """The resident network + the delta of one superclass per forward; decoded deltas multiplexed."""

    def __init__(self, bundle: str | ShippedBundle, device: str = "cpu", max_deltas: int = 4, batch_size: int = 16,
                 batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.predictor = predictor = b.predictor(check_device(device))
        self.index = {sup.id: i for i, sup in enumerate(predictor.hierarchy.superclasses)}

        async def load_delta(superclass_id: str) -> MaterializedDelta:
            return await asyncio.to_thread(predictor.materialized, self.index[superclass_id])

        # Wrapped here, not with a decorator, so that the LRU size is an app argument.
        self.delta = serve.multiplexed(max_num_models_per_replica=max_deltas)(load_delta)
        self.batcher = Batcher(self._batch, batch_size, batch_wait_ms)
        self._trunk_shape = self._warm(b.image_size)

    def _warm(self, size: int) -> tuple[int, ...]:
        """One specialist forward (fails here, not at a request); returns the trunk's shape."""
        trunk, _, _ = self.predictor.stage1(torch.zeros(1, 3, size, size))
        self.predictor.specialist(0, trunk)
        return tuple(trunk.shape[1:])

    def _batch(self, requests: list[tuple[int, MaterializedDelta, torch.Tensor]]) -> list[tuple[torch.Tensor, float]]:
        """One forward per superclass among ``requests`` (superclass, its delta, trunk features)."""
        out: list[tuple[torch.Tensor, float]] = [None] * len(requests)  # type: ignore[list-item]
        for s, idx in _groups([s for s, _, _ in requests]).items():
            t0 = time.perf_counter()
            trunk = torch.cat([requests[i][2] for i in idx]).to(self.predictor.device)
            probs = self.predictor.specialist(s, trunk, requests[idx[0]][1]).cpu()
            ms = (time.perf_counter() - t0) * 1000
            for i, p in zip(idx, probs.split([requests[i][2].shape[0] for i in idx])):
                out[i] = (p, ms)
        return out

    async def __call__(self, trunk: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Softmax ``[m, n_sub(+1)]`` of the specialist named by the request's multiplexed model
        id on trunk features ``[m, ...]``, and the compute time (ms) of its forward."""
        superclass_id = serve.get_multiplexed_model_id()
        return await self.batcher.submit((self.index[superclass_id], await self.delta(superclass_id), trunk))

    async def health(self) -> bool:
        trunk = torch.zeros(1, *self._trunk_shape)
        await asyncio.to_thread(self.predictor.specialist, 0, trunk)
        return True


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Generalist:
    """Stage one on the resident network, then routing, specialist fan-out and ``combine``."""

    def __init__(self, specialist: DeploymentHandle, bundle: str | ShippedBundle, device: str = "cpu", batch_size: int = 16,
                 batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.predictor = b.predictor(check_device(device))
        self.hierarchy, self.specialist, self.size = self.predictor.hierarchy, specialist, b.image_size
        self.ids = self.hierarchy.superclass_ids
        self.batcher = Batcher(self._stage1, batch_size, batch_wait_ms)
        # One hop to the specialists per superclass for what queued meanwhile, not one per request:
        # each hop costs ~1–3 ms of CPU on both sides, which at c = 8 on 2 cores was the graph's limit.
        self.fanout = Coalescer(self._ask, limit=2, max_items=batch_size)
        self.predictor.stage1(torch.zeros(1, 3, self.size, self.size))  # fail here, not at a request

    def _stage1(self, xs: list[torch.Tensor]) -> list[tuple]:
        t0 = time.perf_counter()
        trunk, sup, resident = self.predictor.stage1(torch.cat(xs).to(self.predictor.device))
        ms = (time.perf_counter() - t0) * 1000
        # The trunk goes to the specialists as is: stages before first_stage are not recomputed.
        trunk, sup, resident = trunk.cpu(), sup.cpu(), None if resident is None else resident.cpu()
        sizes = [x.shape[0] for x in xs]
        return [(*parts, ms) for parts in zip(_split(trunk, sizes), _split(sup, sizes), _split(resident, sizes))]

    async def _ask(self, s: int, trunks: list[torch.Tensor]) -> list[tuple[torch.Tensor, float]]:
        """Specialist ``s`` on the trunk features of several requests, in one call."""
        handle = self.specialist.options(multiplexed_model_id=self.ids[s])
        trunk = torch.cat(trunks) if len(trunks) > 1 else trunks[0]
        try:
            probs, ms = await handle.remote(trunk)
        except RayActorError:
            # The replica died under this call (crash, node loss, kill). The call is pure and
            # idempotent, so one retry — Serve routes it to a live replica — turns a replica
            # restart into latency instead of a failed request. A second failure is real.
            probs, ms = await handle.remote(trunk)
        return [(p, ms) for p in probs.split([t.shape[0] for t in trunks])]

    async def predict(self, x: torch.Tensor, routing: str) -> dict[str, Any]:
        """Images ``[B, 3, S, S]`` → fine probabilities ``[B, C]``, superclass probabilities
        ``[B, S]`` and per-stage compute times (ms)."""
        r = Routing.parse(routing)
        trunk, sup, resident, stage1_ms = await self.batcher.submit(x)
        p = plan(sup, r)
        answers = await asyncio.gather(*(self.fanout.submit(s, trunk[b]) for s, (b, _) in p.calls.items()))
        fine = combine(assemble(self.hierarchy, sup, resident, p, {s: a[0] for s, a in zip(p.calls, answers)}), r)
        return {"fine": fine, "super": sup, "timing_ms": {"generalist": stage1_ms, "specialist": sum(a[1] for a in answers)}}

    async def health(self) -> bool:
        await asyncio.to_thread(self.predictor.stage1, torch.zeros(1, 3, self.size, self.size))
        return await self.specialist.options(multiplexed_model_id=self.ids[0]).health.remote()


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Network:
    """One network over all subclasses (the vanilla baseline), same interface as the others."""

    def __init__(self, bundle: str | ShippedBundle, device: str = "cpu", batch_size: int = 16, batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.device = check_device(device)
        self.net, self.hierarchy, self.size = b.load_vanilla().to(self.device).eval(), b.hierarchy, b.image_size
        self.batcher = Batcher(self._batch, batch_size, batch_wait_ms)
        self._forward(torch.zeros(1, 3, self.size, self.size))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            fine = torch.softmax(self.net(x.to(self.device)).float(), 1)
            sup = superclass_probs(fine, self.hierarchy)
        return fine.cpu(), sup.cpu(), (time.perf_counter() - t0) * 1000

    def _batch(self, xs: list[torch.Tensor]) -> list[tuple]:
        fine, sup, ms = self._forward(torch.cat(xs))
        sizes = [x.shape[0] for x in xs]
        return [(f, s, ms) for f, s in zip(fine.split(sizes), sup.split(sizes))]

    async def predict(self, x: torch.Tensor, routing: str | None = None) -> dict[str, Any]:
        fine, sup, ms = await self.batcher.submit(x)
        return {"fine": fine, "super": sup, "timing_ms": {"network": ms}}

    async def health(self) -> bool:
        await asyncio.to_thread(self._forward, torch.zeros(1, 3, self.size, self.size))
        return True
