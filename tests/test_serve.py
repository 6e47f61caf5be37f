"""The Serve deployment graph and its HTTP API, end to end on a tiny random bundle.

One Ray instance and one Serve instance for the whole module (starting them costs ~40 s on two
cores): the two-stage app at ``/two`` (vanilla resident, shared trunk up to layer3, soft routing
with a threshold and resident pooling: every routing path runs) and the vanilla app at
``/vanilla`` (a generalist-resident bundle's vanilla baseline). The replica-kill test runs last.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve
from serve_helpers import image_bytes, make_tiny_bundle

from serve.app import AppArgs, app, resolve_routing, vanilla_app
from serve.images import decode, preprocessor
from supersub.bundle import load_bundle
from supersub.delta import materialize
from supersub.predictor import RoutingConfig, assemble, combine, plan

pytestmark = [pytest.mark.serve, pytest.mark.slow]

LIMITS = {"max_body_bytes": 300_000, "max_pixels": 1_000_000, "max_batch": 4}
TWO_ARGS = {"routing": "soft:2", "threshold": 0.7, "resident_weight": 0.5, **LIMITS}
TIMEOUT = 30.0


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "vanilla": make_tiny_bundle(root / "vanilla", resident="vanilla", stages=("layer3", "layer4")),
        "generalist": make_tiny_bundle(root / "generalist", resident="generalist", stages=("stem", "layer1", "layer2", "layer3", "layer4")),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, bundles: dict[str, Path]) -> Iterator[str]:
    """Base URL of a Serve instance running both apps, on the session's Ray. Module-scoped: the
    replicas hold 1.2 of the session's 2 CPUs, which the Tune tests after this module need."""
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"bundle": str(bundles["vanilla"]), **TWO_ARGS}), name="two", route_prefix="/two")
    serve.run(vanilla_app({"bundle": str(bundles["generalist"]), **LIMITS}), name="vanilla", route_prefix="/vanilla")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=TIMEOUT) as c:
        yield c


def _x(data: bytes, image_size: int = 32) -> torch.Tensor:
    return preprocessor(image_size)(decode(data, 10**8))


def _probs(pred: dict) -> dict[str, float]:
    return {e["id"]: e["probability"] for e in pred["top_k"]}


def _check_schema(pred: dict, stages: tuple[str, ...] = ("generalist", "specialist")) -> None:
    for level in ("superclass", "subclass"):
        assert set(pred[level]) == {"index", "id", "name", "probability"}
        assert 0 <= pred[level]["probability"] <= 1
    assert pred["top_k"] and all(set(e) == {"id", "name", "probability"} for e in pred["top_k"])
    assert pred["top_k"][0]["id"] == pred["subclass"]["id"]
    ps = [e["probability"] for e in pred["top_k"]]
    assert ps == sorted(ps, reverse=True)
    assert set(pred["timing_ms"]) == {"decode", *stages, "total"}
    assert all(v >= 0 for v in pred["timing_ms"].values())


# ------------------------------------------------------------------------------ no Serve
@pytest.mark.parametrize("resident", ["vanilla", "generalist"])
@pytest.mark.parametrize("routing", ["hard", "soft:2", "soft:3@0.7", "soft:2@0.7+0.5"])
def test_routing_steps_equal_predictor(bundles: dict[str, Path], resident: str, routing: str) -> None:
    """plan → specialist (with a separately materialised delta) → assemble → combine, what the
    graph does across replicas, is
    TwoStagePredictor.predict, for both residents and every routing path."""
    spec, _, extra = routing.partition("@")
    threshold, _, alpha = extra.partition("+")
    rc = dataclasses.replace(
        RoutingConfig.parse(spec), threshold=float(threshold or 1.0), resident_weight=float(alpha or 0.0)
    )
    b = load_bundle(bundles[resident])
    pred = b.predictor()
    x = torch.stack([_x(image_bytes(i)) for i in range(16)])
    want_fine, want_sup = pred.predict(x, rc)
    with torch.no_grad():
        trunk, sup, resident_fine = pred.stage1(x)
    p = plan(sup, rc)
    answers = {s: pred.specialist(s, trunk[i], materialize(pred.deltas[s])) for s, (i, _) in p.calls.items()}
    fine = combine(assemble(b.hierarchy, sup, resident_fine, p, answers), rc)
    torch.testing.assert_close(fine, want_fine, rtol=0, atol=1e-6)
    torch.testing.assert_close(sup, want_sup, rtol=0, atol=1e-6)
    assert len(p.calls) > 1  # the pictures really go to several specialists


