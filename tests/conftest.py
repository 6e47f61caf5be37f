"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: tests use tiny tensors, and on a loaded 2-core machine OpenMP threads that
# spin-wait for each other made a 12-step finetune 50x slower (26 s against 0.5 s).
torch.set_num_threads(1)

# The development data lie next to the repository (<repo>/../shared/data), never inside it.
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# The slow tier: what starts Ray, Ray Serve or an MLflow store is slow whatever else it does (a
# local Ray takes 10-60 s to start on a loaded 2-core machine, an MLflow store's first migration
# several seconds), so those markers imply `slow`; `pytest -m "not slow"` is the fast tier.
SLOW_MARKERS = ("ray", "serve", "mlflow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_MARKERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder, or a skip when this machine does not have it."""
    path = SHARED_DATA.resolve()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, shared by the Ray, Tune and Serve tests. With the
    dashboard: under Ray 2.60, Tune with Train V2 frees the placement groups of trials that ASHA
    stopped through the State API, which needs it (ray-project/ray#54305); without it later
    trials never start."""
    from ray_helpers import start_session_ray, stop_session_ray

    started = start_session_ray()
    yield
    if started:
        stop_session_ray()


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory: pytest.TempPathFactory):
    """One in-process tiny pipeline run (tests/tiny.py) with every control — ``vanilla_long``,
    ``delta_all``, a 2-seed ensemble — and its report, for the tests that read a finished run:
    ``(out, cfg, metrics)``. Tests copy what they would change."""
    from tiny import quiet, tiny

    from supersub.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny("baselines.vanilla_long=true", "baselines.delta_all=true", "baselines.ensemble=2", "report=true")
    return out, cfg, run_pipeline(cfg, out, log=quiet)

