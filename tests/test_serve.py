"""The Serve applications and their HTTP API, end to end on a tiny random bundle, and every way a
request, a setting or a bundle can be wrong.

One Serve instance on the session's Ray for the module, its apps deployed together (starting it
costs ~40 s on two cores): the two-stage app at ``/two`` (the default single graph, with a drain
flag; vanilla resident, shared trunk up to layer3, soft routing with a threshold: every routing
path runs), the per-stage graph of the same bundle at ``/stages``, the vanilla app at
``/vanilla`` (a generalist-resident bundle's vanilla network, registered in MLflow and served as
``models:/...``: resolved by the builder alone), and the bundle kinds whose stage one is the
trunk router — trained by the pipeline (``trunk_router``, ``joint``) — in the single and the
per-stage graph (``/trunk_router-single``, ...).
The tests that kill replicas run last; the `python -m serve` tests, each a launch of its own,
after them. The numbers of the issue's defects are in the
test names' docstrings.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve
from serve_helpers import TRAINED_KINDS, image_bytes, make_tiny_bundle, make_trained_bundle

from serve.app import app, resolve_routing, vanilla_app
from serve.images import BadInput, Limits, decode_all, preprocessor, read_body
from supersub.bundle import load_bundle
from supersub.routing import Routing

pytestmark = [pytest.mark.serve, pytest.mark.slow]

LIMITS = {"max_body_bytes": 300_000, "max_pixels": 1_000_000, "max_request_pixels": 2_000_000, "max_batch": 4,
          "body_timeout_s": 2.0}
TIMEOUT = 30.0
DRAIN = f"ssdrain-{uuid.uuid4().hex[:8]}"  # the drain flag /two watches
KEEP: list = []  # actor handles this module holds on to


@ray.remote(num_cpus=0)
class FlagOwner:
    """Makes /two's drain flag, and owns it: killing it ends the flag, as a launcher's exit does."""

    def make(self, name: str) -> bool:
        from serve.drain import create

        self.flag = create(name)
        return ray.get(self.flag.busy.remote()) == (0, 0)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "vanilla": make_tiny_bundle(root / "vanilla", resident="vanilla", stages=("layer3", "layer4")),
        "generalist": make_tiny_bundle(root / "generalist", resident="generalist",
                                       stages=("stem", "layer1", "layer2", "layer3", "layer4")),
        **{kind: make_trained_bundle(root / kind, kind) for kind in TRAINED_KINDS},
    }


# The bundle kinds served by each graph whose model code differs (fused runs single's TwoStage).
KIND_APPS = [(kind, graph) for kind in TRAINED_KINDS for graph in ("single", "stages")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


def _register(bundle: Path, root: Path, mp: pytest.MonkeyPatch) -> str:
    """``bundle`` logged to a fresh SQLite store under ``root`` and registered under a unique
    name; MLFLOW_TRACKING_URI set (through ``mp``) to that store. Its models:/ URI. (An explicit
    client: mlflow.set_tracking_uri would rewrite MLFLOW_TRACKING_URI for the whole process.)"""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("SUPERSUB_CACHE", str(root / "launcher-cache"))
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    name = f"supersub-{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(name, artifact_location=(root / "artifacts").as_uri()))
    client.log_artifacts(run.info.run_id, str(bundle), "bundle")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/bundle", run.info.run_id).version
    return f"models:/{name}/{version}"


@pytest.fixture(scope="module")
def server(ray_session, bundles: dict[str, Path], mlflow_store: Path) -> Iterator[str]:
    """Base URL of a Serve instance running the apps, on the session's Ray. Module-scoped: the
    replicas hold a share of the session's 2 CPUs, which the Tune tests after this module need."""
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    b = str(bundles["vanilla"])
    from serve.drain import NAMESPACE

    owner = FlagOwner.options(name=f"{DRAIN}-owner", namespace=NAMESPACE).remote()
    assert ray.get(owner.make.remote(DRAIN), timeout=120)
    # One replica where the tests need no redundancy (each costs memory and start-up here); the
    # per-stage graph keeps the default two of each, which the replica-kill tests need.
    apps = {"two": app({"bundle": b, "drain": DRAIN, "replicas": 1, **LIMITS}),
            "stages": app({"bundle": b, "graph": "stages", **LIMITS})}
    # /vanilla: the generalist bundle as a models:/ URI in a tracking store only this process knows
    # (the replicas' environment, the session Ray's, names none: resolving it there would look in
    # ~/.supersub), placed in a folder the builder names: the replicas read that folder, never the store.
    with pytest.MonkeyPatch.context() as mp:
        uri = _register(bundles["generalist"], mlflow_store, mp)
        apps["vanilla"] = vanilla_app({"bundle": uri, "bundle_cache": str(mlflow_store / "shared"), "replicas": 1,
                                       **LIMITS})
    for kind, graph in KIND_APPS:
        apps[f"{kind}-{graph}"] = app({"bundle": str(bundles[kind]), "graph": graph, "replicas": 1, **LIMITS})
    # Deployed together: their replicas start side by side, not one app after another.
    serve.run_many([serve.RunTarget(a, name=name, route_prefix=f"/{name}") for name, a in apps.items()])
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    with contextlib.suppress(Exception):  # killed by the drain test already
        ray.kill(owner)
    KEEP.clear()


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=TIMEOUT) as c:
        yield c


def _x(data: bytes, image_size: int = 32) -> torch.Tensor:
    """The picture as the ingress preprocesses it (the same JPEG draft size)."""
    from supersub.data.dataset import eval_draft_size

    return decode_all([data], Limits(), eval_draft_size(image_size), preprocessor(image_size))[0][0]


def _check_schema(pred: dict, stages: tuple[str, ...] = ("model",)) -> None:
    for level in ("superclass", "subclass"):
        assert set(pred[level]) == {"index", "id", "name", "probability"}
        assert 0 <= pred[level]["probability"] <= 1
    assert pred["top_k"] and pred["top_k"][0]["id"] == pred["subclass"]["id"]
    ps = [e["probability"] for e in pred["top_k"]]
    assert ps == sorted(ps, reverse=True)
    assert set(pred["timing_ms"]) == {"decode", *stages, "total"}
    assert pred["routing"]


JPG = image_bytes(1)


# ------------------------------------------------------------------------------ no Serve: settings
def test_routing_is_resolved_as_written(bundles: dict[str, Path]) -> None:
    """(10) An explicit routing is taken exactly as written; a stored one by name keeps its
    calibration; nothing is reset behind the user's back."""
    b = load_bundle(bundles["vanilla"])
    assert resolve_routing(b, None) == b.routing() == Routing.parse("soft:2@0.9")
    assert resolve_routing(b, "soft_pooled") == Routing.parse("soft:2@0.9+0.5")
    assert resolve_routing(b, "soft:3") == Routing("soft", 3, 1.0, 0.0)
    with pytest.raises(ValueError, match="pooling"):
        resolve_routing(load_bundle(bundles["generalist"]), "hard+0.5")


