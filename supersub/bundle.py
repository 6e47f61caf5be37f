"""The bundle: everything serving and evaluation need, in one directory (or MLflow artifact).

::

    bundle/
      manifest.json            format version, backbone, hierarchy, delta spec, routing, byte
                               counts, sha256 and size of every file below
      base.safetensors         the resident network (generalist or vanilla)
      deltas/<i>.safetensors   one packed delta per superclass i (zero-padded)
      baselines/<name>.safetensors   optional: vanilla / scaled-up vanilla for comparison

Everything is safetensors or JSON: loading a bundle never unpickles. :func:`load_bundle` checks
every hash and refuses a changed, missing or unlisted file with a clear :class:`BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from supersub.config import from_dict, to_dict
from supersub.delta import DeltaConfig, PackedDelta
from supersub.errors import BundleError
from supersub.hierarchy import Hierarchy
from supersub.models import ModelConfig, ResNet, build_model, state_bytes

FORMAT_VERSION = 1
KIND = "supersub.bundle"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class NetworkSpec:
    """What is needed to rebuild a stored network: its config, output count and input size."""

    model: ModelConfig
    num_outputs: int
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "num_outputs": self.num_outputs, "image_size": self.image_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        return cls(from_dict(ModelConfig, d["model"]), int(d["num_outputs"]), int(d["image_size"]))

    def build(self) -> ResNet:
        return build_model(self.model, self.num_outputs, self.image_size)


def _save_network(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def write_bundle(
    out_dir: str | Path,
    *,
    base: torch.nn.Module,
    base_spec: NetworkSpec,
    resident: str,
    hierarchy: Hierarchy,
    deltas: dict[int, PackedDelta],
    delta_cfg: DeltaConfig,
    routing: dict[str, Any],
    baselines: dict[str, tuple[torch.nn.Module, NetworkSpec]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes a bundle atomically (into a temporary sibling, then renamed) and returns its manifest."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "deltas").mkdir(parents=True)
    _save_network(base, tmp / "base.safetensors")
    width = len(str(max(hierarchy.num_superclasses - 1, 0)))
    per_specialist = {}
    for s, packed in sorted(deltas.items()):
        name = f"deltas/{s:0{width}d}.safetensors"
        (tmp / name).write_bytes(packed.to_bytes())
        per_specialist[hierarchy.superclasses[s].id] = (tmp / name).stat().st_size
    base_files = {}
    for name, (model, spec) in (baselines or {}).items():
        (tmp / "baselines").mkdir(exist_ok=True)
        _save_network(model, tmp / f"baselines/{name}.safetensors")
        base_files[name] = {"file": f"baselines/{name}.safetensors", **spec.to_dict()}
    files = {
        str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*.safetensors"))
    }
    network_bytes = state_bytes(base)
    total_deltas = sum(per_specialist.values())
    manifest = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resident": resident,
        "base": {"file": "base.safetensors", **base_spec.to_dict()},
        "hierarchy": hierarchy.to_dict(),
        "delta": to_dict(delta_cfg),
        "routing": routing,
        "baselines": base_files,
        "bytes": {
            "network": network_bytes,
            "base_file": files["base.safetensors"]["bytes"],
            "per_specialist": per_specialist,
            "specialists_total": total_deltas,
            "mean_specialist_ratio": total_deltas / max(1, len(deltas)) / network_bytes,
            # "N+1 networks → x·N+1": the stored size of base + all deltas, in networks.
            "total_in_networks": (network_bytes + total_deltas) / network_bytes,
        },
        "files": files,
        **(extra or {}),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return manifest


class Bundle:
    """A verified bundle directory. Networks and deltas are read on demand."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self.hierarchy = Hierarchy.from_dict(manifest["hierarchy"])
        self.resident: str = manifest["resident"]
        self.base_spec = NetworkSpec.from_dict(manifest["base"])
        self.delta_cfg = from_dict(DeltaConfig, manifest["delta"])

    @property
    def image_size(self) -> int:
        return self.base_spec.image_size

    def _load_network(self, spec: NetworkSpec, file: str) -> ResNet:
        model = spec.build()
        model.load_state_dict(load_file(str(self.path / file)), strict=True)
        return model.eval()

    def load_base(self) -> ResNet:
        return self._load_network(self.base_spec, self.manifest["base"]["file"])

    def load_deltas(self) -> dict[int, PackedDelta]:
        out = {}
        for name in self.manifest["files"]:
            if name.startswith("deltas/"):
                packed = PackedDelta.from_bytes((self.path / name).read_bytes())
                out[int(packed.meta["superclass"])] = packed
        return out

    @property
    def baseline_names(self) -> list[str]:
        return list(self.manifest.get("baselines", {}))

    def load_baseline(self, name: str) -> ResNet:
        entry = self.manifest["baselines"].get(name)
        if entry is None:
            raise BundleError(f"bundle has no baseline {name!r} (has: {', '.join(self.baseline_names) or 'none'})")
        return self._load_network(NetworkSpec.from_dict(entry), entry["file"])

    def predictor(self, device: torch.device | str = "cpu", **kwargs: Any):
        from supersub.predictor import TwoStagePredictor

        return TwoStagePredictor(self.load_base(), self.hierarchy, self.load_deltas(), self.resident, device, **kwargs)

    def routing(self):
        from supersub.predictor import RoutingConfig

        return from_dict(RoutingConfig, self.manifest.get("routing", {}))


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Opens a bundle directory, checking its manifest and (``verify``) every file's sha256."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle: manifest.json is missing")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError(f"{mf} is not a supersub bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    listed = manifest.get("files", {})
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    foreign = sorted(present - set(listed))
    if foreign:
        raise BundleError(f"bundle {path} holds files its manifest does not list: {', '.join(foreign)}")
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"bundle {path} is missing {', '.join(missing)}")
    if verify:
        for name, entry in listed.items():
            if sha256_file(path / name) != entry["sha256"]:
                raise BundleError(f"bundle file {name} was changed: its sha256 does not match the manifest")
    return Bundle(path, manifest)
