"""A tiny random bundle and test images for the serving tests and the load script.

No data layer and no training: random-initialised ``resnet10 × 0.25`` networks and random
sparse quantised deltas, written with :func:`supersub.bundle.write_bundle`. The heads are fitted
to standardised features of probe pictures, so that pictures go to different superclasses and
some pass a routing threshold while others do not: every routing path runs.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from supersub.bundle import write_bundle
from supersub.data import build_transforms
from supersub.delta import DeltaConfig, add_delta, export_delta
from supersub.hierarchy import Hierarchy, Subclass, Superclass
from supersub.networks import NetworkSpec
from supersub.resnet import ModelConfig, build_model
from supersub.trunk_router import router_spec

IMAGE_SIZE = 32
# What a pipeline would have calibrated; the bundle serves "soft" (threshold 0.9: some pictures
# pass it, others do not, so every routing path runs).
ROUTINGS = {
    "vanilla": {"hard": "hard", "soft": "soft:2@0.9", "hard_pooled": "hard+0.5", "soft_pooled": "soft:2@0.9+0.5"},
    "generalist": {"hard": "hard", "soft": "soft:2@0.9"},
}


def tiny_hierarchy(num_superclasses: int = 3) -> Hierarchy:
    return Hierarchy(
        "tiny",
        tuple(
            Superclass(f"n0{i}", f"super{i}", tuple(Subclass(f"n1{i}{j}", f"sub{i}.{j}") for j in range(3 + i)))
            for i in range(num_superclasses)
        ),
    )


def _probe_images(n: int = 64) -> torch.Tensor:
    """Image-like inputs ``[n, 3, 32, 32]``: pictures of :func:`image_bytes`, preprocessed."""
    transform = build_transforms(IMAGE_SIZE, train=False)
    return torch.stack([transform(Image.open(io.BytesIO(image_bytes(10_000 + i))).convert("RGB")) for i in range(n)])


@torch.no_grad()
def _fit_head(net: torch.nn.Module, head: torch.nn.Linear, x: torch.Tensor, scale: float,
              feats: torch.Tensor | None = None) -> None:
    """A random head over standardised features (``feats``, else the network's pooled ones):
    random networks map every picture to about the same features, and a plain random head would
    answer one class for all of them."""
    h = feats if feats is not None else torch.flatten(net.avgpool(net.forward_stages(x)), 1)
    mu, sd = h.mean(0), h.std(0).clamp_min(1e-6)
    w = torch.randn(head.out_features, h.shape[1]) / h.shape[1] ** 0.5 * scale / sd
    head.weight.copy_(w)
    head.bias.copy_(-(w @ mu))


def _randomise(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)  # zero-init residual BNs would make blocks identities
    net.eval()
    _fit_head(net, net.fc, x, 3.0)
    return net


def make_tiny_bundle(
    out: str | Path,
    *,
    resident: Literal["vanilla", "generalist"] = "vanilla",
    stages: tuple[str, ...] = ("layer3", "layer4"),
    num_superclasses: int = 3,
    routings: dict[str, str] | None = None,
    seed: int = 0,
    router: bool = False,
) -> Path:
    """Writes a bundle to ``out``: the resident network, one delta per superclass (with an
    "other" output), for a generalist resident a vanilla baseline and, with ``router``, a trunk
    router (stage one on the trunk before ``stages``; its routings cannot pool)."""
    torch.manual_seed(seed)
    h = tiny_hierarchy(num_superclasses)
    mc = ModelConfig(backbone="resnet10", width=0.25)
    n_out = h.num_subclasses if resident == "vanilla" else h.num_superclasses
    x = _probe_images()
    base = _randomise(build_model(mc, n_out, IMAGE_SIZE), x)
    cfg = DeltaConfig(keep=0.1, bits=4, stages=list(stages))
    deltas = {}
    for s, sup in enumerate(h.superclasses):
        spec = copy.deepcopy(base)
        head = torch.nn.Linear(spec.num_features, len(sup.subclasses) + 1)
        for d in add_delta(spec, cfg, head):
            d.delta.data.normal_(0, 0.05)
        _fit_head(spec.eval(), head, x, 3.0)
        deltas[s] = export_delta(spec.eval(), cfg, s)
    baselines = {}
    if resident != "vanilla":
        vanilla = _randomise(build_model(mc, h.num_subclasses, IMAGE_SIZE), x)
        baselines["vanilla"] = (vanilla, NetworkSpec(mc, h.num_subclasses, IMAGE_SIZE))
    write_bundle(
        out,
        base=base,
        base_spec=NetworkSpec(mc, n_out, IMAGE_SIZE),
        resident=resident,
        hierarchy=h,
        deltas=deltas,
        delta_cfg=cfg,
        routings=routings or ROUTINGS[resident],
        serves={"model": "two_stage_soft", "routing": (routings or ROUTINGS[resident])["soft"]},
        evaluation={"batch_size": 64, "top": 3},
        baselines=baselines,
        router=_router(base, cfg, h.num_superclasses, x) if router else None,
    )
    return Path(out)


def _router(base: torch.nn.Module, cfg: DeltaConfig, num_superclasses: int, x: torch.Tensor):
    """A trunk router whose random head is standardised on ``x`` (so images route to many superclasses)."""
    spec = router_spec(base, cfg.first_stage, IMAGE_SIZE, 0.5, num_superclasses)
    router = spec.build().eval()
    with torch.no_grad():
        trunk = router.conv(base.forward_stages(x, 0, cfg.first_stage))
        feats = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(trunk, 1), 1)
        _fit_head(router, router.fc, x, 3.0, feats)
    return router, spec


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 40)) -> bytes:
    """A random smooth-ish RGB picture, encoded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BILINEAR)
    noise = rng.integers(-20, 20, (size[1], size[0], 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ------------------------------------------------------------------------------ process trees (Linux /proc)
def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _listening_by_inode() -> dict[int, tuple[str, int]]:
    """Every listening TCP socket of this network namespace: inode → (address, port)."""
    import socket
    import struct

    out = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)  # in host order, per 32-bit word
            packed = struct.pack("<I", int(addr, 16)) if family == socket.AF_INET else \
                b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            out[int(f[9])] = (socket.inet_ntop(family, packed), int(port, 16))
    return out


def listening_sockets(root: int) -> list[tuple[str, int, int, str]]:
    """The listening TCP sockets of ``root``'s whole process tree: (address, port, pid, process
    name), the name being argv[0] (Ray renames its workers ``ray::ServeReplica:...``)."""
    sockets, out = _listening_by_inode(), set()
    for pid in process_tree(root):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        for fd in fds:
            try:
                link = fd.readlink().as_posix()
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                out.add((*sockets[int(link[8:-1])], pid, name))
    return sorted(out)


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


# ------------------------------------------------------------------------------ load
def closed_loop_load(url: str, bodies: list[bytes], clients: int, seconds: float, events: dict | None = None,
                     timeout: float = 30.0) -> list[tuple[float, float, int | str]]:
    """``clients`` keep-alive clients POSTing ``bodies`` (JPEG) to ``url`` back to back for
    ``seconds``; ``events`` maps a second (from the start) to a function called then, from this
    thread. Returns (sent, answered, status or exception name) per request, times in seconds
    from the start. No retries at the client: what fails here, a user saw fail."""
    import threading
    import time

    import httpx

    results: list[tuple[float, float, int | str]] = []
    lock, t0 = threading.Lock(), time.monotonic()
    end = t0 + seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=timeout) as c:
            while time.monotonic() < end:
                sent = time.monotonic() - t0
                try:
                    code: int | str = c.post(url, content=bodies[i % len(bodies)],
                                             headers={"content-type": "image/jpeg"}).status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    results.append((sent, time.monotonic() - t0, code))
                i += clients

    pool = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in pool:
        t.start()
    for at, fn in sorted((events or {}).items()):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        fn()
    for t in pool:
        t.join(timeout=seconds + timeout + 10)
    return sorted(results)