def test_the_ingress_resolves_a_routing_once_into_a_routing_object(bundles: dict[str, Path]) -> None:
    """One resolver for the app's routing and a request's: names and spellings become Routing
    objects (what the model deployments receive; picklable), an explicit spelling is parsed once,
    and what the bundle cannot run is a ValueError saying why."""
    import pickle

    from serve.app import Routings

    b = load_bundle(bundles["vanilla"])
    table = Routings.of(b, Routing.parse("hard"))
    assert table.resolve(None) == Routing("hard") and table.resolve("soft_pooled") == Routing.parse("soft:2@0.9+0.5")
    first = table.resolve("soft:3@0.8")
    assert first is table.resolve("soft:3@0.8") and pickle.loads(pickle.dumps(first)) == first
    with pytest.raises(ValueError, match="k = 9"):
        table.resolve("soft:9")
    with pytest.raises(ValueError, match="not of the form"):
        table.resolve("medium")


def test_max_deltas_is_accepted_with_a_warning(bundles: dict[str, Path]) -> None:
    """max_deltas bounded an LRU of decoded deltas that replicas no longer keep: an old config
    still builds, with a FutureWarning saying it has no effect."""
    with pytest.warns(FutureWarning, match="max_deltas has no effect"):
        assert app({"bundle": str(bundles["vanilla"]), "max_deltas": 4}) is not None


@pytest.mark.parametrize("args,message", [
    ({"routing": "hard"}, "bundle"),
    ({"unknown_key": 1}, "unknown_key"),
    ({"routing": "medium"}, "routing"),
    ({"routing": "soft:2@1.5"}, "threshold"),
    ({"routing": "soft:2+inf"}, "routing"),
    ({"routing": "soft:2+nan"}, "routing"),
    ({"routing": "soft:99"}, "k = 99 but the bundle has 3 superclasses"),  # (21.5)
    ({"replicas": 0}, "replicas"),
    ({"batch_wait_ms": float("inf")}, "batch_wait_ms"),
    ({"batch_wait_ms": float("nan")}, "batch_wait_ms"),
    ({"body_timeout_s": 0}, "body_timeout_s"),
    ({"device": "bogus"}, "not a torch device"),
    ({"device": "cuda:7"}, "no such CUDA device"),
])
def test_settings_that_cannot_work_are_refused_at_build(bundles: dict[str, Path], args: dict, message: str) -> None:
    """(5) Refused when the app is built, with one line — not at request time."""
    full = args if message == "bundle" else {"bundle": str(bundles["vanilla"]), **args}
    with pytest.raises(ValueError, match=message) as e:
        app(full)
    assert len(str(e.value).strip().splitlines()) == 1


def test_bundles_that_cannot_work_are_refused_at_build(bundles: dict[str, Path], tmp_path: Path) -> None:
    """(3, 5, 8) A bundle whose manifest points outside it, names an impossible resident or a
    superclass the hierarchy lacks, or lists a file that is not safetensors: one line, at build."""
    import hashlib
    import shutil

    from supersub.errors import BundleError

    def broken(change) -> str:
        path = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(bundles["vanilla"], path)
        m = json.loads((path / "manifest.json").read_text())
        change(m, path)
        (path / "manifest.json").write_text(json.dumps(m))
        return str(path)

    def outside(m, path):
        m["base"]["file"] = "../outside/base.safetensors"

    def bogus_resident(m, path):
        m["resident"] = "bogus"

    def junk_delta(m, path):
        (path / "deltas/1.safetensors").write_bytes(b"junk")
        m["files"]["deltas/1.safetensors"]["sha256"] = hashlib.sha256(b"junk").hexdigest()

    def missing_superclass(m, path):
        m["hierarchy"]["superclasses"] = m["hierarchy"]["superclasses"][:2]

    for change, message in ((outside, "'../outside/base.safetensors' points outside the bundle"),
                            (bogus_resident, "resident"), (junk_delta, "not a safetensors file"),
                            (missing_superclass, "the hierarchy needs"),
                            *((c, m) for c, m, _ in BAD_BUNDLES)):
        with pytest.raises(BundleError, match=message) as e:
            app({"bundle": broken(change)})
        assert len(str(e.value).splitlines()) == 1


