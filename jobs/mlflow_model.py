"""Logging a bundle as an MLflow model: the pyfunc of :mod:`jobs.mlflow_pyfunc` with the bundle
as its artifact, a signature, an input example, and (``tracking.register_as``) a registered
version tagged with the run's headline metrics."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np


def _example_image(size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def log_bundle_model(tracker: Any, bundle_dir: Path, headline: dict[str, float]) -> str | None:
    """Logs ``bundle_dir`` as the parent run's model ``bundle``; returns the registered version."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import supersub
    from supersub.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "superclass_id"), ColSpec("string", "superclass"), ColSpec("string", "subclass_id"),
                        ColSpec("string", "subclass"), ColSpec("double", "probability"), ColSpec("string", "routing")]),
    )
    example = pd.DataFrame({"image": [_example_image(bundle.image_size)]})
    name = tracker.cfg.tracking.register_as
    mlflow.set_tracking_uri(tracker.tracking_uri)
    # MLflow prints "Successfully registered model" and "Created version" on stderr; the tracker
    # prints the version's URI in one line instead (all of it with --verbose).
    from jobs.console import verbose

    quiet = contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO())
    with mlflow.start_run(run_id=tracker.run_id), quiet:
        info = mlflow.pyfunc.log_model(
            name="bundle",
            python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
            artifacts={"bundle": str(bundle_dir)},
            signature=signature,
            input_example=example,
            registered_model_name=name or None,
            # The core library travels with the model, so it loads wherever its packages exist.
            code_paths=[str(Path(supersub.__file__).parent)],
            pip_requirements=["torch", "torchvision", "numpy", "pillow", "pyarrow", "safetensors", "pyyaml", "pandas"],
        )
    version = getattr(info, "registered_model_version", None)
    if name and version:
        for k, v in headline.items():
            tracker.client.set_model_version_tag(name, str(version), k, f"{v:.4f}")
    return str(version) if version else None
