"""The model deployments: what runs the networks behind the HTTP ingress.

* :class:`TwoStage` — stage one and the routed specialists in one replica, on one resident
  network. Inside the ingress replica (``graph=single``, the default: no hop) or as a deployment
  of its own behind it (``graph=fused``).
* :class:`Generalist` → :class:`Specialist` — the per-stage graph: stage one and routing inside
  the ingress replica, the specialists in a deployment of their own, one hop a request (what
  queued meanwhile goes together). What to run when the specialists should scale apart from
  stage one (many superclasses, several GPUs or nodes).
* :class:`Network` — one network over all subclasses (the vanilla baseline), same interface.

Every model replica holds each specialist's delta packed, in about its stored bytes, and decodes
a delta only for the group of images routed to it (:class:`supersub.predictor.TwoStagePredictor`
with the serving defaults, as ``supersub evaluate`` and the benchmarks' peer run it): any
replica answers any superclass, so Serve's least-loaded routing needs no affinity.

Every model deployment answers ``predict(x, routing)`` (a :class:`supersub.routing.Routing`,
resolved once by the ingress) with fine and superclass probabilities and its compute time, and
``health()`` by running a real (tiny) forward through every stage — the ingress's ``/healthz``
is only ok when that works — answering what each stage's replica holds in memory
(``TwoStagePredictor.resident_bytes``, by component, with their total). A replica runs that
forward once in its constructor too, so a bundle or device that cannot work fails ``serve run``
at start, not the first request. Requests are batched by :class:`serve.batching.Batcher`: what
queued while the model was busy runs as one forward, in one thread per model (the predictor
applies a delta to the resident's weights in place, under its own lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.batching import Batcher, Coalescer
from serve.retry import once_more_if_dead
from supersub.bundle import Bundle
from supersub.metrics import superclass_probs
from supersub.remote import ShippedBundle, open_resolved
from supersub.resnet import state_bytes
from supersub.routing import Routing, assemble, combine, plan


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here, or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda devices are served")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: no such CUDA device on this node")
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


def with_total(parts: dict[str, int]) -> dict[str, int]:
    """Bytes by component, and their sum as ``total``."""
    return {**parts, "total": sum(parts.values())}


def _split(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes))


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class TwoStage:
    """The fused deployment: stage one and the routed specialists of a batch in one replica."""

    def __init__(self, bundle: str | ShippedBundle, device: str = "cpu", batch_size: int = 16,
                 batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.predictor = b.predictor(check_device(device))
        self.size = b.image_size
        self.batcher = Batcher(self._batch, batch_size, batch_wait_ms)
        self._forward(torch.zeros(1, 3, self.size, self.size), [b.routing()])  # fail here, not at a request

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

    def _batch(self, requests: list[tuple[torch.Tensor, Routing]]) -> list[tuple]:
        per_image = [r for x, r in requests for _ in range(x.shape[0])]
        fine, sup, ms = self._forward(torch.cat([x for x, _ in requests]), per_image)
        sizes = [x.shape[0] for x, _ in requests]
        return [(f, s, ms) for f, s in zip(fine.split(sizes), sup.split(sizes))]

    async def predict(self, x: torch.Tensor, routing: Routing) -> dict[str, Any]:
        fine, sup, ms = await self.batcher.submit((x, routing))
        return {"fine": fine, "super": sup, "timing_ms": {"model": ms}}

    async def health(self) -> dict[str, dict[str, int]]:
        """A forward through stage one and two specialists; this replica's bytes by component."""
        x = torch.zeros(1, 3, self.size, self.size)
        await asyncio.to_thread(self._forward, x, [Routing("soft", min(2, self.predictor.hierarchy.num_superclasses))])
        return {"model": with_total(self.predictor.resident_bytes())}


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Specialist:
    """The resident network + one superclass's delta per forward, for every superclass."""

    def __init__(self, bundle: str | ShippedBundle, device: str = "cpu", batch_size: int = 16,
                 batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.predictor = b.predictor(check_device(device))
        self.batcher = Batcher(self._batch, batch_size, batch_wait_ms)
        trunk, _, _ = self.predictor.stage1(torch.zeros(1, 3, b.image_size, b.image_size))
        self.predictor.specialist(0, trunk)  # fail here, not at a request
        self._trunk_shape = tuple(trunk.shape[1:])

    def _batch(self, requests: list[dict[int, torch.Tensor]]) -> list[tuple[dict[int, torch.Tensor], float]]:
        """Each request's routed groups (superclass → its images' trunk features): one forward
        per superclass over every request's group for it."""
        t0 = time.perf_counter()
        by_superclass: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for i, groups in enumerate(requests):
            for s, trunk in groups.items():
                by_superclass.setdefault(s, []).append((i, trunk))
        out: list[dict[int, torch.Tensor]] = [{} for _ in requests]
        for s, parts in sorted(by_superclass.items()):
            trunk = torch.cat([t for _, t in parts]).to(self.predictor.device)
            probs = self.predictor.specialist(s, trunk).cpu()
            for (i, _), p in zip(parts, probs.split([t.shape[0] for _, t in parts])):
                out[i][s] = p
        ms = (time.perf_counter() - t0) * 1000
        return [(o, ms) for o in out]

    async def __call__(self, requests: list[dict[int, torch.Tensor]]) -> list[tuple[dict[int, torch.Tensor], float]]:
        """For each request, superclass → softmax ``[m, n_sub(+1)]`` of its specialist on the
        trunk features ``[m, ...]`` routed to it, and the compute time (ms) of the forwards."""
        return list(await asyncio.gather(*(self.batcher.submit(g) for g in requests)))

    async def health(self) -> dict[str, dict[str, int]]:
        await asyncio.to_thread(self.predictor.specialist, 0, torch.zeros(1, *self._trunk_shape))
        return {"specialist": with_total(self.predictor.resident_bytes())}


class Generalist:
    """Stage one and routing, run inside the ingress replica (``graph=stages``: the request's
    first model hop is not a hop), then every routed group of a request to :class:`Specialist`
    in one call, and ``combine``."""

    def __init__(self, specialist: DeploymentHandle, bundle: str | ShippedBundle, device: str = "cpu",
                 batch_size: int = 16, batch_wait_ms: float = 0.0) -> None:
        b = open_source(bundle)
        self.predictor = b.predictor(check_device(device))
        self.hierarchy, self.specialist, self.size = self.predictor.hierarchy, specialist, b.image_size
        self.batcher = Batcher(self._stage1, batch_size, batch_wait_ms)
        # One hop to the specialists for what queued meanwhile, not one per request: each hop
        # costs ~1–3 ms of CPU on both sides, which at c = 8 on 2 cores was the graph's limit.
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

    async def _ask(self, _key: None, requests: list[dict[int, torch.Tensor]]) -> list:
        return await once_more_if_dead(lambda: self.specialist.remote(requests))

    async def predict(self, x: torch.Tensor, routing: Routing) -> dict[str, Any]:
        """Images ``[B, 3, S, S]`` → fine probabilities ``[B, C]``, superclass probabilities
        ``[B, S]`` and per-stage compute times (ms)."""
        trunk, sup, resident, stage1_ms = await self.batcher.submit(x)
        p = plan(sup, routing)
        answers, ms = await self.fanout.submit(None, {s: trunk[b] for s, (b, _) in p.calls.items()})
        fine = combine(assemble(self.hierarchy, sup, resident, p, answers), routing)
        return {"fine": fine, "super": sup, "timing_ms": {"generalist": stage1_ms, "specialist": ms}}

    async def health(self) -> dict[str, dict[str, int]]:
        await asyncio.to_thread(self.predictor.stage1, torch.zeros(1, 3, self.size, self.size))
        return {"generalist": with_total(self.predictor.resident_bytes()), **await self.specialist.health.remote()}


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

    async def predict(self, x: torch.Tensor, routing: Routing | None = None) -> dict[str, Any]:
        fine, sup, ms = await self.batcher.submit(x)
        return {"fine": fine, "super": sup, "timing_ms": {"network": ms}}

    async def health(self) -> dict[str, dict[str, int]]:
        await asyncio.to_thread(self._forward, torch.zeros(1, 3, self.size, self.size))
        return {"network": with_total({"network": state_bytes(self.net)})}