def test_builders_validate(bundles: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="bundle"):
        app({"routing": "hard"})
    with pytest.raises(ValueError, match="unknown_key"):
        app({"bundle": str(bundles["vanilla"]), "unknown_key": 1})
    with pytest.raises(ValueError, match="routing must be"):
        app({"bundle": str(bundles["vanilla"]), "routing": "medium"})
    with pytest.raises(ValueError, match="threshold"):
        app({"bundle": str(bundles["vanilla"]), "threshold": 1.5})
    with pytest.raises(ValueError, match="not a bundle"):
        app({"bundle": str(bundles["vanilla"] / "deltas")})
    # A vanilla-resident bundle serves its base network as the vanilla app.
    assert vanilla_app({"bundle": str(bundles["vanilla"])}) is not None
    b = load_bundle(bundles["vanilla"])
    assert resolve_routing(b, AppArgs(bundle="x")) == b.routing()
    assert resolve_routing(b, AppArgs(bundle="x", routing="hard")).mode == "hard"


@pytest.mark.mlflow
def test_bundle_from_mlflow(bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle logged to MLflow is served from its runs:/ URI (downloaded by each process)."""
    mlflow = pytest.importorskip("mlflow")
    from serve.bundles import is_remote, open_bundle

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(bundles["vanilla"]), artifact_path="bundle")
    uri = f"runs:/{run.info.run_id}/bundle"
    assert is_remote(uri) and not is_remote(str(bundles["vanilla"])) and not is_remote("file:///x")
    b = open_bundle(uri)
    assert b.manifest["files"] == load_bundle(bundles["vanilla"]).manifest["files"]
    assert app({"bundle": uri}) is not None


def test_config_yaml_builds(bundles: dict[str, Path]) -> None:
    """serve/config.yaml is a valid Serve config whose apps build (on the tiny bundle)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((Path(__file__).parents[1] / "serve/config.yaml").read_text()))
    builders = {"serve.app:app": app, "serve.app:vanilla_app": vanilla_app}
    for a in cfg.applications:
        assert a.import_path in builders
        builders[a.import_path]({**a.args, "bundle": str(bundles["vanilla"])})
        for d in a.deployments:
            cpus = d.ray_actor_options.num_cpus if d.ray_actor_options else 0
            assert 0 < cpus < 1, f"{a.name}/{d.name}: give replicas fractional CPUs (whole ones hang on 2 cores)"


# ------------------------------------------------------------------------------ HTTP: good input
@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_predict_raw_body(client: httpx.Client, fmt: str, mime: str) -> None:
    r = client.post("/two/predict", content=image_bytes(3, fmt), headers={"content-type": mime})
    assert r.status_code == 200, r.text
    _check_schema(r.json())
    assert len(r.json()["top_k"]) == 5


