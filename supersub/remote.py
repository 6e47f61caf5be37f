"""Bundles by reference: a folder, or an MLflow URI (``runs:/<id>/bundle``, ``runs:/<id>``,
``models:/<name>/<version>``, ``models:/<name>@<alias>``), downloaded once into a cache.

The tracking store is the one the jobs use — :func:`default_tracking_uri`: ``$MLFLOW_TRACKING_URI``,
else SQLite at ``~/.supersub/mlflow.db`` — so a URI printed by a job resolves in ``serve run`` and
``supersub evaluate`` without exporting anything. Downloads go to ``$SUPERSUB_CACHE/bundles/<key>/``,
by default ``cache/bundles/`` beside a SQLite store (``~/.supersub/cache`` for the default store
or a server), keyed by the tracking URI, resolved run,
artifact path and manifest hash, and are reused; nothing is left in the system's temporary folder.
MLflow is imported only for such URIs: a replica serving a local folder never loads it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from supersub.bundle import Bundle, load_bundle
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


def _cache_root(tracking_uri: str | None = None) -> Path:
    """``$SUPERSUB_CACHE``, else beside a SQLite tracking store (``<its folder>/cache``: a store
    kept elsewhere leaves nothing in ``~/.supersub``), else ``~/.supersub/cache``; then ``bundles/``."""
    root = os.environ.get("SUPERSUB_CACHE")
    if not root and tracking_uri and tracking_uri.startswith("sqlite:///"):
        root = str(Path(tracking_uri[len("sqlite:///"):]).parent / "cache")
    return Path(root or str(HOME / "cache")).expanduser() / "bundles"


def _download(ref: str, tracking_uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
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
        target = _cache_root(tracking_uri) / digest
        if (target / "manifest.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp)))
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


def local_path(ref: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding the bundle ``ref`` names (downloaded into the cache when remote)."""
    if ref.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", ref))
    if not is_remote(ref):
        path = Path(ref)
        found = _find_bundle(path) if path.is_dir() else None
        return found or path
    return _download(ref, default_tracking_uri(tracking_uri))


def open_bundle(ref: str, verify: bool = True, tracking_uri: str | None = None) -> Bundle:
    """The verified bundle at ``ref`` (a path or an MLflow URI)."""
    return load_bundle(local_path(ref, tracking_uri), verify=verify)
