"""The bundle: everything serving and evaluation need, in one directory (or MLflow artifact).

::

    bundle/
      manifest.json            format version, backbone, hierarchy, delta spec, every routing the
                               pipeline reported and the one it serves, byte counts, and the
                               sha256 and size of every file below
      manifest.json.hmac       optional: HMAC-SHA256 of manifest.json (SUPERSUB_BUNDLE_KEY)
      base.safetensors         the resident network (generalist or vanilla)
      deltas/<i>.safetensors   one packed delta per superclass i (zero-padded)
      baselines/<name>.safetensors   optional: the vanilla network when the resident is a generalist
      router.safetensors       optional: the trunk router (stage one on the resident's trunk)

Everything is safetensors or JSON: loading a bundle never unpickles. :func:`load_bundle` refuses,
with one :class:`BundleError` line naming the path: a path that is absolute or leads outside the
bundle, a file the manifest does not list or lists but is missing, a listed file that no field of
the format names (:func:`file_roles`), any byte that does not match its sha256, a file that is not
what it claims. Hashes are checked as files are read; :func:`verify_files` reads them all at once
(``python -m serve``'s pre-flight, before Ray starts). The hashes guard against corruption, not against
someone who rewrites the manifest too; with a key (``SUPERSUB_BUNDLE_KEY`` or ``key=``) bundles are
signed when written and refused when the signature is missing or does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load as st_load

from supersub.atomic import fsync_dir, fsync_tree
from supersub.config import from_dict, to_dict
from supersub.delta import DeltaConfig, PackedDelta
from supersub.errors import BundleError
from supersub.hierarchy import Hierarchy, HierarchyError
from supersub.networks import NetworkSpec, load_state, save_weights, sha256_file
from supersub.resnet import ResNet, state_bytes
from supersub.routing import Routing
from supersub.trunk_router import ROUTER_FILE, RouterSpec, TrunkRouter

FORMAT_VERSION = 2
KIND = "supersub.bundle"
SIGNATURE_FILE = "manifest.json.hmac"
KEY_ENV = "SUPERSUB_BUNDLE_KEY"

__all__ = ["Bundle", "NetworkSpec", "file_roles", "load_bundle", "sha256_file", "verify_files", "write_bundle"]


def _key(key: bytes | str | None) -> bytes | None:
    key = key if key is not None else os.environ.get(KEY_ENV) or None
    return key.encode() if isinstance(key, str) else key


def _sign(data: bytes, key: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def write_bundle(
    out_dir: str | Path,
    *,
    base: torch.nn.Module,
    base_spec: NetworkSpec,
    resident: str,
    hierarchy: Hierarchy,
    deltas: dict[int, PackedDelta],
    delta_cfg: DeltaConfig,
    routings: dict[str, str],
    serves: dict[str, str],
    evaluation: dict[str, Any] | None = None,
    baselines: dict[str, tuple[torch.nn.Module, NetworkSpec]] | None = None,
    router: tuple[torch.nn.Module, RouterSpec] | None = None,
    extra: dict[str, Any] | None = None,
    key: bytes | str | None = None,
) -> dict[str, Any]:
    """Writes a bundle atomically (into a temporary sibling, then renamed) and returns its manifest.

    ``routings``: every reported routing, by family (``{"hard": "hard", "soft": "soft:3@0.7"}``);
    ``serves``: ``{"model": name, "routing": compact form}``; ``evaluation``: how the pipeline
    evaluated (batch size, superclasses run per image), so ``supersub evaluate`` can repeat it."""
    Routing.parse(serves["routing"])
    for r in routings.values():
        Routing.parse(r)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "deltas").mkdir(parents=True)
    save_weights(base, tmp / "base.safetensors")
    width = len(str(max(hierarchy.num_superclasses - 1, 0)))
    per_specialist = {}
    for s, packed in sorted(deltas.items()):
        name = f"deltas/{s:0{width}d}.safetensors"
        (tmp / name).write_bytes(packed.to_bytes())
        per_specialist[hierarchy.superclasses[s].id] = (tmp / name).stat().st_size
    base_files = {}
    for name, (model, spec) in (baselines or {}).items():
        (tmp / "baselines").mkdir(exist_ok=True)
        save_weights(model, tmp / f"baselines/{name}.safetensors")
        base_files[name] = {"file": f"baselines/{name}.safetensors", **spec.to_dict()}
    if router is not None:
        save_weights(router[0], tmp / ROUTER_FILE)
    files = {
        p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
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
        "routings": dict(routings),
        "serves": dict(serves),
        "evaluation": evaluation or {},
        "baselines": base_files,
        **({"router": {"file": ROUTER_FILE, **router[1].to_dict()}} if router is not None else {}),
        "bytes": {
            "network": network_bytes,
            "base_file": files["base.safetensors"]["bytes"],
            "per_specialist": per_specialist,
            "specialists_total": total_deltas,
            "mean_specialist_ratio": total_deltas / max(1, len(deltas)) / network_bytes,
            "router": files[ROUTER_FILE]["bytes"] if router is not None else 0,
            # "N+1 networks → x·N+1": the stored size of base + all deltas (+ router), in networks.
            "total_in_networks": (network_bytes + total_deltas + (state_bytes(router[0]) if router else 0)) / network_bytes,
        },
        "files": files,
        **(extra or {}),
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (tmp / "manifest.json").write_bytes(data)
    k = _key(key)
    if k:
        (tmp / SIGNATURE_FILE).write_text(_sign(data, k) + "\n")
    fsync_tree(tmp)  # every byte on disk before the rename that publishes them
    if out_dir.exists():  # the old bundle set aside first: at any moment one whole bundle or none
        old = out_dir.with_name(out_dir.name + f".old.tmp{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    return manifest


def _inside(root: Path, name: Any, what: str) -> Path:
    """``root/name`` for a relative POSIX path that stays inside ``root``; else BundleError."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise BundleError(f"bundle {root}: {what} {name!r} is not a relative file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name != pure.as_posix():
        raise BundleError(f"bundle {root}: {what} {name!r} points outside the bundle")
    path = root / pure
    if path.is_symlink() or root.resolve() not in path.resolve().parents:
        raise BundleError(f"bundle {root}: {what} {name!r} points outside the bundle")
    return path


