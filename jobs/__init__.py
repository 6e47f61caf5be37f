"""The orchestration layer: thin Ray and MLflow adapters over the ``supersub`` core.

* ``python -m jobs.pipeline`` — the whole pipeline (Ray Train runs, or in-process with
  ``resources.runner=local``), logged to MLflow;
* ``python -m jobs.tune`` — Ray Tune search over the specialists' delta settings;
* :mod:`jobs.runner` (``RayRunner``), :mod:`jobs.tracking` (``MlflowTracker``),
  :mod:`jobs.ray_data` (the Ray Data input path).

Nothing here is imported by ``supersub``; ray and mlflow are imported only where used, so that
``python -m jobs.pipeline ... resources.runner=local tracking.enabled=false`` runs on a machine
that has neither.
"""
