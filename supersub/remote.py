"""Bundles by reference: a folder, or an MLflow URI (``runs:/<id>/bundle``, ``runs:/<id>``,
``models:/<name>/<version>``, ``models:/<name>@<alias>``), downloaded once into a cache.

The tracking store is the one the jobs use — :func:`default_tracking_uri`: ``$MLFLOW_TRACKING_URI``,
else SQLite at ``~/.supersub/mlflow.db`` — so a URI printed by a job resolves in ``serve run`` and
``supersub evaluate`` without exporting anything. Downloads go to ``$SUPERSUB_CACHE/bundles/<key>/``,
by default ``cache/bundles/`` beside a SQLite store (``~/.supersub/cache`` for the default store
or a server), keyed by the tracking URI, resolved run,
artifact path and manifest hash, and are reused; nothing is left in the system's temporary folder.
MLflow is imported only for such URIs: a replica serving a local folder never loads it.

For processes on other machines — Serve replicas — a reference resolved here must not be resolved
again there (their environment names another tracking store, or none, and their disk holds
neither this cache nor this folder). :func:`ship` packs a resolved bundle's files by value (a
:class:`ShippedBundle`: pickled with the deployment, carried by Ray) and :func:`place` copies it
into a folder every node reads; :func:`open_resolved` opens either without ever looking at a URI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from supersub.bundle import SIGNATURE_FILE, Bundle, load_bundle
from supersub.errors import BundleError

HOME = Path(os.environ.get("SUPERSUB_HOME", "~/.supersub")).expanduser()
# "scheme:/..." or "scheme://..."; a one-letter scheme would be a Windows drive, not a URI.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def default_tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///~/.supersub/mlflow.db``; a
    relative SQLite path is made absolute (each Ray worker runs in its own working directory)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        HOME.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + str(HOME / "mlflow.db")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def is_remote(ref: str) -> bool:
    return bool(_URI.match(ref)) and not ref.startswith("file:")


def _cache_root(tracking_uri: str | None = None, cache: str | Path | None = None) -> Path:
    """``cache``, else ``$SUPERSUB_CACHE``, else beside a SQLite tracking store (``<its folder>/cache``:
    a store kept elsewhere leaves nothing in ``~/.supersub``), else ``~/.supersub/cache``; then ``bundles/``."""
    root = str(cache) if cache else os.environ.get("SUPERSUB_CACHE")
    if not root and tracking_uri and tracking_uri.startswith("sqlite:///"):
        root = str(Path(tracking_uri[len("sqlite:///"):]).parent / "cache")
    return Path(root or str(HOME / "cache")).expanduser() / "bundles"


def _download(ref: str, tracking_uri: str, cache: str | Path | None = None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    # The store is passed, never set globally: that would also rewrite MLFLOW_TRACKING_URI for
    # everything else in this process.
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if re.fullmatch(r"runs:/[^/]+/?", ref):  # a run: its model (or artifact folder) "bundle"
        ref = ref.rstrip("/") + "/bundle"
    try:
        if ref.startswith("models:/"):  # a registered model version: its source run and path
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            name, version = get_model_name_and_version(client, ref)
            mv = client.get_model_version(name, version)
            source, key = mv.source, f"model-{name}-{version}"
        else:
            source, key = ref, ref
        digest = hashlib.sha256(f"{tracking_uri}|{key}".encode()).hexdigest()[:16]
        target = _cache_root(tracking_uri, cache) / digest
        if (target / "manifest.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                             tracking_uri=tracking_uri, registry_uri=tracking_uri))
            bundle = _find_bundle(local)
            if bundle is None:
                raise BundleError(f"{ref} holds no bundle (no manifest.json in it, its bundle/ or its artifacts/bundle/)")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(bundle, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    except MlflowException as e:
        raise BundleError(f"cannot resolve {ref} in the tracking store {tracking_uri}: {e.message.splitlines()[0]}") from None


def _find_bundle(path: Path) -> Path | None:
    """The bundle folder inside a downloaded artifact: itself, ``bundle/``, or the pyfunc model's
    ``artifacts/bundle/``."""
    for p in (path, path / "bundle", path / "artifacts" / "bundle"):
        if (p / "manifest.json").is_file():
            return p
    return None


def local_path(ref: str, tracking_uri: str | None = None, cache: str | Path | None = None) -> Path:
    """A local folder holding the bundle ``ref`` names (downloaded into the cache — ``cache``, else
    the default one — when remote)."""
    if ref.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", ref))
    if not is_remote(ref):
        path = Path(ref)
        found = _find_bundle(path) if path.is_dir() else None
        return found or path
    return _download(ref, default_tracking_uri(tracking_uri), cache)


def open_bundle(ref: str, verify: bool = True, tracking_uri: str | None = None,
                cache: str | Path | None = None) -> Bundle:
    """The verified bundle at ``ref`` (a path or an MLflow URI)."""
    return load_bundle(local_path(ref, tracking_uri, cache), verify=verify)


# ------------------------------------------------------------------------------ resolved once, opened elsewhere
@dataclass(frozen=True)
class ShippedBundle:
    """A bundle's files by value (relative path → bytes: the manifest, its signature when there is
    one, every file it lists), for a process that can read neither the folder nor the store it
    came from. ``ref`` is what the user named, for messages."""

    ref: str
    files: dict[str, bytes]

    @property
    def key(self) -> str:
        """The manifest's hash: equal bundles share one copy on a node."""
        return hashlib.sha256(self.files["manifest.json"]).hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def __repr__(self) -> str:  # not megabytes of bytes in a log line
        return f"ShippedBundle({self.ref!r}, {len(self.files)} files, {self.nbytes} bytes)"


