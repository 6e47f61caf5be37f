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
