"""The Ray Serve applications and their HTTP API.

::

    HTTP ─▶ Ingress[TwoStage]                                        (graph=single, the default)
    HTTP ─▶ Ingress ─────────────▶ TwoStage                          (graph=fused)
            parse, validate,        stage one + routed specialists,
            decode (budgeted,       one resident network, deltas held
            off the event loop),    packed, decoded per routed group
            routing resolved once,
            JSON
    HTTP ─▶ Ingress[Generalist] ─────▶ Specialist ×R                 (graph=stages)
            stage one, routing,          resident + the routed
            one hop a request            superclasses' deltas, batched

Applications (``serve run serve.app:app bundle=PATH [routing=...] [graph=single|fused|stages] [device=cpu]``,
or ``python -m serve bundle=PATH ...``, which also drains on SIGTERM):

* :func:`app` — the two-stage Super-Sub model; ``routing`` is a routing the bundle stores by
  name (``hard``, ``soft``, ``soft_pooled``, ...) or an explicit one (``soft:2@0.7+0.5``), by
  default the one the bundle serves; a request may ask for another with ``?routing=``. Every
  answer says which routing produced it.
* :func:`vanilla_app` — the bundle's vanilla network alone, same API, for load comparisons.

Every setting is checked when the app is built (``serve run`` fails at once with one line), and
every model replica runs a forward in its constructor; ``/healthz`` is ok only when every stage
answers a real forward, else 503, and says what each stage's replica holds in memory
(``resident_bytes``: :meth:`supersub.predictor.TwoStagePredictor.resident_bytes` by component,
with their total). A routing is resolved once, where it enters — the app's at build, a request's
``?routing=`` in the ingress — into a :class:`supersub.routing.Routing`, which is what the
model deployments receive.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request,
# Query) at runtime, and Serve's class-based ingress wraps the methods where strings cannot resolve.
import asyncio
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from serve.deployments import Generalist, Network, Specialist, TwoStage, check_device
from serve.drain import DrainWatch
from serve.images import BadInput, Limits, decode_all, preprocessor, request_images
from serve.retry import once_more_if_dead
from serve.schemas import PREDICT_BODY, Health, Prediction, Predictions, Problem
from supersub.bundle import Bundle, verify_files
from supersub.data.dataset import eval_draft_size
from supersub.errors import BundleError
from supersub.hierarchy import Hierarchy
from supersub.remote import ShippedBundle, open_bundle, place, ship
from supersub.routing import Routing

# ------------------------------------------------------------------------------ app arguments
# Bundles travel by value inside the deployments' arguments, which Serve's controller keeps (and
# checkpoints) for as long as the app runs: beyond this, a shared folder (bundle_cache).
SHIP_MAX_MIB = 64


class AppArgs(BaseModel):
    """``serve run serve.app:app key=value ...`` / ``args:`` in config.yaml. Every value is
    checked here: a setting that cannot work is refused at start, not at the first request."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(description="bundle folder, or an MLflow URI (runs:/<id>/bundle, models:/<name>/<version>)")
    routing: str | None = Field(None, description="a routing the bundle stores (hard, soft, soft_pooled, ...) or an "
                                "explicit one (soft:2@0.7+0.5); default: the one the bundle serves")
    graph: Literal["single", "fused", "stages"] = Field(
        "single", description="single: the model inside the HTTP ingress replica (no handle hop); fused: one model "
        "deployment behind the ingress (scales apart from decoding); stages: stage one in the ingress replica, "
        "the specialists a deployment of their own (scale apart from stage one)")
    device: str = Field("cpu", description="torch device of the model replicas (checked where the app is built)")
    replicas: int = Field(2, ge=1, le=64, description="replicas of each deployment of the graph (graph=single: of "
                          "the ingress, which holds the model). 2 by default, so that one may die (crash, kill, node "
                          "loss) while the other answers; 1 saves a replica's memory (~0.9 GB for a small model on "
                          "CPU) and has no redundancy")
    max_body_bytes: int = Field(Limits.max_body_bytes, gt=0)
    max_pixels: int = Field(Limits.max_pixels, gt=0, description="pixels of one image (read before decoding)")
    max_request_pixels: int = Field(Limits.max_request_pixels, gt=0, description="pixels of all a request's images")
    max_batch: int = Field(Limits.max_batch, gt=0, description="images per request")
    body_timeout_s: float = Field(Limits.body_timeout_s, gt=0, le=3600, description="the body must arrive within this")
    decode_timeout_s: float = Field(Limits.decode_timeout_s, gt=0, le=3600, description="decoding budget per request")
    max_deltas: int | None = Field(None, gt=0, description="deprecated, no effect: a model replica keeps no decoded "
                                   "delta (each held packed, about its stored bytes, and decoded for the group "
                                   "routed to it); accepted so that existing configs still start")
    batch_size: int = Field(16, gt=0, le=1024, description="requests per batch: a model replica runs what queued "
                            "while it was busy, up to this many, in one forward (serve/batching.py)")
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="wait this long after a batch's first request for "
                                 "more (0: an idle replica runs a request at once)")
    bundle_cache: str | None = Field(None, description="a folder every replica node can read (a shared filesystem): "
                                     "the bundle is placed there once (downloaded from MLflow, or copied from its "
                                     "folder) and the replicas read it there. Without it the bundle's files travel "
                                     f"with the deployment through Ray to every replica (no shared disk; at most "
                                     f"{SHIP_MAX_MIB} MiB). Either way the bundle is resolved once, here: replicas never "
                                     "open the tracking store")
    drain: str | None = Field(None, description="the name of a drain flag (serve/drain.py) that every ingress "
                              "replica, on every node, watches: while it is set /healthz answers 503 with the "
                              "requests still in flight and, after its grace, /predict 503 + Retry-After (python -m "
                              "serve creates and sets one; for serve deploy: python -m serve.drain NAME)")

    @field_validator("body_timeout_s", "decode_timeout_s", "batch_wait_ms")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @property
    def limits(self) -> Limits:
        return Limits(self.max_body_bytes, self.max_pixels, self.max_request_pixels, self.max_batch,
                      self.body_timeout_s, self.decode_timeout_s)


