"""Intervals for accuracy differences: paired bootstrap over test images.

Two models scored on the same images are correlated: a paired bootstrap resamples images and
recomputes the difference of their accuracies on each resample, so the interval reflects how
much the *difference* varies, not each accuracy alone (Efron & Tibshirani 1993, ch. 13).
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` (percentage points) and its percentile interval.

    ``correct_a``, ``correct_b``: per-image correctness ``[N]`` (bool or 0/1), or per-image mean
    correctness over seeds (floats in [0, 1]) — resampling images then keeps each image's seeds
    together."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal, non-empty vectors; got {a.shape} and {b.shape}")
    diff = a - b
    out = {"delta": 100.0 * float(diff.mean()), "low": float("nan"), "high": float("nan"), "resamples": resamples}
    if resamples > 0:
        rng = np.random.default_rng(seed)
        means = np.empty(resamples)
        for i in range(0, resamples, 100):  # in chunks: 100 x N indices at a time
            n = min(100, resamples - i)
            means[i : i + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(1)
        tail = (1 - level) / 2
        out["low"], out["high"] = (100.0 * float(q) for q in np.quantile(means, [tail, 1 - tail]))
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
