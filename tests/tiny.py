"""The tiny settings of every test that trains, in one place.

* :data:`TINY` / :func:`tiny` — the in-process pipeline (local runner, no MLflow, no report):
  360 synthetic 16-px images (3 superclasses x 3 subclasses x 40, 10 % drawn like the next
  superclass, so routing makes real mistakes), ResNet-10 x 0.125, 2 epochs of batches of 32, a
  50-resample bootstrap. Overrides given to :func:`tiny` come after these and win.
* :data:`TINY_RAY` — the jobs on Ray (``python -m jobs.pipeline`` arguments): 240 images of
  2 superclasses, so that two specialists run at once (one per node in the two-node tests), the
  config's own model width, runner and tracking; evaluation without latency timing.

Both start from :data:`COMMON`: 16-px images loaded in the test's process, 2 epochs everywhere.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "default.yaml"

COMMON = [
    "data.image_size=16",
    "data.num_workers=0",  # worker processes cost more than 16-px images do
    "train.epochs=2",
    "specialist.optim.epochs=2",
]

TINY = [
    "resources.runner=local",
    "tracking.enabled=false",
    "report=false",
    "data.source=synthetic:superclasses=3,subclasses=3,per_class=40,size=16,confusion=0.1",
    *COMMON,
    "model.width=0.125",
    "train.batch_size=32",
    "specialist.optim.batch_size=32",
    "evaluation.bootstrap=50",
]

TINY_RAY = [
    "data.source=synthetic:superclasses=2,subclasses=3,per_class=40,size=16",
    *COMMON,
    # The driver's evaluation, not what these tests are about (tests/test_pipeline.py checks it):
    # a short bootstrap and no latency rounds, a third of a tiny run's time on a loaded machine.
    "evaluation.bootstrap=50",
    "evaluation.latency=false",
]

# One epoch and no latency timing: for tests that check what a run does, not what it scores.
ONE_EPOCH = ["train.epochs=1", "specialist.optim.epochs=1", "evaluation.latency=false"]


def tiny(*overrides: str):
    """The default config on :data:`TINY`, then ``overrides``."""
    from supersub.config import load_config
    from supersub.pipeline_config import PipelineConfig

    return load_config(PipelineConfig, DEFAULT_CONFIG, [*TINY, *overrides])


def quiet(_line: str) -> None:
    """A ``log`` that drops every line."""
