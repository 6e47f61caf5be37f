"""The Ray Serve deployment graph and its HTTP API.

::

    HTTP ─▶ Ingress ──────────▶ Generalist ──────────────────▶ Specialist ×R
            decode, validate    stage one (batched):           base + delta[superclass]
            preprocess, JSON    trunk, p(super)[, p(sub)];     multiplexed by superclass id,
                                routing plan, fan-out, combine  batched per superclass

One deployment per stage, wired with ``.bind()``; each stage calls the next through a
``DeploymentHandle``. A Specialist replica keeps ONE copy of the resident network and an LRU of
materialised deltas (``@serve.multiplexed``, keyed by the hierarchy's superclass id, so Serve
routes a superclass to the replicas that already hold its delta). A delta is applied to the
weights in place for one batch and taken off again, under a lock: ``@serve.batch`` runs the
sub-batches of different superclasses concurrently, and two deltas on one network at once would
be a wrong answer, not an error.

Applications (``serve run serve.app:app bundle=PATH [routing=soft:2] [device=cpu]``):

* :func:`app` — the two-stage Super-Sub model.
* :func:`vanilla_app` — the bundle's vanilla network alone, same API, for load comparisons.
"""

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from serve.bundles import open_bundle
from serve.images import BadInput, Limits, decode, preprocessor, request_images
from serve.schemas import PREDICT_BODY, Health, Prediction, Predictions, Problem
from supersub.bundle import Bundle
from supersub.data.dataset import eval_draft_size
from supersub.delta import MaterializedDelta, materialize
from supersub.errors import BundleError
from supersub.hierarchy import Hierarchy
from supersub.metrics import superclass_probs
from supersub.predictor import RoutingConfig, assemble, combine, plan

log = logging.getLogger("ray.serve")