class Routings:
    """The routings an app answers with: its default, the bundle's stored ones by name, and any
    explicit one the bundle can run. The one resolver of a routing's name or spelling into a
    :class:`Routing`: at build (the app's) and in the ingress (a request's ``?routing=``)."""

    CACHED = 64  # explicit spellings kept parsed, so a client asking for one each time parses it once

    def __init__(self, default: Routing, stored: dict[str, Routing], num_superclasses: int, stage_one: str) -> None:
        self.default, self.stored = default, dict(stored)
        self.num_superclasses, self.stage_one = num_superclasses, stage_one
        self._parsed: dict[str, Routing] = {}

    @classmethod
    def of(cls, bundle: Bundle, default: Routing | None = None) -> "Routings":
        return cls(default or bundle.routing(), bundle.routings, bundle.hierarchy.num_superclasses, bundle.stage_one)

    def resolve(self, spec: str | None) -> Routing:
        """The routing ``spec`` names: the default (None), a stored one by name, or an explicit
        routing taken exactly as written (nothing of the bundle's calibration is mixed in);
        a ValueError saying why when this bundle cannot run it."""
        if spec is None:
            return self.check(self.default)
        if spec in self.stored:
            return self.check(self.stored[spec], spec)
        r = self._parsed.get(spec)
        if r is None:
            r = self.check(Routing.parse(spec), spec)
            if len(self._parsed) < self.CACHED:
                self._parsed[spec] = r
        return r

    def check(self, r: Routing, spelled: str | None = None) -> Routing:
        return check_routing(r, self.num_superclasses, self.stage_one, spelled)


def check_routing(r: Routing, num_superclasses: int, stage_one: str, spelled: str | None = None) -> Routing:
    """``r`` if this bundle can run it, else a ValueError saying why: soft ``k`` is at most the
    number of superclasses, pooling (+α) needs the vanilla network's answer in stage one
    (``stage_one``: :attr:`supersub.bundle.Bundle.stage_one`)."""
    name = spelled or str(r)
    if r.k > num_superclasses:
        raise ValueError(f"routing {name}: k = {r.k} but the bundle has {num_superclasses} superclasses")
    if r.resident_weight > 0 and stage_one != "vanilla":
        raise ValueError(f"routing {name}: pooling (+α) needs the vanilla network's own answer in stage one; "
                         f"this bundle's stage one is {stage_one}")
    return r


