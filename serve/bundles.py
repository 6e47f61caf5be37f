"""Where a served bundle comes from: a local directory, or any MLflow artifact URI.

``runs:/<run_id>/bundle``, ``models:/name/version``, ``mlflow-artifacts:/...``, ``s3://...`` and
the like are downloaded with ``mlflow.artifacts.download_artifacts`` (which reads
``MLFLOW_TRACKING_URI``: give replicas that variable through the config's ``runtime_env``).
MLflow is imported only for such URIs, so a replica serving a local bundle never loads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from supersub.bundle import Bundle, load_bundle

# "scheme:/..." or "scheme://..."; a one-letter scheme would be a Windows drive, not a URI.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def is_remote(ref: str) -> bool:
    return bool(_URI.match(ref)) and not ref.startswith("file:")


def local_path(ref: str) -> Path:
    """A local directory holding the bundle ``ref`` names, downloading it when it is remote."""
    if ref.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", ref))
    if not is_remote(ref):
        return Path(ref)
    import mlflow.artifacts  # lazily: only remote bundles need MLflow

    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    # A bundle logged as an artifact folder named "bundle" under the URI is found too.
    if not (path / "manifest.json").is_file() and (path / "bundle" / "manifest.json").is_file():
        path = path / "bundle"
    return path


def open_bundle(ref: str, verify: bool = True) -> Bundle:
    """The verified bundle at ``ref`` (a path or an MLflow artifact URI)."""
    return load_bundle(local_path(ref), verify=verify)
