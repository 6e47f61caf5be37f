"""What a model costs at inference: FLOPs per image (counted by PyTorch) and measured latency.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one image (conv and
matmul FLOPs are linear in the batch), for each piece a model runs: one network forward, stage
one, one specialist pass. A two-stage model's FLOPs per image are then stage one + (specialist
passes per image, as measured on the real test routing) × one pass.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from supersub.models import STAGES, ResNet


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply and add counted separately, PyTorch's convention) of ``fn()``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def network_flops(model: ResNet, image_size: int, device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward of ``model`` on one image."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    return count_flops(lambda: model.eval()(x))


def two_stage_flops(predictor, image_size: int) -> tuple[int, int]:
    """``(stage one, one specialist pass)`` FLOPs per image of a :class:`TwoStagePredictor`."""
    x = torch.zeros(1, 3, image_size, image_size, device=predictor.device)
    stage1 = count_flops(lambda: predictor.stage1(x))
    trunk = predictor.base.forward_stages(x, 0, predictor.first_stage)
    s = min(predictor.deltas)
    one_pass = count_flops(lambda: predictor.specialist(s, trunk))
    return stage1, one_pass


def pass_flops(model: ResNet, first_stage: int, image_size: int, device: torch.device | str = "cpu") -> int:
    """FLOPs per image of the stages from ``first_stage`` on plus the head (a delta network's
    pass on a shared trunk)."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad():
        trunk = model.forward_stages(x, 0, first_stage)
    return count_flops(lambda: model.forward_head(model.forward_stages(trunk, first_stage, len(STAGES))))


def latency(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, device: torch.device | None = None) -> float:
    """Median seconds of ``fn()`` (CUDA-synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