def _files(bundle: Bundle) -> list[str]:
    names = ["manifest.json", *bundle.manifest["files"]]
    return names + ([SIGNATURE_FILE] if (bundle.path / SIGNATURE_FILE).is_file() else [])


def ship(bundle: Bundle, ref: str | None = None, max_bytes: int | None = None) -> ShippedBundle:
    """``bundle``'s files read into memory; a BundleError when they exceed ``max_bytes``."""
    size = sum((bundle.path / name).stat().st_size for name in _files(bundle))
    if max_bytes is not None and size > max_bytes:
        raise BundleError(f"bundle {ref or bundle.path} is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                          "that travel with a deployment")
    return ShippedBundle(ref or str(bundle.path), {name: (bundle.path / name).read_bytes() for name in _files(bundle)})


def _write_once(target: Path, write) -> Path:
    """``target`` made by ``write(tmp)`` in a sibling folder and renamed into place, so that
    processes doing the same at once (replicas of one node) never see half a bundle."""
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process placed it first (a non-empty target cannot be replaced)
            if not (target / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialize(shipped: ShippedBundle, root: str | Path) -> Path:
    """``shipped`` written to ``root/<manifest hash>`` (once per node), its folder."""
    def write(tmp: Path) -> None:
        for name, data in shipped.files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    return _write_once(Path(root) / shipped.key, write)


def place(bundle: Bundle, folder: str | Path) -> Path:
    """``bundle``'s files copied to ``folder/bundles/<manifest hash>`` (a folder every node reads),
    unless it is already there; its folder."""
    data = (bundle.path / "manifest.json").read_bytes()
    target = Path(folder).expanduser().resolve() / "bundles" / hashlib.sha256(data).hexdigest()[:16]
    if bundle.path.resolve() == target:
        return target

    def write(tmp: Path) -> None:
        for name in _files(bundle):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / name, tmp / name)

    return _write_once(target, write)


def open_resolved(source: str | Path | ShippedBundle, scratch: str | Path | None = None, verify: bool = True) -> Bundle:
    """The bundle a launcher resolved for this process: a folder (never a URI: this process may
    not see the tracking store, or sees another), or a :class:`ShippedBundle` written to
    ``scratch`` (default: the system's temporary folder) first. Signed bundles are checked
    against this process's own key."""
    if isinstance(source, ShippedBundle):
        root = Path(scratch) if scratch else Path(tempfile.gettempdir()) / "supersub-bundles"
        return load_bundle(materialize(source, root), verify=verify)
    if is_remote(str(source)):
        raise BundleError(f"{source}: a URI must be resolved where the tracking store is known, not here")
    return load_bundle(local_path(str(source)), verify=verify)
