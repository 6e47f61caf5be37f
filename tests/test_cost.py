"""Timings that hold on a busy machine (interleaved rounds, ratios checked against the work done)
and memory counted by the engine: :mod:`supersub.cost` and benchmarks/core_bench.py's checks."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from supersub.cost import activation_peak_bytes, interleaved, ratio


def _core_bench():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "core_bench.py"
    spec = importlib.util.spec_from_file_location("core_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["core_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_interleaved_times_every_model_once_a_round() -> None:
    calls: list[str] = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and all(len(t) == 3 for t in times.values())


def test_a_ratio_the_work_rules_out_is_no_result() -> None:
    base = [1.0, 1.1, 0.9, 1.0, 1.05]
    times = {"one": base, "two_stage": [1.5 * t for t in base], "busy_spell": [0.3 * t for t in base],
             "same": [1.02 * t for t in base], "far": [0.2 * t for t in base],
             "noisy": [0.5, 3.0, 1.4, 6.0, 1.1]}
    ok = ratio(times, "two_stage", "one", at_least=1.0)
    assert ok.reliable and ok.value == pytest.approx(1.5) and ok.spread == pytest.approx(0, abs=1e-9)
    faster = ratio(times, "busy_spell", "one", at_least=1.0, why="two-stage vs its stage one")
    assert not faster.reliable and faster.value is None and faster.measured == pytest.approx(0.3)
    assert "below 1x" in faster.why and "two-stage vs its stage one" in faster.why
    assert ratio(times, "same", "one", near=1.0).reliable
    far = ratio(times, "far", "one", near=1.0, why="the same architecture")
    assert not far.reliable and "far from 1x" in far.why
    noisy = ratio(times, "noisy", "one")
    assert not noisy.reliable and "spread" in noisy.why


def test_core_bench_never_reports_a_two_stage_ratio_below_one_and_trusts_nothing_when_the_control_fails() -> None:
    bench = _core_bench()
    base = [1.0, 1.2, 0.9, 1.1, 1.0]
    times = {"one_network": base, "one_network_copy": list(base), "stage_one": [1.01 * t for t in base],
             "two_stage_hard": [0.4 * t for t in base],  # a busy spell on the baseline: impossible
             "two_stage_soft2": [3.0 * t for t in base], "shared_trunk_hard": [1.5 * t for t in base],
             "trunk_router_stage_one": [0.8 * t for t in base], "trunk_router_hard": [1.05 * t for t in base]}
    r = bench.latency_ratios(times)
    assert r["latency_ratio_hard"].value is None and "impossible" in r["latency_ratio_hard"].why
    assert r["latency_ratio_trunk_router"].value == pytest.approx(1.05)
    times["trunk_router_hard"] = [0.9 * t for t in base]  # less work than one forward: impossible
    assert bench.latency_ratios(times)["latency_ratio_trunk_router"].value is None
    times["trunk_router_hard"] = [1.05 * t for t in base]
    assert r["latency_ratio_soft"].value == pytest.approx(3.0) and r["latency_ratio_shared_trunk"].value == pytest.approx(1.5)
    times["one_network_copy"] = [2.0 * t for t in base]  # the same network timed twice disagrees
    r = bench.latency_ratios(times)
    assert all(x.value is None for x in r.values()) and "control failed" in r["latency_ratio_soft"].why


def test_activation_peak_bytes_counts_the_largest_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    x = torch.zeros(4, 3, 16, 16)
    peak = activation_peak_bytes(model, lambda: model(x))
    assert peak == (4 * 8 * 16 * 16) * 4 * 2  # the ReLU: 8 channels in and out, float32
    assert activation_peak_bytes(model, lambda: model(x)) == peak  # a count: the same every time
