"""What a model costs at inference: FLOPs per image (counted by PyTorch), measured latency, and
memory counted from the engine.

Latency on a shared machine: models are timed interleaved (:func:`interleaved`), each ratio is
the median of per-round ratios with its spread, and a ratio the work done rules out is marked
unreliable rather than reported (:func:`ratio`); the load average goes beside it
(:func:`load_average`).

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one image (conv and
matmul FLOPs are linear in the batch), for each piece a model runs: one network forward, stage
one, one specialist pass. A two-stage model's FLOPs per image are then stage one + (specialist
passes per image, as measured on the real test routing) × one pass.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from supersub.resnet import BACKBONES, STAGES, ModelConfig, ResNet, build_model


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


def flops_matched_model(model: ModelConfig, num_classes: int, image_size: int, flops_ratio: float) -> ModelConfig | None:
    """The biggest wider and/or deeper variant of ``model`` whose FLOPs per image are at most
    ``flops_ratio`` × ``model``'s: the "just make it bigger" control at a two-stage model's
    inference compute (``baselines.scaled_flops``). None when no bigger variant fits — a
    ResNet's channels come in steps of 8 and a block costs about a quarter of a small network,
    so a model at ~1.05 networks of FLOPs has only the vanilla network itself as its match."""
    base_depths = list(model.depths or BACKBONES[model.backbone][1])
    base_flops = network_flops(build_model(model, num_classes, image_size), image_size)
    extra_blocks = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 1, 1), (1, 1, 1, 1)]
    best, best_flops, seen = None, base_flops, set()
    for j in range(17):
        width = round(model.width * (1 + j / 16), 4)
        for extra in extra_blocks:
            depths = [d + e for d, e in zip(base_depths, extra)]
            cand = dataclasses.replace(model, width=width, depths=depths)
            net = build_model(cand, num_classes, image_size)
            key = (tuple(p.shape for p in net.parameters()),)
            if key in seen:
                continue
            seen.add(key)
            f = network_flops(net, image_size)
            if best_flops < f <= flops_ratio * base_flops:
                best, best_flops = cand, f
    return best


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


# ----------------------------------------------------------------------------- timings that hold on a busy machine
@dataclass
class Ratio:
    """A latency ratio ``model / base`` from interleaved rounds.

    ``value`` is the median of the per-round ratios (each round times every model once, so a
    load that comes and goes hits both sides of a ratio alike); ``spread`` is their
    interquartile range over that median. ``value`` is None and ``reliable`` False when the
    measurement cannot be right: a spread too wide, or a ratio that the work done rules out (a
    model faster than a part of itself, a network timed far from the same architecture's);
    ``measured`` keeps the raw number and ``why`` says which."""

    measured: float
    spread: float
    rounds: int
    reliable: bool = True
    why: str = ""

    @property
    def value(self) -> float | None:
        return self.measured if self.reliable else None

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.value, "measured": self.measured, "spread": self.spread, "rounds": self.rounds,
                "reliable": self.reliable, **({"why": self.why} if self.why else {})}


def load_average() -> float:
    """The 1-minute load average (runnable processes; above the core count, timings queue for CPUs)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform
        return math.nan


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 9, warmup: int = 1,
                device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds of every ``fns[name]()`` in each of ``rounds`` rounds, run A B C A B C ...
    (CUDA-synchronised), after ``warmup`` untimed rounds. Timed one model after another, a busy
    spell of the machine lands on one model only and turns a ratio into nonsense."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], model: str, base: str, *, at_least: float | None = None,
          near: float | None = None, tolerance: float = 0.25, max_spread: float = 0.3, why: str = "") -> Ratio:
    """``model / base`` from :func:`interleaved` times, checked against what the work allows:
    ``at_least`` (``model`` does all of ``base``'s work and more: the ratio cannot be below it)
    or ``near`` (the same work: within ``tolerance`` of it); ``why`` names the reason in the note."""
    per_round = sorted(a / b for a, b in zip(times[model], times[base]))
    med = statistics.median(per_round)
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [med, med, med]
    r = Ratio(med, (q[2] - q[0]) / med if med > 0 else math.inf, len(per_round))
    if at_least is not None and med < at_least:
        r.reliable, r.why = False, f"{med:.2f}x is below {at_least:g}x, impossible for the work done ({why or base})"
    elif near is not None and abs(med / near - 1) > tolerance:
        r.reliable, r.why = False, f"{med:.2f}x is far from {near:g}x, the same work ({why or base})"
    elif r.spread > max_spread:
        r.reliable, r.why = False, f"rounds spread {100 * r.spread:.0f}% (interquartile range / median)"
    return r


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


# ----------------------------------------------------------------------------- memory, counted
def activation_peak_bytes(model: torch.nn.Module, fn: Callable[[], object]) -> int:
    """The largest activation set of ``fn()``: the most bytes any one leaf module of ``model``
    reads and writes in one call (its input and output tensors). A count, not a reading of the
    allocator: the same on every run and machine, unlike a process's peak resident set."""
    peak = [0]

    def nbytes(xs) -> int:
        if isinstance(xs, torch.Tensor):
            return xs.numel() * xs.element_size()
        if isinstance(xs, (list, tuple)):
            return sum(nbytes(x) for x in xs)
        return 0

    def hook(module, args, output) -> None:
        peak[0] = max(peak[0], nbytes(args) + nbytes(output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def activation_bytes(model: torch.nn.Module, image_size: int) -> int:
    """Bytes every leaf module of ``model`` writes in one forward of one image (fp32): the
    activation traffic a pass moves through memory, which bounds a thin network's speed on a GPU
    where its FLOPs no longer do."""
    total = [0]

    def hook(module, args, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return total[0]
