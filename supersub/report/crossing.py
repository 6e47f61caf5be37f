"""Where the paper's premise would hold: the share of a network's errors that cross superclasses
against its top-1, over every one-network model a set of runs trained, with a fitted trend.

    python -m supersub.report.crossing runs/regime_map [more run or study folders] \\
        [--recorded docs/crossing_recorded.csv] --out docs/figures/crossing_share

The paper's premise is that most errors stay inside a superclass. A point is one trained network
(``vanilla`` and ``vanilla_long`` of every run, each network once per partition: the same network
evaluated under WordNet's superclasses and under the learned ones is two points) with its top-1,
the superclass accuracy its fine answer implies, and the share of its errors whose answer lies in
another superclass, beside the share if errors fell uniformly on the wrong classes. ``--recorded``
adds networks whose runs are gone from a CSV of ``label,partition,top1,superclass_acc,source``:
on the same test images the crossing share follows from those two numbers,
``(100 - superclass_acc) / (100 - top1)``, since every error that stays inside the superclass is
an image whose implied superclass is right.

Per partition, an ordinary least-squares line of crossing share on top-1 gives the top-1 at which
the share would fall to 50 %; its 95 % interval comes from resampling the networks (bootstrap).
It is an extrapolation far beyond the points' range whenever the points sit far from 50 %, and
the output says so; when the fitted slope is not negative there is no crossing to report.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supersub import atomic

NETWORKS = ("vanilla", "vanilla_long")  # the one-network models whose errors the premise is about
TARGET = 50.0  # "most errors stay inside": the crossing share below which the premise holds


@dataclass(frozen=True)
class Point:
    """One network under one partition."""

    label: str
    partition: str  # the hierarchy's name: auto:10 (WordNet), learned:10, ...
    top1: float
    superclass_acc: float
    crossing_share: float  # % of errors whose answer is in another superclass
    chance_share: float | None  # the same if errors fell uniformly on the wrong classes
    source: str  # the metrics.json it came from, or the recorded row's source


def _label(run: Path, model: str, cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return f"{run.parent.name}/{model}"
    per_class = cfg["data"].get("max_train_per_class")
    return (f"{'all' if per_class is None else per_class} img/class, width {cfg['model']['width']:g}, "
            f"{cfg['train']['epochs']} ep: {model}")


def points_from_runs(folders: list[Path]) -> list[Point]:
    """Every network of :data:`NETWORKS` in every ``metrics.json`` under ``folders``, once per
    (trained network, partition): runs that share a network's task folder give it once."""
    import yaml

    seen: set[tuple[str, str]] = set()
    points = []
    for metrics_path in sorted(p for f in folders for p in Path(f).rglob("metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        if "models" not in metrics or "hierarchy" not in metrics:
            continue  # a task's own metrics.json, not a run's
        cfg_path = metrics_path.parent / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else None
        partition = metrics["hierarchy"]["name"]
        for model in NETWORKS:
            m = metrics["models"].get(model)
            if m is None:
                continue
            network = metrics.get("tasks", {}).get(model, f"{metrics_path}:{model}")
            if (network, partition) in seen:
                continue
            seen.add((network, partition))
            points.append(Point(_label(metrics_path.parent, model, cfg), partition, m["top1"], m["superclass_acc"],
                                m["crossing_error_share"], m.get("crossing_error_chance"), str(metrics_path)))
    return points


def recorded_points(path: Path) -> list[Point]:
    """Networks whose runs are gone, from the top-1 and superclass accuracy recorded for them."""
    points = []
    with open(path, newline="") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            top1, sup = float(row["top1"]), float(row["superclass_acc"])
            if not 0 <= top1 <= sup <= 100:
                raise ValueError(f"{path}: {row['label']!r}: need 0 <= top1 <= superclass_acc <= 100, "
                                 f"got {top1} and {sup}")
            share = 100.0 * (100.0 - sup) / (100.0 - top1) if top1 < 100 else 0.0
            points.append(Point(row["label"], row["partition"], top1, sup, share, None, row["source"]))
    return points


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def fit(points: list[Point], bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Crossing share = intercept + slope · top-1 by least squares, the top-1 where it meets
    :data:`TARGET` (``None`` when the slope is not negative), and 95 % bootstrap intervals over
    the networks for the slope and that top-1."""
    x = np.array([p.top1 for p in points])
    y = np.array([p.crossing_share for p in points])
    out: dict[str, Any] = {"networks": len(points), "top1_range": [float(x.min()), float(x.max())]}
    if len(points) < 3 or np.ptp(x) == 0:
        return out | {"slope": None, "reason": "fewer than 3 networks of different top-1"}
    slope, intercept = _line(x, y)
    rng = np.random.default_rng(seed)
    slopes, meets = [], []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) == 0:
            continue
        s, i = _line(x[idx], y[idx])
        slopes.append(s)
        meets.append((TARGET - i) / s if s < 0 else np.inf)  # a flat or rising trend never meets it
    meets_arr = np.array(meets)
    out |= {
        "slope": slope, "intercept": intercept,
        "slope_ci": [float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))],
        "top1_at_target": (TARGET - intercept) / slope if slope < 0 else None,
        # percentiles of the resampled crossings; inf where a resample's trend never falls to TARGET
        # (order statistics, not interpolated: between two infinite crossings there is no number)
        "top1_at_target_ci": [float(np.percentile(meets_arr, q, method="inverted_cdf")) for q in (2.5, 97.5)],
        "never_share": float(np.isinf(meets_arr).mean()),
    }
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else "never" if np.isinf(v) else f"{v:.1f}"


def markdown(points: list[Point], fits: dict[str, dict[str, Any]]) -> str:
    lines = ["| network | partition | top-1 | superclass acc. (implied) | errors crossing % | if uniform % | source |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.partition, p.top1)):
        lines.append(f"| {p.label} | {p.partition} | {p.top1:.2f} | {p.superclass_acc:.2f} | {p.crossing_share:.1f} | "
                     f"{_fmt(p.chance_share)} | {p.source} |")
    lines += ["", "| partition | networks | top-1 range | slope (points of share per point of top-1) [95 % CI] | "
              f"top-1 where the share meets {TARGET:g} % [95 % CI] |", "|---|---|---|---|---|"]
    for partition, f in fits.items():
        if f.get("slope") is None:
            lines.append(f"| {partition} | {f['networks']} | — | {f['reason']} | — |")
            continue
        lo, hi = f["top1_range"]
        lines.append(f"| {partition} | {f['networks']} | {lo:.1f}–{hi:.1f} | {f['slope']:.3f} "
                     f"[{f['slope_ci'][0]:.3f}, {f['slope_ci'][1]:.3f}] | {_fmt(f['top1_at_target'])} "
                     f"[{_fmt(f['top1_at_target_ci'][0])}, {_fmt(f['top1_at_target_ci'][1])}] "
                     f"({100 * f['never_share']:.0f} % of resamples never meet it) |")
    return "\n".join(lines) + "\n"


def write(points: list[Point], out: Path) -> dict[str, Any]:
    """``OUT.md`` (the table), ``OUT.json`` (every number) and ``OUT.png`` (the figure)."""
    from supersub.plots import crossing_trend

    partitions = sorted({p.partition for p in points})
    fits = {k: fit([p for p in points if p.partition == k]) for k in partitions}
    doc = {"target_share": TARGET, "points": [asdict(p) for p in points], "fits": fits}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out.with_suffix(".json"), json.dumps(doc, indent=2))
    atomic.write_text(out.with_suffix(".md"), markdown(points, fits))
    crossing_trend([asdict(p) for p in points], fits, TARGET, out.with_suffix(".png"))
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m supersub.report.crossing", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run or study folders (every metrics.json under them)")
    ap.add_argument("--recorded", type=Path, help="CSV of networks whose runs are gone: "
                    "label,partition,top1,superclass_acc,source ('#' lines are comments)")
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix: writes .md, .json, .png")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.runs if not f.exists()]
    if missing:
        ap.error(f"no such folder: {', '.join(missing)}")
    points = points_from_runs(args.runs) + (recorded_points(args.recorded) if args.recorded else [])
    if not points:
        ap.error("no vanilla or vanilla_long network found in the folders or the recorded file")
    doc = write(points, args.out)
    print(markdown(points, doc["fits"]), end="")
    print(f"wrote {args.out.with_suffix('.md')}, .json and .png")


if __name__ == "__main__":
    main()