def test_predict_multipart_and_base64(client: httpx.Client) -> None:
    jpg, png = image_bytes(4), image_bytes(5, "PNG")
    one = client.post("/two/predict", files={"file": ("a.jpg", jpg, "image/jpeg")}).json()
    _check_schema(one)
    many = client.post("/two/predict", files=[("file", ("a.jpg", jpg, "image/jpeg")), ("file", ("b.png", png, "image/png"))])
    assert many.status_code == 200, many.text
    preds = many.json()["predictions"]
    assert len(preds) == 2
    b64 = client.post("/two/predict", json={"image": base64.b64encode(jpg).decode()}).json()
    _check_schema(b64)
    batch = client.post("/two/predict", json={"images": [base64.b64encode(d).decode() for d in (jpg, png)]}).json()
    assert [p["subclass"]["id"] for p in batch["predictions"]] == [p["subclass"]["id"] for p in preds]
    # The same image answers the same whichever way it came (batched with others: float noise).
    for other in (preds[0], b64, batch["predictions"][0]):
        for level in ("subclass", "superclass"):
            assert other[level]["id"] == one[level]["id"]
            assert other[level]["probability"] == pytest.approx(one[level]["probability"], abs=1e-5)
    assert len(client.post("/two/predict?top_k=2", content=jpg, headers={"content-type": "image/jpeg"}).json()["top_k"]) == 2


def test_two_stage_answer_equals_predictor(client: httpx.Client, bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["vanilla"])
    routing = resolve_routing(b, AppArgs(bundle="x", **TWO_ARGS))
    C = b.hierarchy.num_subclasses
    images = [image_bytes(10 + i, fmt) for i, fmt in enumerate(["JPEG", "PNG"] * 4)]
    fine, sup = b.predictor().predict(torch.stack([_x(d) for d in images]), routing)
    singles = [client.post(f"/two/predict?top_k={C}", content=d, headers={"content-type": "image/png"}).json() for d in images]
    batched = client.post(f"/two/predict?top_k={C}", json={"images": [base64.b64encode(d).decode() for d in images[:4]]})
    served = batched.json()["predictions"]
    routed = set()
    for i, got in enumerate(singles + served):
        j = i % len(images) if i < len(images) else i - len(images)
        want = dict(zip(b.hierarchy.subclass_ids, fine[j].tolist()))
        probs = _probs(got)
        assert probs.keys() == want.keys()
        assert max(abs(probs[k] - want[k]) for k in want) < 1e-5
        assert got["subclass"]["index"] == int(fine[j].argmax())
        assert got["superclass"]["index"] == int(sup[j].argmax())
        assert abs(got["superclass"]["probability"] - float(sup[j].max())) < 1e-5
        routed.add(got["superclass"]["id"])
    assert len(routed) > 1


def test_vanilla_app(client: httpx.Client, bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["generalist"])
    net = b.load_baseline("vanilla")
    d = image_bytes(7)
    with torch.no_grad():
        want = torch.softmax(net(_x(d)[None]), 1)[0]
    got = client.post("/vanilla/predict?top_k=12", content=d, headers={"content-type": "image/jpeg"}).json()
    _check_schema(got, stages=("network",))
    probs = _probs(got)
    assert max(abs(probs[k] - w) for k, w in zip(b.hierarchy.subclass_ids, want.tolist())) < 1e-5
    h = client.get("/vanilla/healthz").json()
    assert h["app"] == "vanilla" and h["routing"] is None


