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