def _flip_base_byte(m: dict, path: Path) -> None:
    data = bytearray((path / "base.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01  # a weight's byte: still valid safetensors, only the hash tells
    (path / "base.safetensors").write_bytes(bytes(data))


def _edit_base_hash(m: dict, path: Path) -> None:
    m["files"]["base.safetensors"]["sha256"] = "0" * 64


def _pickle_base(m: dict, path: Path) -> None:
    import hashlib
    import pickle

    data = pickle.dumps({"conv1.weight": [0.0]})  # hash updated too: the format check must refuse it
    (path / "base.safetensors").write_bytes(data)
    m["files"]["base.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _listed_unknown_file(m: dict, path: Path) -> None:
    import hashlib
    import pickle

    data = pickle.dumps("never read")
    (path / "evil.pkl").write_bytes(data)
    m["files"]["evil.pkl"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# (21.2) Bundles that only a read of every file finds: refused before Ray starts, one line, exit 2.
BAD_BUNDLES = [
    (_flip_base_byte, "base.safetensors was changed: its sha256 does not match", "base flipped"),
    (_edit_base_hash, "base.safetensors was changed: its sha256 does not match", "base hash edited"),
    (_pickle_base, "base.safetensors is not a safetensors file", "pickle base"),
    (_listed_unknown_file, "lists evil.pkl, which no field of the format names", "listed unknown file"),
]


def _launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m serve` under test: a short private RAY_TMPDIR (Ray's socket
    paths must stay under ~107 characters; removed when the tests end), token auth off, no cluster
    address inherited."""
    import atexit
    import os
    import shutil

    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="sslaunch-", dir="/tmp"), "RAY_AUTH_MODE": "disabled",
           **extra}
    atexit.register(shutil.rmtree, env["RAY_TMPDIR"], True)
    env.pop("RAY_ADDRESS", None)
    return env


def test_launcher_refuses_bad_bundles_before_ray_starts(bundles: dict[str, Path], tmp_path: Path) -> None:
    """(21.2) `python -m serve` on each bad bundle: exit 2, one line naming the fault, and Ray never
    started (nothing in its temp dir) — where a flipped base byte used to fail inside Ray after
    85–130 s with a 33-line traceback. The launchers run side by side (each imports torch and Ray)."""
    import shutil
    import subprocess
    import sys

    procs = []
    for change, message, name in BAD_BUNDLES:
        path = tmp_path / name.replace(" ", "-")
        shutil.copytree(bundles["vanilla"], path)
        m = json.loads((path / "manifest.json").read_text())
        change(m, path)
        (path / "manifest.json").write_text(json.dumps(m))
        env = _launcher_env()
        procs.append((name, message, env["RAY_TMPDIR"], subprocess.Popen(
            [sys.executable, "-m", "serve", f"bundle={path}", "--port", str(_free_port())],
            cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for name, message, ray_tmp, proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, out, err)
        assert out == "" and len(err.strip().splitlines()) == 1 and message in err, (name, err)
        assert err.startswith("python -m serve: error: bundle"), (name, err)
        assert not list(Path(ray_tmp).iterdir()), (name, "Ray started")


def test_launcher_reports_a_ray_start_failure_in_one_line(bundles: dict[str, Path]) -> None:
    """(21.7) Ray failing to start (here: a RAY_TMPDIR too long for its socket paths) is one line
    with the reason and a hint, exit 1 — not a traceback."""
    import subprocess
    import sys

    env = _launcher_env()
    env["RAY_TMPDIR"] = str(Path(env["RAY_TMPDIR"]) / ("x" * 100))
    Path(env["RAY_TMPDIR"]).mkdir()
    r = subprocess.run([sys.executable, "-m", "serve", f"bundle={bundles['vanilla']}", "--port", str(_free_port())],
                       cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "AF_UNIX path length" in err[0] and "RAY_TMPDIR is too long" in err[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr


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


@pytest.mark.mlflow
def test_bundle_from_mlflow_uris_with_the_jobs_default_store(bundles: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """runs:/<id>/bundle and runs:/<id> resolve in the jobs' default store without exporting
    MLFLOW_TRACKING_URI, into one cache (no leftovers in the system's temporary folder)."""
    mlflow = pytest.importorskip("mlflow")
    import supersub.remote as remote

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(remote, "HOME", tmp_path / "home")
    monkeypatch.setenv("SUPERSUB_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(remote.default_tracking_uri())
    exp = mlflow.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(bundles["vanilla"]), artifact_path="bundle")
    mlflow.set_tracking_uri(None)
    for uri in (f"runs:/{run.info.run_id}/bundle", f"runs:/{run.info.run_id}"):
        b = remote.open_bundle(uri)
        assert b.manifest["files"] == load_bundle(bundles["vanilla"]).manifest["files"]
        assert str(b.path).startswith(str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "bundles").iterdir())) == 1  # the same bundle, downloaded once
    assert app({"bundle": f"runs:/{run.info.run_id}/bundle"}) is not None
    from supersub.errors import BundleError

    with pytest.raises(BundleError, match="cannot resolve"):
        remote.open_bundle("runs:/0123456789abcdef0123456789abcdef/bundle")


def test_replicas_get_the_resolved_bundle_never_its_reference(bundles: dict[str, Path], tmp_path: Path) -> None:
    """(3) What the replicas receive: the bundle's files by value (manifest, signature, every
    listed file; a replica writes them to its own node), or — with bundle_cache — a folder
    there; never the reference, which a replica elsewhere would resolve in its own environment.
    A replica refuses a URI outright, and a bundle over the size that travels by value asks
    for bundle_cache in one line."""
    import serve.app as serve_app
    from supersub.errors import BundleError
    from supersub.remote import ShippedBundle, open_resolved

    src = bundles["vanilla"]
    a, b = serve_app._open({"bundle": str(src)})
    shipped = serve_app.replica_source(a, b)
    assert isinstance(shipped, ShippedBundle)
    assert set(shipped.files) == {"manifest.json", *b.manifest["files"]}
    assert len(repr(shipped)) < 200  # no megabytes of bytes in a log line
    opened = open_resolved(shipped, tmp_path / "node")
    assert opened.path == tmp_path / "node" / shipped.key and opened.manifest == b.manifest
    assert all((opened.path / n).read_bytes() == (src / n).read_bytes() for n in shipped.files)
    assert open_resolved(shipped, tmp_path / "node").path == opened.path  # once per node
    a, b = serve_app._open({"bundle": str(src), "bundle_cache": str(tmp_path / "shared")})
    placed = serve_app.replica_source(a, b)
    assert isinstance(placed, str) and Path(placed).parent == (tmp_path / "shared" / "bundles").resolve()
    assert load_bundle(placed).manifest == b.manifest
    with pytest.raises(BundleError, match="must be resolved where the tracking store is known"):
        open_resolved("models:/supersub/2")
    small = serve_app.SHIP_MAX_MIB
    try:
        serve_app.SHIP_MAX_MIB = 0
        with pytest.raises(BundleError, match="give bundle_cache=FOLDER") as e:
            app({"bundle": str(src)})
        assert len(str(e.value).splitlines()) == 1
    finally:
        serve_app.SHIP_MAX_MIB = small


def test_haproxy_answers_503_while_no_app_is_deployed(tmp_path: Path) -> None:
    """(4) Ray's HAProxy answers a path no app serves with a 404 — also while the app is not
    deployed yet, or any more (a stopping service read as a wrong URL). Through serve/haproxy.sh,
    as Ray runs it on each node: 503 + Retry-After (JSON) with no app, a JSON 404 beside one; the
    error pages are written beside Ray's config; the real binary comes from the environment."""
    import os
    import subprocess
    import sys

    from serve.haproxy_loopback import STUB

    ray_cfg = ("defaults\n    mode http\n    errorfile 503 /x/500.http\nfrontend http_frontend\n    bind *:8000\n"
               "{use}    default_backend default_backend\nbackend default_backend\n    http-request return status 404 "
               "content-type text/plain lf-string \"Path '%[path]' not found.\"\n")
    real = tmp_path / "fake-haproxy"  # prints the config it was given
    real.write_text('#!/bin/sh\nwhile [ "$1" != "-f" ]; do shift; done\ncat "$2"\n')
    real.chmod(0o755)
    env = {**os.environ, "SUPERSUB_PYTHON": sys.executable, "SUPERSUB_HAPROXY_BINARY": str(real)}
    for use, want in (("", "status 503"), ("    use_backend app if is_app\n", "status 404")):
        cfg = tmp_path / "node" / "haproxy.cfg"
        cfg.parent.mkdir(exist_ok=True)
        cfg.write_text(ray_cfg.format(use=use))
        out = subprocess.run([str(STUB), "-db", "-f", str(cfg)], env=env, capture_output=True, text=True,
                             check=True, timeout=60).stdout
        rule = out.split("\nbackend default_backend\n", 1)[1].splitlines()[0].strip()
        assert rule.startswith(f"http-request return {want} content-type application/json string '"), rule
        assert json.loads(rule.split("string '", 1)[1].split("'", 1)[0])["detail"]
        assert rule.endswith("hdr Retry-After 1") == (want == "status 503"), rule
        assert f"errorfile 503 {tmp_path / 'node' / 'supersub-errors' / '503.http'}" in out
        assert "bind 127.0.0.1:8000" in out


def test_haproxy_ends_with_the_process_that_started_it(tmp_path: Path) -> None:
    """HAProxy, started through serve/haproxy.sh by a process (Serve's HAProxy manager) that is
    then killed outright, exits with it: an HAProxy that outlived a group-killed Ray would hold the
    HTTP, stats and metrics ports."""
    import os
    import signal
    import subprocess
    import sys

    from serve.haproxy_loopback import STUB

    real = tmp_path / "fake-haproxy"  # stays up, as HAProxy does
    real.write_text("#!/bin/sh\nexec sleep 120\n")
    real.chmod(0o755)
    (tmp_path / "haproxy.cfg").write_text("global\n")
    env = {**os.environ, "SUPERSUB_PYTHON": sys.executable, "SUPERSUB_HAPROXY_BINARY": str(real)}
    manager = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                                f"p = subprocess.Popen([{str(STUB)!r}, '-db', '-f', {str(tmp_path / 'haproxy.cfg')!r}])\n"
                                "print(p.pid, flush=True)\ntime.sleep(120)"],
                               env=env, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(manager.stdout.readline())
        assert _poll(lambda: Path(f"/proc/{pid}/cmdline").read_bytes(), lambda c: b"sleep" in c, 30)
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(timeout=30)
        assert not _poll(lambda: _alive(pid), lambda alive: not alive, 10), "HAProxy outlived its parent"
    finally:
        if manager.poll() is None:
            manager.kill()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ no Serve: request parsing
class _SlowRequest:
    """A request whose body trickles in: one byte, then nothing."""

    headers = {"content-type": "image/jpeg"}

    async def stream(self):
        yield b"\xff"
        await __import__("asyncio").sleep(3600)


def test_a_body_that_does_not_arrive_is_408() -> None:
    """(2) A slow client is cut off after body_timeout_s, instead of holding its slot."""
    import asyncio

    t0 = time.perf_counter()
    with pytest.raises(BadInput) as e:
        asyncio.run(read_body(_SlowRequest(), 1000, timeout_s=0.3))
    assert e.value.status == 408 and time.perf_counter() - t0 < 5


def test_decode_budget_is_per_request() -> None:
    """(6) Many large images in one small body: refused from the headers, before decoding."""
    big = image_bytes(2, "PNG", size=(1200, 1000))
    limits = Limits(max_pixels=2_000_000, max_request_pixels=3_000_000, max_batch=16)
    with pytest.raises(BadInput) as e:
        decode_all([big] * 4, limits, None, preprocessor(32))
    assert e.value.status == 413 and "max_request_pixels" in e.value.reason
    x, ms = decode_all([big] * 2, limits, None, preprocessor(32))
    assert x.shape == (2, 3, 32, 32) and len(ms) == 2
    slow = Limits(max_pixels=2_000_000, max_request_pixels=10**9, decode_timeout_s=1e-9)
    with pytest.raises(BadInput, match="decode_timeout_s"):
        decode_all([big] * 3, slow, None, preprocessor(32))


# ------------------------------------------------------------------------------ HTTP: good input
@pytest.mark.parametrize("prefix", ["/two", "/stages"])
def test_answers_equal_the_offline_predictor_with_their_routing(client: httpx.Client, bundles: dict[str, Path],
                                                                prefix: str) -> None:
    """(10) Both graphs answer what TwoStagePredictor answers, say which routing produced it, and
    honour ?routing= per request."""
    b = load_bundle(bundles["vanilla"])
    C = b.hierarchy.num_subclasses
    images = [image_bytes(10 + i, fmt) for i, fmt in enumerate(["JPEG", "PNG"] * 4)]
    x = torch.stack([_x(d) for d in images])
    routed = set()
    for asked in (None, "hard", "soft_pooled", "soft:3@0.8+0.25"):
        routing = resolve_routing(b, asked)
        fine, sup = b.predictor().predict(x, routing)
        query = f"?top_k={C}" + (f"&routing={asked}" if asked else "")
        for j, d in enumerate(images):
            r = client.post(f"{prefix}/predict{query}", content=d, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["routing"] == str(routing)
            probs = {e["id"]: e["probability"] for e in got["top_k"]}
            want = dict(zip(b.hierarchy.subclass_ids, fine[j].tolist()))
            assert max(abs(probs[k] - want[k]) for k in want) < 1e-5, (asked, j)
            assert got["superclass"]["index"] == int(sup[j].argmax())
            routed.add(got["superclass"]["id"])
    assert len(routed) > 1


@pytest.mark.parametrize("kind,graph", KIND_APPS)
def test_every_bundle_kind_answers_as_the_offline_predictor(client: httpx.Client, bundles: dict[str, Path],
                                                            kind: str, graph: str) -> None:
    """Bundles the pipeline trained with the trunk router as stage one (generalist.kind=trunk_router,
    and generalist.router_trunk=joint) through the single and the per-stage graph answer what
    TwoStagePredictor answers; pooling has nothing to pool with (422); /healthz reports what each
    stage's replica holds, as the engine counts it for the same bundle."""
    b = load_bundle(bundles[kind])
    assert b.stage_one == "trunk_router"
    C, prefix = b.hierarchy.num_subclasses, f"/{kind}-{graph}"
    images = [image_bytes(40 + i) for i in range(6)]
    x = torch.stack([_x(d, b.image_size) for d in images])
    for asked in (None, "hard", "soft:3@0.8"):
        routing = resolve_routing(b, asked)
        fine, sup = b.predictor().predict(x, routing)
        for j, d in enumerate(images):
            r = client.post(f"{prefix}/predict?top_k={C}" + (f"&routing={asked}" if asked else ""), content=d,
                            headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["routing"] == str(routing)
            probs = {e["id"]: e["probability"] for e in got["top_k"]}
            want = dict(zip(b.hierarchy.subclass_ids, fine[j].tolist()))
            assert max(abs(probs[k] - want[k]) for k in want) < 1e-5, (asked, j)
            assert got["superclass"]["index"] == int(sup[j].argmax())
    r = client.post(f"{prefix}/predict?routing=hard%2B0.5", content=images[0], headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and "trunk_router" in r.json()["detail"]
    health = client.get(f"{prefix}/healthz").json()
    assert health["stage_one"] == "trunk_router"
    engine = b.predictor().resident_bytes()
    stages = ("model",) if graph == "single" else ("generalist", "specialist")
    assert health["resident_bytes"] == {s: {**engine, "total": sum(engine.values())} for s in stages}
    assert engine["router"] > 0 and engine["decoded_cache"] == 0


def test_replicas_report_the_bytes_the_engine_counts(client: httpx.Client, bundles: dict[str, Path]) -> None:
    """/healthz says what the replica of each model stage holds (TwoStagePredictor.resident_bytes
    by component, and their total): the engine's own count for the same bundle, with no decoded
    delta kept; the vanilla app's network, its parameters and buffers."""
    engine = load_bundle(bundles["vanilla"]).predictor().resident_bytes()
    want = {**engine, "total": sum(engine.values())}
    assert engine["decoded_cache"] == 0 and engine["deltas"] > 0
    for _ in range(3):  # predictions between the checks: the figure does not grow with use
        assert client.get("/two/healthz").json()["resident_bytes"] == {"model": want}
        assert client.get("/stages/healthz").json()["resident_bytes"] == {"generalist": want, "specialist": want}
        for prefix in ("/two", "/stages"):
            for routing in ("hard", "soft:3"):
                client.post(f"{prefix}/predict?routing={routing}", content=JPG, headers={"content-type": "image/jpeg"})
    from supersub.resnet import state_bytes

    net = state_bytes(load_bundle(bundles["generalist"]).load_vanilla())
    assert client.get("/vanilla/healthz").json()["resident_bytes"] == {"network": {"network": net, "total": net}}


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
    preds = many.json()["predictions"]
    assert len(preds) == 2
    batch = client.post("/two/predict", json={"images": [base64.b64encode(d).decode() for d in (jpg, png)]}).json()
    assert [p["subclass"]["id"] for p in batch["predictions"]] == [p["subclass"]["id"] for p in preds]
    assert len(client.post("/two/predict?top_k=2", content=jpg, headers={"content-type": "image/jpeg"}).json()["top_k"]) == 2


def test_vanilla_app(client: httpx.Client, bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["generalist"])
    net = b.load_baseline("vanilla")
    with torch.no_grad():
        want = torch.softmax(net(_x(image_bytes(7))[None]), 1)[0]
    got = client.post("/vanilla/predict?top_k=12", content=image_bytes(7), headers={"content-type": "image/jpeg"}).json()
    _check_schema(got, stages=("network",))
    probs = {e["id"]: e["probability"] for e in got["top_k"]}
    assert max(abs(probs[k] - w) for k, w in zip(b.hierarchy.subclass_ids, want.tolist())) < 1e-5
    assert got["routing"] == "vanilla"
    assert client.post("/vanilla/predict?routing=hard", content=JPG, headers={"content-type": "image/jpeg"}).status_code == 422


def test_health_hierarchy_openapi(client: httpx.Client, bundles: dict[str, Path]) -> None:
    """(9) No /docs page whose Swagger UI would come from a CDN; the OpenAPI document has real examples."""
    h = client.get("/two/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["routing"] == "soft:2@0.9" and h.json()["routings"]["soft_pooled"] == "soft:2@0.9+0.5"
    assert client.get("/two/hierarchy").json() == load_bundle(bundles["vanilla"]).hierarchy.to_dict()
    assert client.get("/two/docs").status_code == 404
    spec = client.get("/two/openapi.json").json()
    post = spec["paths"]["/predict"]["post"]
    assert "image/jpeg" in post["requestBody"]["content"]
    top_k = next(p for p in post["parameters"] if p["name"] == "top_k")
    assert top_k["schema"]["examples"] == [5] and top_k["schema"]["default"] == 5


def test_a_models_uri_is_served_by_replicas_that_cannot_see_its_store(client: httpx.Client, mlflow_store: Path) -> None:
    """(3) /vanilla serves models:/<name>/1 from a store only the builder's environment names,
    placed in bundle_cache: its replicas, whose environment names no store, read the folder
    (test_vanilla_app checks its answers against the bundle's network)."""
    assert client.get("/vanilla/healthz").json()["bundle"].startswith("models:/")
    r = client.post("/vanilla/predict", content=image_bytes(21), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert len(list((mlflow_store / "shared" / "bundles").iterdir())) == 1


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


BAD = {
    "not an image": (422, {"content": b"hello, not an image", "headers": {"content-type": "image/jpeg"}}),
    "truncated jpeg": (422, {"content": JPG[: len(JPG) // 2], "headers": {"content-type": "image/jpeg"}}),
    "empty body": (400, {"content": b"", "headers": {"content-type": "image/png"}}),
    "wrong content type": (415, {"content": JPG, "headers": {"content-type": "text/plain"}}),
    "no content type": (415, {"content": JPG}),
    "body too large": (413, {"content": b"\xff" * 400_000, "headers": {"content-type": "image/jpeg"}}),
    "chunked body too large": (413, {"content": iter([b"\xff" * 100_000] * 4), "headers": {"content-type": "image/jpeg"}}),
    "too many pixels": (413, {"content": _png_claiming(5000, 5000), "headers": {"content-type": "image/png"}}),
    "too many pixels in the request": (413, {"json": {"images": [_b64(_png_claiming(900, 900))] * 3}}),
    "batch over limit": (413, {"json": {"images": [_b64(JPG)] * 5}}),
    "multipart batch over limit": (413, {"files": [("file", ("a.jpg", JPG, "image/jpeg"))] * 9}),
    "malformed base64": (400, {"json": {"image": "@@not base64@@"}}),
    "malformed json": (400, {"content": b'{"image": ', "headers": {"content-type": "application/json"}}),
    "json nested 100,000 deep": (400, {"content": b"[" * 100_000 + b"]" * 100_000,  # (1)
                                       "headers": {"content-type": "application/json"}}),
    "json without image": (422, {"json": {"img": _b64(JPG)}}),
    "json empty batch": (422, {"json": {"images": []}}),
    "base64 of not an image": (422, {"json": {"image": _b64(b"hello")}}),
    "one bad image in a batch": (422, {"json": {"images": [_b64(JPG), _b64(b"junk")]}}),
    "multipart without file": (422, {"files": {"other": ("x.txt", b"hi", "text/plain")}}),
    "multipart garbage": (400, {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
    "top_k zero": (422, {"params": {"top_k": 0}, "content": JPG, "headers": {"content-type": "image/jpeg"}}),
    "unknown query parameter": (422, {"params": {"k": 3}, "content": JPG, "headers": {"content-type": "image/jpeg"}}),
    "bad routing": (422, {"params": {"routing": "soft:2@7"}, "content": JPG, "headers": {"content-type": "image/jpeg"}}),
    "routing k over the superclasses": (422, {"params": {"routing": "soft:99"}, "content": JPG,  # (21.5)
                                              "headers": {"content-type": "image/jpeg"}}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_4xx_json_with_reason(client: httpx.Client, case: str) -> None:
    status, kwargs = BAD[case]
    r = client.post("/two/predict", **kwargs)
    if case == "multipart garbage":  # starlette may see no parts at all rather than a broken one
        assert r.status_code in (400, 422), r.text
    else:
        assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json") and r.json()["detail"], r.text
    assert isinstance(r.json()["detail"], str), r.text  # (21.5) one string, pydantic's 422 too
    if case == "top_k zero":
        assert r.json()["detail"].startswith("query.top_k: "), r.text
    if case == "routing k over the superclasses":
        assert "k = 99 but the bundle has 3 superclasses" in r.json()["detail"], r.text
    if case == "one bad image in a batch":
        assert "image 1" in r.json()["detail"]


def test_slow_clients_do_not_take_the_service_down(server: str) -> None:
    """(2) Clients that send one body byte and stall are cut off (408) after body_timeout_s,
    and /healthz and /predict keep answering meanwhile."""
    from urllib.parse import urlparse

    u = urlparse(server)
    socks = []
    for _ in range(40):
        s = socket.create_connection((u.hostname, u.port), timeout=30)
        s.sendall(b"POST /two/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n\xff")
        socks.append(s)
    try:
        with httpx.Client(base_url=server, timeout=10) as c:
            t0 = time.perf_counter()
            assert c.get("/two/healthz").status_code == 200
            assert c.post("/two/predict", content=JPG, headers={"content-type": "image/jpeg"}).status_code == 200
            assert time.perf_counter() - t0 < 8
        replies = []
        for s in socks[:5]:
            s.settimeout(30)
            replies.append(s.recv(200))
        assert all(r.startswith(b"HTTP/1.1 408") for r in replies), replies
    finally:
        for s in socks:
            s.close()


def test_still_answers_after_bad_input(client: httpx.Client) -> None:
    for _, kwargs in BAD.values():
        assert client.post("/two/predict", **kwargs).status_code < 500
    assert client.get("/two/healthz").status_code == 200
    assert client.post("/two/predict", content=JPG, headers={"content-type": "image/jpeg"}).status_code == 200


# ------------------------------------------------------------------------------ fault tolerance (last)
def _replicas(app_name: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def _running(app_name: str, deployment: str) -> int:
    d = serve.status().applications[app_name].deployments[deployment]
    return sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))


def test_healthz_is_503_while_a_stage_is_down(server: str) -> None:
    """(4) With every Specialist replica dead, /healthz says so (503), then ok again once Serve
    has replaced them. The replicas are kept dead (each replacement killed as it appears) until
    /healthz answers: on a quiet machine Serve replaces them within the health check's own 5 s
    wait, and a stage that is back is rightly healthy."""
    stop = threading.Event()

    def keep_down() -> None:
        while not stop.is_set():
            for name in _replicas("stages", "Specialist"):
                with contextlib.suppress(ValueError):  # gone between the listing and the lookup
                    ray.kill(ray.get_actor(name, namespace="serve"))
            stop.wait(0.2)

    killer = threading.Thread(target=keep_down, daemon=True)
    killer.start()
    with httpx.Client(base_url=server, timeout=30) as c:
        try:
            time.sleep(0.5)  # the first kills have landed
            r = c.get("/stages/healthz")
        finally:
            stop.set()
            killer.join()
        assert r.status_code == 503 and r.headers.get("retry-after") and "unavailable" in r.json()["detail"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and c.get("/stages/healthz").status_code != 200:
            time.sleep(1)
        assert c.get("/stages/healthz").status_code == 200
    while time.monotonic() < deadline and _running("stages", "Specialist") < 2:  # both back, for the tests after
        time.sleep(0.5)
    assert _running("stages", "Specialist") == 2


@pytest.mark.parametrize("deployment", ["Specialist"])
def test_replica_kill_under_load(server: str, deployment: str) -> None:
    """Killing a Specialist replica (retried by the Generalist, in the Ingress) under 200
    concurrent requests loses at most 1 % of them (counted at the client, no retries there) and
    Serve brings the replica back."""
    deadline = time.monotonic() + 90
    while _running("stages", deployment) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    before = _replicas("stages", deployment)
    assert len(before) == 2, before
    images = [image_bytes(100 + i) for i in range(16)]
    total, threads = 200, 4
    done, failures, lock = [0], [], threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=server, timeout=TIMEOUT) as c:
            for i in range(k, total, threads):
                try:
                    r = c.post("/stages/predict", content=images[i % len(images)], headers={"content-type": "image/jpeg"})
                    ok, err = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead and not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _poll(fn, want, timeout: float = 30.0):
    """``fn()`` until ``want(result)``, at most ``timeout`` seconds; the last result."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if want(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_drain_flag_refuses_new_requests_with_503_and_retry_after(client: httpx.Client) -> None:
    """(7) While the app's drain flag (an actor, seen by every replica on every node) is set,
    /predict answers 503 + Retry-After (and closes the connection) and /healthz 503 with the
    requests in flight; other apps are untouched; resuming serves again. When the flag's owner
    (the launcher) dies, the replicas drain at once: nobody is left to resume them."""
    from serve.drain import NAMESPACE, create

    def predict() -> httpx.Response:
        return client.post("/two/predict", content=JPG, headers={"content-type": "image/jpeg"})

    assert predict().status_code == 200
    flag = ray.get_actor(DRAIN, namespace=NAMESPACE)
    ray.get(flag.start.remote(0.0), timeout=30)
    r = _poll(predict, lambda r: r.status_code == 503, 10)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    assert "draining" in r.json()["detail"]
    h = client.get("/two/healthz")
    assert h.status_code == 503 and h.json()["in_flight"] == 0
    assert ray.get(flag.busy.remote(), timeout=30) == (0, 0)  # the replica has reported it is idle
    assert client.get("/stages/healthz").status_code == 200
    ray.get(flag.resume.remote(), timeout=30)
    assert _poll(predict, lambda r: r.status_code == 200, 10).status_code == 200
    assert client.get("/two/healthz").status_code == 200

    ray.kill(ray.get_actor(f"{DRAIN}-owner", namespace=NAMESPACE))  # as a launcher's exit ends its flag
    assert _poll(predict, lambda r: r.status_code == 503, 30).status_code == 503
    assert client.get("/two/healthz").status_code == 503
    KEEP.append(create(DRAIN))  # a new flag of that name (a new launcher): served again
    assert _poll(predict, lambda r: r.status_code == 200, 30).status_code == 200

    # The command for apps deployed without the launcher (serve deploy): same flag, by name.
    import os
    import subprocess
    import sys

    for extra, status in ((["--grace-s", "0"], 503), (["--resume"], 200)):
        done = subprocess.run([sys.executable, "-m", "serve.drain", DRAIN, *extra], cwd=Path(__file__).parents[1],
                              env=dict(os.environ), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _poll(predict, lambda r, want=status: r.status_code == want, 30).status_code == status


def _listening(port: int) -> list[str]:
    """The IPv4 addresses a TCP port listens on here (Linux /proc), e.g. ["127.0.0.1"]."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
            out.append(socket.inet_ntoa(struct.pack("<I", int(addr, 16))))
    return out


# (21.3) The listening sockets Ray itself opens on every interface (Ray 2.60 has no bind address;
# README, Serving): how many each kind of process may hold. Everything else — HAProxy's frontend,
# stats and metrics, the replicas' HTTP ports, Serve's fallback proxy — must be on loopback.
RAY_OWN_PORTS = {
    "gcs_server": 99, "raylet": 99, "ray::DashboardAgent": 99, "ray::RuntimeEnvAgent": 99,
    "autoscaler monitor": 1,  # its metrics port
    "ray::ServeReplica": 2,  # the worker's core gRPC port + Serve's inter-deployment gRPC server ([::]:0)
    "ray worker": 1,  # the driver, the controller, proxy and HAProxy manager actors: the core gRPC port
}


def _ray_kind(name: str) -> str:
    for kind in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ServeReplica"):
        if kind in name:
            return kind
    if "haproxy" in name and "ray::" not in name:
        return "haproxy"
    if name.endswith("python") or name.startswith("ray::"):
        return "ray worker"
    return name


def _kill_one(root: int, prefix: str) -> int:
    """SIGKILL the first process under ``root`` whose name starts with ``prefix``; its pid."""
    import os
    import signal

    from serve_helpers import process_tree

    for pid in process_tree(root):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if name.startswith(prefix):
            os.kill(pid, signal.SIGKILL)
            return pid
    raise AssertionError(f"no process {prefix}* under {root}")


@pytest.mark.parametrize("graph,victim,target", [("single", "Ingress", "launcher"), ("stages", "Specialist", "group")])
def test_launcher_ports_replica_kill_and_drain(bundles: dict[str, Path], tmp_path: Path, graph: str,
                                               victim: str, target: str) -> None:
    """`python -m serve` as a user runs it (HAProxy ingress; the default graph, whose model lives
    in the Ingress replicas, and the per-stage graph), one launch for four checks (each launch
    costs a minute or two here):

    * (21.3) every listening socket of its whole process tree is on loopback, but those Ray's own
      processes open on every interface (RAY_OWN_PORTS, as the README lists them);
    * (21.1) SIGKILL of one of the two model replicas (for `stages`, a Specialist) under 4 keep-alive
      clients: at most 1 % of
      the requests fail, none takes more than 2 s beyond the median before the kill (it was 28.9 s
      with one replica);
    * (7, 21.4) on SIGTERM every request sent before it is answered 200 (a 1 s grace: the ones on
      their way are not refused), then new ones 503 + Retry-After — from every ingress replica:
      none answers 200 to a request sent a second after the grace —
      never cuts an answer mid-body, and exits 0 within seconds;
    * the SIGTERM goes to the launcher, or to its whole process group (as `timeout` and a
      service manager send it): either way the
      drain above, then no process of the launcher's left, HAProxy's included, and the HTTP,
      stats and metrics ports free.
    """
    import os
    import signal
    import statistics
    import subprocess
    import sys

    from serve_helpers import closed_loop_load, is_loopback, listening_sockets, process_tree

    port, stats, metrics = _free_port(), _free_port(), _free_port()
    env = _launcher_env(RAY_SERVE_HAPROXY_STATS_PORT=str(stats), RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics))
    proc = subprocess.Popen([sys.executable, "-m", "serve", f"bundle={bundles['vanilla']}", "--port", str(port),
                             "batch_wait_ms=50", f"graph={graph}"], cwd=Path(__file__).parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 300
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("serving ") or proc.poll() is not None:
                break
        assert any(x.startswith("serving ") for x in lines), "".join(lines)
        assert "ingress: HAProxy (--proxy haproxy)\n" in lines, "".join(lines)
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe from filling

        # --- every port on loopback but Ray's own
        socks = listening_sockets(proc.pid)
        for p in (port, stats, metrics):
            assert [a for a, q, _, _ in socks if q == p] == ["127.0.0.1"], (p, socks)
        wide: dict[int, list[tuple[str, int, str]]] = {}
        for addr, p, pid, name in socks:
            if not is_loopback(addr):
                wide.setdefault(pid, []).append((addr, p, name))
        for pid, held in wide.items():
            kind = "autoscaler monitor" if "monitor.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                errors="replace") else _ray_kind(held[0][2])
            assert len(held) <= RAY_OWN_PORTS.get(kind, 0), (kind, held)

        # --- a model replica killed under load
        images = [image_bytes(100 + i) for i in range(16)]
        killed = []
        results = closed_loop_load(f"http://127.0.0.1:{port}/predict", images, 4, 16.0,
                                   {5.0: lambda: killed.append(_kill_one(proc.pid, f"ray::ServeReplica:supersub:{victim}"))})
        assert killed
        normal = statistics.median(done - sent for sent, done, code in results if code == 200 and done < 5.0)
        failed = [(round(sent, 2), code) for sent, done, code in results if code != 200]
        slow = [(round(sent, 2), round(done - sent, 2)) for sent, done, code in results if done - sent > normal + 2.0]
        assert len(failed) <= len(results) // 100, failed
        assert not slow, (normal, slow)

        # --- drain on SIGTERM
        deadline = time.monotonic() + 120  # Serve replaces the killed replica: both up again
        while time.monotonic() < deadline and len({pid for _, _, pid, n in listening_sockets(proc.pid)
                                                   if n.startswith(f"ray::ServeReplica:supersub:{victim}")}) < 2:
            time.sleep(1)
        drained: list[tuple[float, float, int | str, str | None]] = []  # (sent, answered, status, Retry-After)
        signalled = threading.Event()

        def client() -> None:  # requests back to back until the launcher has been signalled
            with httpx.Client(timeout=60) as c:
                while not signalled.is_set():
                    sent = time.monotonic()
                    try:
                        r = c.post(f"http://127.0.0.1:{port}/predict", content=JPG, headers={"content-type": "image/jpeg"})
                        r.json()  # the whole body arrived and parses
                        code, retry = r.status_code, r.headers.get("retry-after")
                    except (httpx.HTTPError, ValueError) as e:  # the port closing under a new request
                        code, retry = f"{type(e).__name__}: {e}", None
                    drained.append((sent, time.monotonic(), code, retry))

        pool = [threading.Thread(target=client) for _ in range(8)]
        for t in pool:
            t.start()
        time.sleep(1.0)
        tree = process_tree(proc.pid)
        haproxy = [pid for _, _, pid, name in listening_sockets(proc.pid) if _ray_kind(name) == "haproxy"]
        assert haproxy, listening_sockets(proc.pid)
        at = time.monotonic()
        if target == "group":
            os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        time.sleep(3.5)  # past the 1 s grace (--drain-grace-s) and a second more: requests meet the drain
        signalled.set()
        for t in pool:
            t.join(timeout=90)
        assert proc.wait(timeout=60) == 0
        stopped = time.monotonic() - at
        assert all(code == 200 for sent, done, code, _ in drained if done < at), drained
        spanning = [code for sent, done, code, _ in drained if sent < at <= done]
        assert spanning and all(code == 200 for code in spanning), drained  # sent before the signal: answered
        after = [(code, retry) for sent, done, code, retry in drained if done >= at]
        assert all(code == 200 or (code == 503 and retry == "1") or isinstance(code, str) for code, retry in after), after
        # A request that met the closing port may fail to connect or find its idle keep-alive
        # connection closed — never an answer cut mid-body.
        cut = [code for code, _ in after if isinstance(code, str) and ("incomplete" in code.lower()
                                                                        or "ValueError" in code)]
        assert not cut, cut
        assert any(code == 503 for code, _ in after), after
        late = [(round(sent - at, 2), code) for sent, done, code, _ in drained if sent > at + 2.0 and code == 200]
        assert not late, late  # every ingress replica refuses once the grace is over
        assert stopped < 30, stopped
        left = _poll(lambda: [pid for pid in tree if _alive(pid)], lambda x: not x, 15)
        assert not left, [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:80]) for pid in left]
        assert not any(_alive(pid) for pid in haproxy)
        for p in (port, stats, metrics):
            assert _listening(p) == [], p
    finally:
        if proc.poll() is None:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        for pid in tree:  # what a failed run left behind
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_launcher_stops_cleanly_on_an_early_sigterm(bundles: dict[str, Path]) -> None:
    """(21.4) A SIGTERM as soon as the launcher runs (its supervisor has started the launcher
    proper, which is still importing): exit 0, and Ray never started — the signal is passed on
    and acted on before anything it could interrupt."""
    import os
    import signal
    import subprocess
    import sys

    from serve_helpers import process_tree

    env = _launcher_env()
    proc = subprocess.Popen([sys.executable, "-m", "serve", f"bundle={bundles['vanilla']}", "--port", str(_free_port())],
                            cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert len(_poll(lambda: process_tree(proc.pid), lambda t: len(t) > 1, 60)) > 1, "no launcher started"
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert not list(Path(env["RAY_TMPDIR"]).iterdir()), "Ray started after the SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (a `ray start` in its own session: its Ray, workers and HAProxy)."""
    import os

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(d.name)) == sid and _alive(int(d.name)):
                    out.append(int(d.name))
    return out


def _stop_session(sid: int) -> None:
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _poll(lambda: _session(sid), lambda left: not left, 20)


@contextlib.contextmanager
def _ray_cluster(env: dict[str, str]) -> Iterator[str]:
    """A `ray start --head` on this host with ``env`` as its environment, in a session of its
    own; its address. Stopped by session at the end (never `ray stop`: it stops every Ray here).
    Started once more if its node timed out during start-up (an overloaded host)."""
    import shutil
    import subprocess
    import sys

    from ray_helpers import free_port

    heads: list[subprocess.Popen] = []
    temp = tempfile.mkdtemp(prefix="ssjoin-", dir="/tmp")
    try:
        for attempt in (1, 2):
            gcs = free_port()
            ports = [f"--{name}-port={free_port()}" for name in ("dashboard-agent-listen", "dashboard-agent-grpc",
                                                                 "runtime-env-agent", "metrics-export", "ray-client-server")]
            heads.append(subprocess.Popen(
                [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={gcs}", f"--temp-dir={temp}",
                 "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                 *ports], env={**env, "RAY_TMPDIR": temp}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True))
            out, _ = heads[-1].communicate(timeout=180)
            if heads[-1].returncode == 0 or attempt == 2 or "timed out during startup" not in out:
                break
            _stop_session(heads[-1].pid)
        assert heads[-1].returncode == 0, out
        yield f"127.0.0.1:{gcs}"
    finally:
        for head in heads:
            if head.poll() is None:
                head.kill()
            _stop_session(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_launcher_on_a_cluster_it_joins(bundles: dict[str, Path], tmp_path: Path) -> None:
    """(3, 4, 5) `python -m serve` joining a running cluster whose environment is not the
    launcher's — another HOME, no tracking store, a bundle key — as a second node's would be:

    * a replica failing to start is one line with its own error (here: the cluster's key asks
      for signed bundles and this one is not), not "Failed to update the deployments";
    * Serve's processes run HAProxy (its settings reach them through Ray), and the console says so;
    * bundle=models:/... in a store only the launcher's environment names is served: resolved
      once by the launcher, the files shipped to the replicas;
    * on SIGTERM it drains and exits 0, the cluster left running; with no app deployed any more,
      the cluster's HAProxy answers 503 + Retry-After, not 404.
    """
    import os
    import signal
    import subprocess
    import sys

    key = "cluster-key"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPERSUB_BUNDLE_KEY", key)
        signed = make_tiny_bundle(tmp_path / "signed", resident="vanilla", seed=3)
        uri = _register(signed, tmp_path / "store", mp)
        store = os.environ["MLFLOW_TRACKING_URI"]
    cluster_env = {**os.environ, "HOME": str(tmp_path / "cluster-home"), "RAY_AUTH_MODE": "disabled",
                   "SUPERSUB_BUNDLE_KEY": key}
    for name in [k for k in cluster_env if k.startswith(("RAY_SERVE_", "MLFLOW_", "SUPERSUB_CACHE"))] + ["RAY_ADDRESS"]:
        cluster_env.pop(name, None)
    port, stats, metrics = _free_port(), _free_port(), _free_port()

    def launch(bundle: str, address: str, **extra: str) -> subprocess.Popen:
        env = {**_launcher_env(RAY_SERVE_HAPROXY_STATS_PORT=str(stats), RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics),
                               **extra), "RAY_ADDRESS": address}
        return subprocess.Popen([sys.executable, "-m", "serve", f"bundle={bundle}", "--port", str(port), "replicas=1"],
                                cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    with _ray_cluster(cluster_env) as address:
        failing = launch(str(bundles["vanilla"]), address)
        try:
            out, _ = failing.communicate(timeout=600)
        finally:
            if failing.poll() is None:
                os.killpg(os.getpgid(failing.pid), signal.SIGKILL)
        errors = [x for x in out.splitlines() if x.startswith("python -m serve: error:")]
        assert failing.returncode == 1 and len(errors) == 1, out
        assert "is not signed, and SUPERSUB_BUNDLE_KEY asks for signed bundles" in errors[0], out
        assert "Traceback" not in out, out

        proc = launch(uri, address, MLFLOW_TRACKING_URI=store, SUPERSUB_BUNDLE_KEY=key)
        try:
            lines: list[str] = []
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not any(x.startswith("serving ") for x in lines):
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
                lines.append(line)
            assert any(x.startswith("serving ") for x in lines), "".join(lines)
            assert any(x.startswith("ingress: HAProxy (") for x in lines), "".join(lines)
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            assert [q for q in (stats, metrics) if _listening(q) == ["127.0.0.1"]] == [stats, metrics]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                r = c.post("/predict", content=JPG, headers={"content-type": "image/jpeg"})
                assert r.status_code == 200, r.text
                os.kill(proc.pid, signal.SIGTERM)
                assert proc.wait(timeout=120) == 0
                gone = c.post("/predict", content=JPG, headers={"content-type": "image/jpeg"})
                assert gone.status_code == 503 and gone.headers.get("retry-after") == "1", gone.text
                assert isinstance(gone.json()["detail"], str)
        finally:
            if proc.poll() is None:
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