# ------------------------------------------------------------------------------ trained bundles
# The pipeline's tiny settings (tests/test_pipeline.py): synthetic 16 px images, one epoch each.
TRAINED_BUNDLE_SETTINGS = [
    "resources.runner=local", "tracking.enabled=false", "report=false",
    "data.source=synthetic:superclasses=3,subclasses=3,per_class=40,size=16,confusion=0.1",
    "data.image_size=16", "data.num_workers=0", "model.width=0.125", "train.epochs=1", "train.batch_size=32",
    "specialist.optim.epochs=1", "specialist.optim.batch_size=32", "evaluation.bootstrap=10",
    "baselines.vanilla_long=false", "baselines.delta_all=false",
    "generalist.kind=trunk_router", "delta.stages=[layer4]", "generalist.router_optim.epochs=1",
]
# Bundle kinds whose stage one is the trunk router, by how the pipeline trains it.
TRAINED_KINDS = {"trunk_router": [], "joint": ["generalist.router_trunk=joint"]}


def make_trained_bundle(out: str | Path, kind: str) -> Path:
    """A bundle the pipeline trains (a few seconds on 2 cores) for a kind of :data:`TRAINED_KINDS`:
    ``trunk_router`` (a router head on the vanilla network's frozen trunk, specialists finetuned
    apart) or ``joint`` (trunk, router and every expert's delta trained together). Its folder."""
    import torch

    from supersub.config import load_config
    from supersub.pipeline import run_pipeline
    from supersub.pipeline_config import PipelineConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP threads would only wait for each other
    try:
        cfg = load_config(PipelineConfig, Path(__file__).parents[1] / "jobs/configs/default.yaml",
                          [*TRAINED_BUNDLE_SETTINGS, *TRAINED_KINDS[kind]])
        run_pipeline(cfg, Path(out), log=lambda _line: None)
    finally:
        torch.set_num_threads(threads)
    return Path(out) / "bundle"