def resolve_routing(bundle: Bundle, spec: str | None) -> Routing:
    """The routing ``spec`` names for this bundle (:meth:`Routings.resolve`): its served one
    (None), one it stores by name, or an explicit one."""
    return Routings.of(bundle).resolve(spec)


# ------------------------------------------------------------------------------ HTTP
api = FastAPI(
    title="supersub",
    description="Super-Sub two-stage classification (Wen et al. 2022): generalist → superclass → specialist → subclass. "
    "The OpenAPI document is at /openapi.json (no /docs page: its Swagger UI would load from a CDN).",
    docs_url=None,
    redoc_url=None,
)


@api.exception_handler(BadInput)
async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse({"detail": exc.reason}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _invalid_query(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (``top_k=0``) as every other error: ``detail`` one string, the first problem."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ())) or "request"
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')} (got {first.get('input')!r})"},
                        status_code=422)


# Failures of the model replicas (dying, overloaded): the client may retry; not its fault, not a bug.
_UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, asyncio.TimeoutError)
_ERRORS = {c: {"model": Problem} for c in (400, 408, 413, 415, 422, 503)}
_QUERY = {"top_k", "routing"}
HEALTH_TIMEOUT_S = 5.0


class _InProcess:
    """A model class (a deployment's, or :class:`Generalist`) run inside the ingress replica,
    called the way a handle is (``model.predict.remote(...)`` is awaited): the same code path,
    without the hop."""

    class _Method:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def remote(self, *args: Any) -> Any:
            return self.fn(*args)  # a coroutine, awaited like a DeploymentResponse

    def __init__(self, deployment: Any, *args: Any) -> None:
        obj = getattr(deployment, "func_or_class", deployment)(*args)
        self.predict, self.health = self._Method(obj.predict), self._Method(obj.health)


def _unavailable(reason: str) -> JSONResponse:
    return JSONResponse({"detail": f"model unavailable, retry later ({reason})"}, status_code=503,
                        headers={"Retry-After": "1"})


class InFlight:
    """ASGI middleware counting the ``/predict`` requests of this process (one ingress replica)
    from arrival until the last byte of their answer has been handed to the server — the count a
    draining ``/healthz`` and the drain flag report. Counted in the endpoint, a request would end
    before its answer is written, and a drain could stop the service under a response being sent."""

    count = 0

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").endswith("/predict"):
            return await self.app(scope, receive, send)
        InFlight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            InFlight.count -= 1


api.add_middleware(InFlight)