def test_health_hierarchy_docs(client: httpx.Client, bundles: dict[str, Path]) -> None:
    h = client.get("/two/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["routing"]["threshold"] == 0.7 and h.json()["resident"] == "vanilla"
    assert client.get("/two/hierarchy").json() == load_bundle(bundles["vanilla"]).hierarchy.to_dict()
    docs = client.get("/two/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/two/openapi.json").json()
    assert "/predict" in spec["paths"] and "image/jpeg" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


# ------------------------------------------------------------------------------ HTTP: bad input
def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width × height`` pixels: a decompression bomb's shape."""
    png = bytearray(image_bytes(0, "PNG"))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    png[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
    return bytes(png)


def _b64(d: bytes) -> str:
    return base64.b64encode(d).decode()


JPG = image_bytes(1)
BAD = {
    "not an image": (422, {"content": b"hello, not an image", "headers": {"content-type": "image/jpeg"}}),
    "truncated jpeg": (422, {"content": JPG[: len(JPG) // 2], "headers": {"content-type": "image/jpeg"}}),
    "empty body": (400, {"content": b"", "headers": {"content-type": "image/png"}}),
    "wrong content type": (415, {"content": JPG, "headers": {"content-type": "text/plain"}}),
    "no content type": (415, {"content": JPG}),
    "body too large": (413, {"content": b"\xff" * 400_000, "headers": {"content-type": "image/jpeg"}}),
    "chunked body too large": (413, {"content": iter([b"\xff" * 100_000] * 4), "headers": {"content-type": "image/jpeg"}}),
    "too many pixels": (413, {"content": _png_claiming(5000, 5000), "headers": {"content-type": "image/png"}}),
    "batch over limit": (413, {"json": {"images": [_b64(JPG)] * 5}}),
    "multipart batch over limit": (413, {"files": [("file", ("a.jpg", JPG, "image/jpeg"))] * 9}),
    "malformed base64": (400, {"json": {"image": "@@not base64@@"}}),
    "malformed json": (400, {"content": b'{"image": ', "headers": {"content-type": "application/json"}}),
    "json without image": (422, {"json": {"img": _b64(JPG)}}),
    "json empty batch": (422, {"json": {"images": []}}),
    "base64 of not an image": (422, {"json": {"image": _b64(b"hello")}}),
    "one bad image in a batch": (422, {"json": {"images": [_b64(JPG), _b64(b"junk")]}}),
    "multipart without file": (422, {"files": {"other": ("x.txt", b"hi", "text/plain")}}),
    "multipart garbage": (400, {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
    "top_k zero": (422, {"params": {"top_k": 0}, "content": JPG, "headers": {"content-type": "image/jpeg"}}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_4xx_with_reason(client: httpx.Client, case: str) -> None:
    status, kwargs = BAD[case]
    r = client.post("/two/predict", **kwargs)
    if case == "multipart garbage":  # starlette may see no parts at all rather than a broken one
        assert r.status_code in (400, 422), r.text
    else:
        assert r.status_code == status, r.text
    assert r.json()["detail"], r.text
    if case == "one bad image in a batch":
        assert "image 1" in r.json()["detail"]


def test_still_answers_after_bad_input(client: httpx.Client) -> None:
    for _, kwargs in BAD.values():
        assert client.post("/two/predict", **kwargs).status_code < 500
    assert client.get("/two/healthz").status_code == 200
    assert client.post("/two/predict", content=JPG, headers={"content-type": "image/jpeg"}).status_code == 200


# ------------------------------------------------------------------------------ fault tolerance
def _specialist_replicas() -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::two#Specialist#")
    )


def _running(app_name: str, deployment: str) -> int:
    d = serve.status().applications[app_name].deployments[deployment]
    return sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))


def test_replica_kill_under_load(server: str) -> None:
    """Killing a Specialist replica under 200 concurrent requests loses at most 1 % of them
    (counted at the client, no retries there) and Serve brings the replica back."""
    before = _specialist_replicas()
    assert len(before) == 2, before
    images = [image_bytes(100 + i) for i in range(16)]
    total, threads = 200, 4
    done, failures, lock = [0], [], threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=server, timeout=TIMEOUT) as c:
            for i in range(k, total, threads):
                try:
                    r = c.post("/two/predict", content=images[i % len(images)], headers={"content-type": "image/jpeg"})
                    ok = r.status_code == 200
                    err = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, err = False, repr(e)
                with lock:
                    done[0] += 1
                    if not ok:
                        failures.append(err)

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    deadline = time.monotonic() + 60
    while done[0] < total // 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    ray.kill(ray.get_actor(before[0], namespace="serve"))
    for t in pool:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in pool), "load did not finish"
    assert done[0] == total
    assert len(failures) <= total // 100, failures

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        names = _specialist_replicas()
        if before[0] not in names and len(names) == 2 and _running("two", "Specialist") == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Specialist did not recover: {_specialist_replicas()}, {serve.status().applications['two']}")
    with httpx.Client(base_url=server, timeout=TIMEOUT) as c:
        r = c.post("/two/predict", content=images[0], headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