# ------------------------------------------------------------------------------ app arguments
class AppArgs(BaseModel):
    """``serve run serve.app:app key=value ...`` / ``args:`` in config.yaml."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="bundle directory, or an MLflow artifact URI (runs:/..., models:/...)")
    routing: str | None = Field(None, description="hard, soft or soft:K; default: the bundle's calibrated routing")
    threshold: float | None = Field(None, description="override the routing's confidence threshold")
    resident_weight: float | None = Field(None, description="override the routing's resident_weight α")
    device: str = Field("cpu", description="torch device of the model replicas")
    max_body_bytes: int = Field(Limits.max_body_bytes, gt=0)
    max_pixels: int = Field(Limits.max_pixels, gt=0)
    max_batch: int = Field(Limits.max_batch, gt=0, description="images per request")
    max_deltas: int = Field(4, gt=0, description="materialised deltas per Specialist replica (LRU)")
    batch_size: int = Field(16, gt=0, description="@serve.batch max_batch_size (requests per batch)")
    batch_wait_ms: float = Field(
        2.0, ge=0, description="@serve.batch wait for a fuller batch; paid by every request at low load"
    )

    @property
    def limits(self) -> Limits:
        return Limits(self.max_body_bytes, self.max_pixels, self.max_batch)


def resolve_routing(bundle: Bundle, args: AppArgs) -> RoutingConfig:
    base = RoutingConfig.parse(args.routing) if args.routing else bundle.routing()
    changes = {k: v for k, v in (("threshold", args.threshold), ("resident_weight", args.resident_weight)) if v is not None}
    return dataclasses.replace(base, **changes)  # __post_init__ validates the result


def _batching(method: Any, size: int, wait_ms: float) -> None:
    # @serve.batch takes its limits at class definition; app arguments set them per replica.
    method.set_max_batch_size(size)
    method.set_batch_wait_timeout_s(wait_ms / 1000)


def _split(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes))


# ------------------------------------------------------------------------------ model stages
@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Specialist:
    """The resident network + the delta of one superclass per batch; deltas multiplexed."""

    def __init__(self, bundle: str, device: str = "cpu", max_deltas: int = 4, batch_size: int = 16, batch_wait_ms: float = 2.0) -> None:
        # One resident network; its deltas stay packed in host memory until multiplexed in.
        self.predictor = predictor = open_bundle(bundle).predictor(device)
        self.device, self.packed = predictor.device, predictor.deltas
        self.index = {sup.id: i for i, sup in enumerate(predictor.hierarchy.superclasses)}
        # One network, many deltas: apply → forward → restore must never interleave.
        self.lock = threading.Lock()

        async def load_delta(superclass_id: str) -> MaterializedDelta:
            return await asyncio.to_thread(materialize, self.packed[self.index[superclass_id]], self.device)

        # Wrapped here, not with a decorator, so that the LRU size is an app argument.
        self.delta = serve.multiplexed(max_num_models_per_replica=max_deltas)(load_delta)
        _batching(self.batched, batch_size, batch_wait_ms)

    def _forward(self, s: int, delta: MaterializedDelta, trunk: torch.Tensor) -> tuple[torch.Tensor, float]:
        with self.lock:
            t0 = time.perf_counter()
            probs = self.predictor.specialist(s, trunk.to(self.device), delta).cpu()
            return probs, (time.perf_counter() - t0) * 1000

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def batched(self, trunks: list[torch.Tensor]) -> list[tuple[torch.Tensor, float]]:
        # Serve splits batches by multiplexed model id: every item here is for one superclass.
        superclass_id = serve.get_multiplexed_model_id()
        delta = await self.delta(superclass_id)
        probs, ms = await asyncio.to_thread(self._forward, self.index[superclass_id], delta, torch.cat(trunks))
        return [(p, ms) for p in probs.split([t.shape[0] for t in trunks])]

    async def __call__(self, trunk: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Softmax ``[m, n_sub(+1)]`` of the specialist named by the request's multiplexed model
        id on trunk features ``[m, ...]``, and the compute time (ms) of its batch."""
        return await self.batched(trunk)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Generalist:
    """Stage one on the resident network, then routing, specialist fan-out and ``combine``."""

    def __init__(
        self,
        specialist: DeploymentHandle,
        bundle: str,
        routing: RoutingConfig,
        device: str = "cpu",
        batch_size: int = 16,
        batch_wait_ms: float = 2.0,
    ) -> None:
        self.predictor = open_bundle(bundle).predictor(device)
        self.hierarchy, self.routing, self.specialist = self.predictor.hierarchy, routing, specialist
        self.ids = self.hierarchy.superclass_ids
        _batching(self.stage1, batch_size, batch_wait_ms)

    def _stage1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            trunk, sup, resident = self.predictor.stage1(x.to(self.predictor.device))
        ms = (time.perf_counter() - t0) * 1000
        # The trunk goes to the specialists as is: stages before first_stage are not recomputed.
        return trunk.cpu(), sup.cpu(), None if resident is None else resident.cpu(), ms

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def stage1(self, xs: list[torch.Tensor]) -> list[tuple]:
        trunk, sup, resident, ms = await asyncio.to_thread(self._stage1, torch.cat(xs))
        sizes = [x.shape[0] for x in xs]
        return [(*parts, ms) for parts in zip(_split(trunk, sizes), _split(sup, sizes), _split(resident, sizes))]

    async def _ask(self, s: int, trunk: torch.Tensor) -> tuple[torch.Tensor, float]:
        handle = self.specialist.options(multiplexed_model_id=self.ids[s])
        try:
            return await handle.remote(trunk)
        except RayActorError as e:
            # The replica died under this call (crash, node loss, kill). The call is pure and
            # idempotent, so one retry — Serve routes it to a live replica — turns a replica
            # restart into latency instead of a failed request. A second failure is real.
            log.warning("specialist %s: replica lost (%s); retrying once", self.ids[s], type(e).__name__)
            return await handle.remote(trunk)

    async def predict(self, x: torch.Tensor) -> dict[str, Any]:
        """Images ``[B, 3, S, S]`` → fine probabilities ``[B, C]``, superclass probabilities
        ``[B, S]`` and per-stage compute times (ms)."""
        trunk, sup, resident, stage1_ms = await self.stage1(x)
        p = plan(sup, self.routing)
        answers = await asyncio.gather(*(self._ask(s, trunk[b]) for s, (b, _) in p.calls.items()))
        fine = combine(assemble(self.hierarchy, sup, resident, p, {s: a[0] for s, a in zip(p.calls, answers)}), self.routing)
        return {"fine": fine, "super": sup, "timing_ms": {"generalist": stage1_ms, "specialist": sum(a[1] for a in answers)}}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Network:
    """One network over all subclasses (the vanilla baseline), same interface as Generalist."""

    def __init__(self, bundle: str, device: str = "cpu", batch_size: int = 16, batch_wait_ms: float = 2.0) -> None:
        b = open_bundle(bundle)
        net = b.load_base() if b.resident == "vanilla" else b.load_baseline("vanilla")
        self.device = torch.device(device)
        self.net, self.hierarchy = net.to(self.device).eval(), b.hierarchy
        _batching(self.forward, batch_size, batch_wait_ms)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            fine = torch.softmax(self.net(x.to(self.device)).float(), 1)
            sup = superclass_probs(fine, self.hierarchy)
        return fine.cpu(), sup.cpu(), (time.perf_counter() - t0) * 1000

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def forward(self, xs: list[torch.Tensor]) -> list[tuple]:
        fine, sup, ms = await asyncio.to_thread(self._forward, torch.cat(xs))
        sizes = [x.shape[0] for x in xs]
        return [(f, s, ms) for f, s in zip(fine.split(sizes), sup.split(sizes))]

    async def predict(self, x: torch.Tensor) -> dict[str, Any]:
        fine, sup, ms = await self.forward(x)
        return {"fine": fine, "super": sup, "timing_ms": {"network": ms}}


# ------------------------------------------------------------------------------ HTTP
api = FastAPI(
    title="supersub",
    description="Super-Sub two-stage classification (Wen et al. 2022): generalist → superclass → specialist → subclass",
)


@api.exception_handler(BadInput)
async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse({"detail": exc.reason}, status_code=exc.status)