def _draining(in_flight: int) -> JSONResponse:
    # Connection: close, so that a keep-alive client reconnects (to another replica, or later).
    return JSONResponse({"detail": "draining: this service is stopping, retry later", "in_flight": in_flight},
                        status_code=503, headers={"Retry-After": "1", "Connection": "close"})


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=64)
@serve.ingress(api)
class Ingress:
    """HTTP: request parsing and validation, decoding, preprocessing, the JSON answer."""

    def __init__(self, model: DeploymentHandle | tuple, info: dict[str, Any], limits: Limits,
                 drain: str | None = None, routings: Routings | None = None) -> None:
        # graph=single and stages: (model class, its arguments), built here and called without a hop.
        self.model = _InProcess(model[0], *model[1:]) if isinstance(model, tuple) else model
        self.info, self.limits = info, limits
        self.drain = DrainWatch(drain, lambda: InFlight.count) if drain else None
        h = Hierarchy.from_dict(info["hierarchy"])
        self.supers, self.subs, self.num_subclasses = h.superclasses, h.subclasses, h.num_subclasses
        self.routings = routings  # None: one network, no routing
        self.transform = preprocessor(info["image_size"])
        self.draft_size = eval_draft_size(info["image_size"])

    @api.get("/healthz", response_model=Health, responses={503: {"model": Problem}})
    async def healthz(self) -> Any:
        """ok when every model stage has just answered a real forward; 503 while one is down, and
        while draining (with the number of /predict requests still in flight here)."""
        if self._is_draining():
            return _draining(InFlight.count)
        try:
            held = await asyncio.wait_for(self.model.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure of a stage means not healthy
            return _unavailable(type(e).__name__)
        return {"status": "ok", **{k: v for k, v in self.info.items() if k != "hierarchy"},
                "superclasses": len(self.supers), "subclasses": self.num_subclasses, "resident_bytes": held}

    @api.get("/hierarchy")
    async def hierarchy(self) -> dict[str, Any]:
        """The bundle's hierarchy JSON: superclasses and their subclasses, in model order."""
        return self.info["hierarchy"]

    def _is_draining(self) -> bool:
        # Read from the watcher's state: no call, no I/O on the request path.
        return self.drain is not None and self.drain.draining

    def _refusing(self) -> bool:
        """Draining and past the flag's grace: the requests already on their way when the drain
        began are still answered (/healthz says 503 from the start)."""
        return self.drain is not None and self.drain.refusing()

    def _routing(self, request: Request) -> Routing | None:
        """The request's routing, resolved here once (the model deployments get the object)."""
        unknown = sorted(set(request.query_params) - _QUERY)
        if unknown:
            raise BadInput(422, f"unknown query parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_QUERY))}")
        asked = request.query_params.get("routing")
        if asked is not None:  # an unencoded "+" in a query string arrives as a space
            asked = asked.strip().replace(" ", "+")
        if self.routings is None:
            if asked is not None:
                raise BadInput(422, "this app has one network: it takes no routing")
            return None
        try:
            return self.routings.resolve(asked)
        except ValueError as e:
            raise BadInput(422, f"{e}; stored routings: {', '.join(self.routings.stored)}") from None

    @api.post(
        "/predict",
        response_model=Prediction | Predictions,
        openapi_extra=PREDICT_BODY,
        responses=_ERRORS,
        summary="Classify images: superclass, subclass, top-k subclasses",
    )
    async def predict(
        self,
        request: Request,
        top_k: int = Query(5, ge=1, le=1000, description="most probable subclasses to return", examples=[5]),
        routing: str | None = Query(None, description="a stored routing (hard, soft, soft_pooled, ...) or an "
                                    "explicit one (soft:2@0.7+0.5); default: the app's", examples=["hard"]),
    ) -> Any:
        """One image as the raw body (image/jpeg, image/png, ...), one or more multipart
        ``file`` parts, or JSON ``{"image": base64}`` / ``{"images": [base64, ...]}``. A batch
        (``images``, several files) is answered ``{"predictions": [...]}``."""
        t0 = time.perf_counter()
        if self._refusing():
            return _draining(InFlight.count - 1)  # not counting this one, which is refused
        chosen = self._routing(request)
        images, batch = await request_images(request, self.limits)
        x, decode_ms = await run_in_threadpool(decode_all, images, self.limits, self.draft_size, self.transform)
        try:
            out = await once_more_if_dead(lambda: self.model.predict.remote(x, chosen))
        except _UNAVAILABLE as e:
            return _unavailable(type(e).__name__)
        total = (time.perf_counter() - t0) * 1000
        preds = [
            self._answer(fine, sup, top_k, chosen, {"decode": d, **out["timing_ms"], "total": total})
            for fine, sup, d in zip(out["fine"].tolist(), out["super"].tolist(), decode_ms)
        ]
        return {"predictions": preds} if batch else preds[0]

    def _answer(self, fine: list[float], sup: list[float], k: int, routing: Routing | None,
                timing: dict[str, float]) -> dict[str, Any]:
        s = max(range(len(sup)), key=sup.__getitem__)
        order = sorted(range(len(fine)), key=fine.__getitem__, reverse=True)[: min(k, len(fine))]
        f = order[0]
        return {
            "superclass": {"index": s, "id": self.supers[s].id, "name": self.supers[s].name, "probability": sup[s]},
            "subclass": {"index": f, "id": self.subs[f].id, "name": self.subs[f].name, "probability": fine[f]},
            "top_k": [{"id": self.subs[i].id, "name": self.subs[i].name, "probability": fine[i]} for i in order],
            "routing": "vanilla" if routing is None else str(routing),
            "timing_ms": timing,
        }


# ------------------------------------------------------------------------------ builders
def _info(name: str, ref: str, bundle: Bundle, routing: Routing | None) -> dict[str, Any]:
    return {
        "app": name,
        "bundle": ref,
        "resident": bundle.resident,
        "stage_one": bundle.stage_one,
        "routing": None if routing is None else str(routing),
        "routings": {k: str(v) for k, v in bundle.routings.items()} if routing is not None else {},
        "image_size": bundle.image_size,
        "hierarchy": bundle.hierarchy.to_dict(),
    }


def _open(args: dict[str, Any]) -> tuple[AppArgs, Bundle]:
    """Arguments and bundle, checked here so that a bad one fails ``serve run`` at once."""
    try:
        a = AppArgs.model_validate(args)
    except ValidationError as e:  # one line: the first problem, where it is
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "arguments"
        raise ValueError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None
    check_device(a.device)  # here, where the app is built: a device the replicas cannot have fails at once
    if a.max_deltas is not None:
        warnings.warn("max_deltas has no effect: replicas keep no decoded deltas (each is held packed and decoded "
                      "for the images routed to it)", FutureWarning, stacklevel=2)
    bundle = open_bundle(a.bundle, cache=a.bundle_cache)
    verify_files(bundle)  # every file read, hashed and parsed: a bad one fails here, not in a replica
    return a, bundle


def replica_source(a: AppArgs, bundle: Bundle) -> str | ShippedBundle:
    """What the replicas open: the bundle resolved here, never the reference itself — a replica
    on another node resolving ``models:/...`` would ask its own environment's tracking store (or
    the default one, on its own disk). A folder in ``bundle_cache``, or the files by value."""
    if a.bundle_cache:
        root, path = Path(a.bundle_cache).expanduser().resolve(), bundle.path.resolve()
        return str(path if path.is_relative_to(root) else place(bundle, root))
    try:
        return ship(bundle, a.bundle, SHIP_MAX_MIB << 20)
    except BundleError as e:
        raise BundleError(f"{e}: give bundle_cache=FOLDER, a folder every node reads") from None


def app(args: dict[str, Any]) -> Application:
    """The two-stage application: the model in the Ingress (single), Ingress → TwoStage (fused),
    or stage one in the Ingress → Specialist (stages)."""
    a, bundle = _open(args)
    try:
        routing = resolve_routing(bundle, a.routing)
    except (ValueError, BundleError) as e:
        raise ValueError(f"routing={a.routing}: {e}") from None
    info = _info("two-stage", a.bundle, bundle, routing)
    n, source = a.replicas, replica_source(a, bundle)
    if a.graph == "single":
        model = (TwoStage, source, a.device, a.batch_size, a.batch_wait_ms)
    elif a.graph == "fused":
        model = TwoStage.options(num_replicas=n).bind(source, a.device, a.batch_size, a.batch_wait_ms)
    else:
        specialist = Specialist.options(num_replicas=n).bind(source, a.device, a.batch_size, a.batch_wait_ms)
        model = (Generalist, specialist, source, a.device, a.batch_size, a.batch_wait_ms)
    return Ingress.options(num_replicas=n).bind(model, info, a.limits, a.drain, Routings.of(bundle, routing))


def vanilla_app(args: dict[str, Any]) -> Application:
    """The bundle's vanilla network alone, behind the same HTTP API."""
    a, bundle = _open(args)
    if a.routing is not None:
        raise ValueError("vanilla_app takes no routing: it serves one network")
    if bundle.resident != "vanilla" and "vanilla" not in bundle.baseline_names:
        raise BundleError(f"bundle {a.bundle} has no vanilla network (resident {bundle.resident!r}, no 'vanilla' baseline)")
    info = _info("vanilla", a.bundle, bundle, None)
    source = replica_source(a, bundle)
    if a.graph == "single":
        model = (Network, source, a.device, a.batch_size, a.batch_wait_ms)
    else:
        model = Network.options(num_replicas=a.replicas).bind(source, a.device, a.batch_size, a.batch_wait_ms)
    return Ingress.options(num_replicas=a.replicas).bind(model, info, a.limits, a.drain)