class Bundle:
    """A verified bundle directory. Every file is read once, checked against its sha256 as it is
    read (so what is hashed is what is used), and parsed only then."""

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = True) -> None:
        self.path, self.manifest, self.verify = path, manifest, verify
        try:
            self.hierarchy = Hierarchy.from_dict(manifest["hierarchy"])
            self.resident: str = manifest["resident"]
            self.base_spec = NetworkSpec.from_dict(manifest["base"])
            self.delta_cfg = from_dict(DeltaConfig, manifest["delta"])
            self.routings = {name: Routing.parse(r) for name, r in manifest["routings"].items()}
            self.serves = Routing.parse(manifest["serves"]["routing"])
            self.router_spec = RouterSpec.from_dict(manifest["router"]) if "router" in manifest else None
        except (KeyError, TypeError, ValueError, HierarchyError) as e:
            raise BundleError(f"bundle {path}: manifest.json is not valid ({type(e).__name__}: {e})") from None
        if self.resident not in ("vanilla", "generalist"):
            raise BundleError(f"bundle {path}: resident must be 'vanilla' or 'generalist', got {self.resident!r}")
        r = self.router_spec
        if r is not None and (self.resident != "vanilla" or r.num_superclasses != self.hierarchy.num_superclasses
                              or r.first_stage != self.delta_cfg.first_stage):
            raise BundleError(f"bundle {path}: the router ({r.num_superclasses} superclasses after stage {r.first_stage}) "
                              f"does not fit a {self.resident} resident, {self.hierarchy.num_superclasses} superclasses "
                              f"and deltas from stage {self.delta_cfg.first_stage}")
        expected = self.hierarchy.num_subclasses if self.resident == "vanilla" else self.hierarchy.num_superclasses
        if self.base_spec.num_outputs != expected:
            raise BundleError(f"bundle {path}: the {self.resident} network has {self.base_spec.num_outputs} outputs, "
                              f"the hierarchy needs {expected}")

    @property
    def stage_one(self) -> str:
        """What names the superclass: ``vanilla`` (the vanilla network's whole forward, whose
        answer pooling (+α) uses), ``generalist``, or ``trunk_router`` (nothing to pool with)."""
        return "trunk_router" if self.router_spec is not None else self.resident

    @property
    def image_size(self) -> int:
        return self.base_spec.image_size

    def read(self, name: str) -> bytes:
        """The bytes of a listed file, checked against the manifest's sha256."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"bundle {self.path}: {name} is not listed in manifest.json")
        data = _inside(self.path, name, "file").read_bytes()
        if self.verify and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BundleError(f"bundle file {name} was changed: its sha256 does not match the manifest")
        return data

    def _load_network(self, spec: NetworkSpec | RouterSpec, file: str):
        """``spec.build()`` with the weights of a listed safetensors file (a network or the router)."""
        try:
            state = st_load(self.read(file))
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors has its own error type for bad bytes
            raise BundleError(f"bundle file {file} is not a safetensors file ({type(e).__name__})") from None
        try:
            return load_state(spec.build(), state, f"bundle file {file}")
        except ValueError as e:
            raise BundleError(str(e)) from None

    def load_base(self) -> ResNet:
        return self._load_network(self.base_spec, self.manifest["base"]["file"])

    def load_router(self) -> TrunkRouter | None:
        """The trunk router (stage one on the resident's trunk), or None when the resident routes."""
        if self.router_spec is None:
            return None
        return self._load_network(self.router_spec, self.manifest["router"]["file"])

    def load_deltas(self) -> dict[int, PackedDelta]:
        out = {}
        for name in self.manifest["files"]:
            if not name.startswith("deltas/"):
                continue
            try:
                packed = PackedDelta.from_bytes(self.read(name))
            except ValueError as e:
                if isinstance(e, BundleError):
                    raise
                raise BundleError(f"bundle file {name}: {e}") from None
            s = packed.meta.get("superclass")
            if not isinstance(s, int) or not 0 <= s < self.hierarchy.num_superclasses or s in out:
                raise BundleError(f"bundle file {name}: superclass {s!r} is not one of the hierarchy's, or twice")
            n_sub = len(self.hierarchy.superclasses[s].subclasses)
            head = packed.tensors.get("head.weight")
            if head is None or head.shape[0] not in (n_sub, n_sub + 1):
                raise BundleError(f"bundle file {name}: its head does not fit superclass {s}'s {n_sub} subclasses")
            out[s] = packed
        missing = sorted(set(range(self.hierarchy.num_superclasses)) - set(out))
        if missing:
            raise BundleError(f"bundle {self.path}: no delta for superclass(es) {missing}")
        return out

    @property
    def baseline_names(self) -> list[str]:
        return list(self.manifest.get("baselines", {}))

    def load_baseline(self, name: str) -> ResNet:
        entry = self.manifest["baselines"].get(name)
        if entry is None:
            raise BundleError(f"bundle has no baseline {name!r} (has: {', '.join(self.baseline_names) or 'none'})")
        return self._load_network(NetworkSpec.from_dict(entry), entry["file"])

    def load_vanilla(self) -> ResNet:
        """The vanilla network: the resident, or the baseline kept beside a generalist."""
        return self.load_base() if self.resident == "vanilla" else self.load_baseline("vanilla")

    def predictor(self, device: torch.device | str = "cpu", **kwargs: Any):
        from supersub.predictor import TwoStagePredictor

        return TwoStagePredictor(self.load_base(), self.hierarchy, self.load_deltas(), self.resident, device,
                                 router=self.load_router(), **kwargs)

    def routing(self, name: str | None = None) -> Routing:
        """The routing the bundle serves, or a reported one by family name (``hard``, ``soft_pooled``)."""
        if name is None:
            return self.serves
        if name not in self.routings:
            raise BundleError(f"bundle has no routing {name!r} (has: {', '.join(self.routings)})")
        return self.routings[name]


def load_bundle(path: str | Path, verify: bool = True, key: bytes | str | None = None) -> Bundle:
    """Opens a bundle directory: the manifest checked (and its signature, with a key), every
    path inside the bundle, no unlisted or missing file; file hashes are checked as files are read."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise BundleError(f"{path} is not a bundle: manifest.json is missing")
    data = mf.read_bytes()
    k = _key(key)
    if k:
        sig = path / SIGNATURE_FILE
        if not sig.is_file():
            raise BundleError(f"bundle {path} is not signed, and {KEY_ENV} asks for signed bundles")
        if not hmac.compare_digest(sig.read_text().strip(), _sign(data, k)):
            raise BundleError(f"bundle {path}: the signature does not match manifest.json (changed, or another key)")
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{mf}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError(f"{mf} is not a supersub bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION}); "
            "rerun the pipeline to write a current bundle"
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, dict) for v in listed.values()):
        raise BundleError(f"{mf}: 'files' must map file names to {{sha256, bytes}}")
    for name in listed:
        _inside(path, name, "file")
    referenced = [("base.file", manifest.get("base", {}).get("file"))]
    baselines = manifest.get("baselines", {})
    if not isinstance(baselines, dict):
        raise BundleError(f"{mf}: 'baselines' must be a mapping")
    referenced += [(f"baselines.{n}.file", (e or {}).get("file") if isinstance(e, dict) else None) for n, e in baselines.items()]
    if "router" in manifest:
        router = manifest["router"]
        referenced.append(("router.file", router.get("file") if isinstance(router, dict) else None))
    for what, name in referenced:
        _inside(path, name, what)
        if name not in listed:
            raise BundleError(f"bundle {path}: {what} {name!r} is not listed (with its sha256) in manifest.json")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*")
               if p.is_file() and p.name not in ("manifest.json", SIGNATURE_FILE)}
    foreign = sorted(present - set(listed))
    if foreign:
        raise BundleError(f"bundle {path} holds files its manifest does not list: {', '.join(foreign)}")
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"bundle {path} is missing {', '.join(missing)}")
    roles = file_roles(manifest)
    roleless = sorted(set(listed) - set(roles))
    if roleless:
        raise BundleError(f"bundle {path}: manifest.json lists {', '.join(roleless)}, which no field of the format "
                          "names (base, router, baselines, deltas/<superclass>.safetensors)")
    return Bundle(path, manifest, verify)


# A delta's name as write_bundle writes it: its superclass index, zero-padded.
_DELTA_FILE = re.compile(r"deltas/[0-9]+\.safetensors")
# Manifest fields that name one network file each (``{"file": ..., **spec}``) beside ``base``:
# ``router`` (optional: a trunk + superclass head for stage one).
OPTIONAL_NETWORK_FIELDS = ("router",)


def file_roles(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file name the manifest's fields give a role: ``base``, each optional network field
    (``router``), ``baselines.<name>``, and ``delta`` for ``deltas/<i>.safetensors``. A listed
    file with no role would never be read, so :func:`load_bundle` refuses it."""
    roles = {}
    for field in ("base", *OPTIONAL_NETWORK_FIELDS):
        entry = manifest.get(field)
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            roles[entry["file"]] = field
    for name, entry in (manifest.get("baselines") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            roles[entry["file"]] = f"baselines.{name}"
    for name in manifest.get("files", {}):
        if _DELTA_FILE.fullmatch(name):
            roles.setdefault(name, "delta")
    return roles


def verify_files(bundle: Bundle) -> None:
    """The pre-flight check: reads every file the bundle will load — base, deltas, baselines and
    the router when there is one — checks each against its sha256 and parses it (safetensors,
    shapes against the manifest's spec, each delta against the hierarchy). Raises one
    :class:`BundleError` line naming the file; costs a load of each network (no forward)."""
    bundle.load_base()
    bundle.load_deltas()
    for name in bundle.baseline_names:
        bundle.load_baseline(name)
    bundle.load_router()