# Failures of the model replicas (dying, overloaded): the client may retry; not its fault, not a bug.
_UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)
_ERRORS = {c: {"model": Problem} for c in (400, 413, 415, 422, 503)}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP: request parsing and validation, decoding, preprocessing, the JSON answer."""

    def __init__(self, model: DeploymentHandle, info: dict[str, Any], limits: Limits) -> None:
        self.model, self.info, self.limits = model, info, limits
        h = Hierarchy.from_dict(info["hierarchy"])
        self.supers, self.subs, self.num_subclasses = h.superclasses, h.subclasses, h.num_subclasses
        self.transform = preprocessor(info["image_size"])
        self.draft_size = eval_draft_size(info["image_size"])

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", **{k: v for k, v in self.info.items() if k != "hierarchy"},
                "superclasses": len(self.supers), "subclasses": self.num_subclasses}

    @api.get("/hierarchy")
    async def hierarchy(self) -> dict[str, Any]:
        """The bundle's hierarchy JSON: superclasses and their subclasses, in model order."""
        return self.info["hierarchy"]

    def _prepare(self, images: list[bytes]) -> tuple[torch.Tensor, list[float]]:
        tensors, ms = [], []
        for i, data in enumerate(images):
            t0 = time.perf_counter()
            try:
                tensors.append(self.transform(decode(data, self.limits.max_pixels, self.draft_size)))
            except BadInput as e:
                raise BadInput(e.status, f"image {i}: {e.reason}" if len(images) > 1 else e.reason) from None
            ms.append((time.perf_counter() - t0) * 1000)
        return torch.stack(tensors), ms

    @api.post(
        "/predict",
        response_model=Prediction | Predictions,
        openapi_extra=PREDICT_BODY,
        responses=_ERRORS,
        summary="Classify images: superclass, subclass, top-k subclasses",
    )
    async def predict(self, request: Request, top_k: int = Query(5, ge=1, le=1000)) -> dict[str, Any]:
        """One image as the raw body (image/jpeg, image/png, ...), one or more multipart
        ``file`` parts, or JSON ``{"image": base64}`` / ``{"images": [base64, ...]}``. A batch
        (``images``, several files) is answered ``{"predictions": [...]}``."""
        t0 = time.perf_counter()
        images, batch = await request_images(request, self.limits)
        x, decode_ms = await run_in_threadpool(self._prepare, images)
        try:
            out = await self.model.predict.remote(x)
        except _UNAVAILABLE as e:
            return JSONResponse({"detail": f"model unavailable, retry later ({type(e).__name__})"}, status_code=503)
        total = (time.perf_counter() - t0) * 1000
        preds = [
            self._answer(fine, sup, top_k, {"decode": d, **out["timing_ms"], "total": total})
            for fine, sup, d in zip(out["fine"].tolist(), out["super"].tolist(), decode_ms)
        ]
        return {"predictions": preds} if batch else preds[0]

    def _answer(self, fine: list[float], sup: list[float], k: int, timing: dict[str, float]) -> dict[str, Any]:
        s = max(range(len(sup)), key=sup.__getitem__)
        order = sorted(range(len(fine)), key=fine.__getitem__, reverse=True)[: min(k, len(fine))]
        f = order[0]
        return {
            "superclass": {"index": s, "id": self.supers[s].id, "name": self.supers[s].name, "probability": sup[s]},
            "subclass": {"index": f, "id": self.subs[f].id, "name": self.subs[f].name, "probability": fine[f]},
            "top_k": [{"id": self.subs[i].id, "name": self.subs[i].name, "probability": fine[i]} for i in order],
            "timing_ms": timing,
        }


# ------------------------------------------------------------------------------ builders
def _info(name: str, ref: str, bundle: Bundle, routing: RoutingConfig | None) -> dict[str, Any]:
    return {
        "app": name,
        "bundle": ref,
        "resident": bundle.resident,
        "routing": None if routing is None else dataclasses.asdict(routing),
        "image_size": bundle.image_size,
        "hierarchy": bundle.hierarchy.to_dict(),
    }


def app(args: dict[str, Any]) -> Application:
    """The two-stage application: Ingress → Generalist → Specialist."""
    a = AppArgs.model_validate(args)
    bundle = open_bundle(a.bundle)  # here too, so that a bad bundle fails `serve run` at once
    routing = resolve_routing(bundle, a)
    specialist = Specialist.bind(a.bundle, a.device, a.max_deltas, a.batch_size, a.batch_wait_ms)
    generalist = Generalist.bind(specialist, a.bundle, routing, a.device, a.batch_size, a.batch_wait_ms)
    return Ingress.bind(generalist, _info("two-stage", a.bundle, bundle, routing), a.limits)


def vanilla_app(args: dict[str, Any]) -> Application:
    """The bundle's vanilla network alone, behind the same HTTP API."""
    a = AppArgs.model_validate(args)
    bundle = open_bundle(a.bundle)
    if bundle.resident != "vanilla" and "vanilla" not in bundle.baseline_names:
        raise BundleError(f"bundle {a.bundle} has no vanilla network (resident {bundle.resident!r}, no 'vanilla' baseline)")
    network = Network.bind(a.bundle, a.device, a.batch_size, a.batch_wait_ms)
    return Ingress.bind(network, _info("vanilla", a.bundle, bundle, None), a.limits)
