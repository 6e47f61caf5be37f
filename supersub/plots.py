"""The report's figures: matplotlib (Agg backend, imported lazily) drawing plain numbers to PNG.

Every function takes lists, dicts and arrays that :mod:`supersub.report` has already gathered
(and written to ``report.json``), draws one figure and saves it at ``path``: a figure never
computes a number the report does not also print.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
# Friendly names of the models in legends, axes and tables (the keys of metrics.json's "models").
LABELS = {
    "vanilla": "vanilla",
    "vanilla_long": "vanilla, trained longer (equal images)",
    "vanilla_scaled": "vanilla, scaled up (equal bytes)",
    "vanilla_flops": "vanilla, wider/deeper (equal inference FLOPs)",
    "ensemble": "ensemble of vanilla networks",
    "delta_all": "one delta on all classes",
    "delta_all_pooled": "one delta on all classes, pooled",
    "two_stage_hard": "two-stage, hard",
    "two_stage_soft": "two-stage, soft",
    "two_stage_hard_pooled": "two-stage, hard + pooling",
    "two_stage_soft_pooled": "two-stage, soft + pooling",
    "two_stage_served": "two-stage, served routing",
    "two_stage_oracle": "two-stage, oracle routing",
    "stage1": "stage one (superclass only)",
    "generalist": "generalist (superclass only)",
}


def label(name: str) -> str:
    """A model's friendly name; its key when it has none."""
    return LABELS.get(name, name)


def _plt() -> Any:
    # Imported here, not at module level: `import supersub` must stay light, and Agg (no
    # display) must be chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short(text: str, width: int = 22) -> str:
    """``text`` cut to ``width`` characters (ImageNet names run long: 'tabby, tabby cat, ...'),
    with ``$`` escaped: matplotlib would read a name like 'US$ coin' as the start of mathtext."""
    text = text.split(",")[0] if len(text) > width else text
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("$", r"\$")


def _width(groups: int, series: int) -> float:
    """Figure width (inches) for ``groups`` clusters of ``series`` bars: wide enough to tell the
    bars apart, never wider than a page."""
    return min(13.0, max(6.0, groups * (0.22 * series + 0.4) + 1.5))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # "tight": legends placed outside the axes stay in
    _plt().close(fig)
    return path


def grouped_bars(
    groups: Sequence[str], series: dict[str, Sequence[float | None]], path: Path, *, ylabel: str, title: str,
    wrap: bool = False,
) -> Path:
    """Bars per group (x) and series (colour); ``None`` values are left out. ``wrap``: group names
    (model labels) are wrapped onto lines rather than cut short."""
    plt = _plt()
    n = max(len(series), 1)
    wide = min(13.0, 1.1 * len(groups) + 2.5) if wrap else 0.0
    fig, ax = plt.subplots(figsize=(max(_width(len(groups), n), wide), 4.2))
    x = np.arange(len(groups))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        ys = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=label(name))
    labels = [textwrap.fill(g, 13) for g in groups] if wrap else [short(g) for g in groups]
    slanted = not wrap and (len(groups) > 4 or max(map(len, labels), default=0) > 10)  # long labels would overlap
    ax.set_xticks(x, labels, rotation=30 if slanted else 0, ha="right" if slanted else "center",
                  fontsize=8 if wrap else None)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return _save(fig, path)


def error_split(models: Sequence[str], within: Sequence[int], crossing: Sequence[int], path: Path) -> Path:
    """Stacked bars: each model's errors that stay inside the true superclass and those that
    cross it, labelled with the crossing share."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(13.0, max(5.5, 1.1 * len(models) + 1.5)), 4.0))
    x = np.arange(len(models))
    ax.bar(x, within, color="C0", label="within the true superclass")
    ax.bar(x, crossing, bottom=within, color="C3", label="crossing superclasses")
    ax.set_ylim(0, 1.12 * max([w + c for w, c in zip(within, crossing)] + [1]))  # room for the shares
    for xi, w, c in zip(x, within, crossing):
        if w + c:
            ax.text(xi, w + c, f"{100.0 * c / (w + c):.1f}% cross", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [label(m) for m in models], rotation=30 if len(models) > 4 else 15, ha="right",
                  fontsize=8)
    ax.set_ylabel("misclassified test images")
    ax.set_title("Where the errors go")
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_panels(
    panels: dict[str, np.ndarray], rows: Sequence[str], cols: Sequence[str], path: Path, *, title: str
) -> Path:
    """Side-by-side confusion matrices (row = true, column = predicted). Colour is the row
    share, so that classes with few images read as clearly as big ones; counts are written in
    the cells when the matrix is small enough to read them. Columns beyond the rows (a
    within-superclass block's "other superclasses") are set off by a line."""
    plt = _plt()
    n_r, n_c = len(rows), len(cols)
    cell = 0.42 if max(n_r, n_c) <= 16 else max(0.09, 7.0 / max(n_r, n_c))
    side_w, side_h = min(14.0, 1.8 + cell * n_c), min(14.0, 1.6 + cell * n_r)
    fig, axes = plt.subplots(1, len(panels), figsize=(side_w * len(panels), side_h), squeeze=False)
    labels_too = max(n_r, n_c) <= 40
    for ax, (name, m) in zip(axes[0], panels.items()):
        m = np.asarray(m)
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        if n_c > n_r:
            ax.axvline(n_r - 0.5, c="0.3", lw=1)
        if max(n_r, n_c) <= 16:
            for i, j in zip(*np.nonzero(m)):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        if labels_too:
            ax.set_xticks(range(n_c), [short(c, 20) for c in cols], rotation=90, fontsize=7)
            ax.set_yticks(range(n_r), [short(r, 20) for r in rows], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label(name), fontsize=9)
    fig.suptitle(short(title, 60), fontsize=10)
    return _save(fig, path)


def bytes_bars(names: Sequence[str], ratios: Sequence[float], path: Path, *, total: float) -> Path:
    """Stored size of each specialist's delta as a fraction of one network."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 2), 3.8))
    ax.bar(range(len(names)), ratios, color="C2")
    if ratios:
        ax.axhline(float(np.mean(ratios)), ls="--", c="0.3", label=f"mean {np.mean(ratios):.4f}")
        ax.set_ylim(0, 1.25 * max(ratios))  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xticks(range(len(names)), [short(n) for n in names], rotation=30, ha="right")
    ax.set_ylabel("delta size (fraction of one network)")
    ax.set_title(f"Stored: {len(names)}+1 networks in {total:.3f} networks")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def accuracy_vs_bytes(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """Top-1 against total stored bytes (in networks, each model's ``bytes_in_networks``): the
    scaled-up vanilla at (about) the same bytes as the two-stage model is the comparison that matters."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for i, p in enumerate(points):  # the two-stage routings share their bytes: shrinking markers keep all visible
        ax.scatter([p["networks"]], [p["top1"]], s=max(110 - 9 * i, 15), marker="osD^v*Ph"[i % 8],
                   color=f"C{i % 10}", zorder=3, label=f"{label(p['model'])}: {p['top1']:.2f}%")
    if points:
        ax.set_xlim(0, 1.15 * max(p["networks"] for p in points))  # from zero: sizes read as ratios
    ax.set_xlabel("stored bytes (networks)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Accuracy vs stored bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def pareto(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], run_point: dict[str, float] | None,
           path: Path, *, budget: float | None = None, best: dict[str, Any] | None = None) -> Path:
    """Tune trials: mean specialist val accuracy against mean delta size, the Pareto front, the
    best trial within the budget, and where this run's specialists sit."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.scatter([t["delta_ratio"] for t in trials], [t["val_acc"] for t in trials], c="0.6", label="trials")
    ax.plot([t["delta_ratio"] for t in front], [t["val_acc"] for t in front], "o-", c="C3", label="Pareto front")
    if best:
        ax.scatter([best["delta_ratio"]], [best["val_acc"]], marker="D", s=80, facecolors="none", edgecolors="k",
                   zorder=4, label="best within budget")
    if run_point:
        ax.scatter([run_point["delta_ratio"]], [run_point["val_acc"]], marker="*", s=220, c="C2", zorder=3,
                   label="this run")
    if budget is not None:
        ax.axvline(budget, ls="--", c="0.3", label=f"budget {budget}")
    ax.set_xlabel("mean delta size (fraction of one network)")
    ax.set_ylabel("mean specialist val accuracy (%)")
    ax.set_title("Accuracy vs bytes (tune)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def severity_histogram(hists: dict[str, dict[int, int]], path: Path) -> Path:
    """Share of each model's errors at each LCA height (how far up the hierarchy a mistake
    goes: higher is a worse mistake)."""
    plt = _plt()
    heights = sorted({h for hist in hists.values() for h in hist})
    fig, ax = plt.subplots(figsize=(_width(len(heights), len(hists)), 3.8))
    width = 0.8 / max(len(hists), 1)
    for i, (name, hist) in enumerate(hists.items()):
        total = max(sum(hist.values()), 1)
        xs = np.arange(len(heights)) + (i - (len(hists) - 1) / 2) * width
        ax.bar(xs, [100.0 * hist.get(h, 0) / total for h in heights], width, label=label(name))
    ax.set_xticks(range(len(heights)), [str(h) for h in heights])
    ax.set_xlabel("LCA height of the mistake")
    ax.set_ylabel("share of errors (%)")
    ax.set_title("Mistake severity")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def regime_map_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The regime map: per cell and two-stage model, its top-1 minus the best control at no more
    than its inference FLOPs, with the 95 % interval (bars right of zero: specialisation paid).
    Horizontal bars, one line each, grouped by cell (images per class, width, tail) under the
    cell's heading, so a study of many variants stays readable: the figure grows downwards."""
    plt = _plt()
    rows = [r for r in rows if r.get("minus_best_control")]

    def cell(r: dict[str, Any]) -> tuple[str, str, str]:  # as supersub.study._cell places a run
        return str(r["images_per_class"]), f"{r['width']:g}", r["tail"]

    cells = list(dict.fromkeys(cell(r) for r in rows))  # the order runs first appear in
    rows = sorted(rows, key=lambda r: cells.index(cell(r)))
    y, pos, headings = [], 0.0, {}
    for i, r in enumerate(rows):
        if i == 0 or cell(r) != cell(rows[i - 1]):
            pos += 0.4 if i else 0.0
            headings[cell(r)] = pos
            pos += 1.0  # the heading's own line
        y.append(pos)
        pos += 1.0
    fig, ax = plt.subplots(figsize=(9.0, max(3.0, 0.26 * pos + 1.2)))
    d = np.array([r["minus_best_control"]["delta"] for r in rows])
    lo = d - np.array([r["minus_best_control"]["low"] for r in rows])
    hi = np.array([r["minus_best_control"]["high"] for r in rows]) - d
    colours = ["tab:green" if r["minus_best_control"]["low"] > 0 else "tab:red" if r["minus_best_control"]["high"] < 0
               else "tab:gray" for r in rows]
    hatches = ["" if r["model"] == "two_stage_hard" else "//" for r in rows]
    bars = ax.barh(y, d, 0.75, color=colours, xerr=[lo, hi], capsize=2)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    ax.axvline(0, color="black", lw=0.8)
    names = [f"{r['variant']} {r['model'].removeprefix('two_stage_')} vs {r['best_control']}" for r in rows]
    ax.set_yticks(y, names, fontsize=7)
    left = min(0.0, float((d - lo).min())) * 1.05
    for c, at in headings.items():
        ax.text(left, at, f"{c[0]} img/class, width {c[1]}, {c[2]}", ha="left", va="center", fontsize=8,
                weight="bold")
    ax.set_xlim(left, max(1.0, float((d + hi).max()) + 1.0))
    ax.set_ylim(pos, -1.0)  # the first cell on top
    ax.set_xlabel("top-1 points: two-stage − best control")
    ax.set_title("Where Super-Sub pays: two-stage minus the best control at ≤ its inference FLOPs\n"
                 "(95 % CI; hatched: the served routing)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def crossing_trend(points: Sequence[dict[str, Any]], fits: dict[str, dict[str, Any]], target: float,
                   path: Path) -> Path:
    """Crossing-error share against top-1, one colour per partition, each partition's fitted line
    drawn over the points' range (solid) and on to where it meets ``target`` (dashed: an
    extrapolation), the share if errors fell uniformly on wrong classes as hollow markers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (partition, f) in enumerate(fits.items()):
        colour = f"C{i}"
        ps = [p for p in points if p["partition"] == partition]
        ax.scatter([p["top1"] for p in ps], [p["crossing_share"] for p in ps], color=colour, s=28,
                   label=f"{partition}: {len(ps)} networks")
        chance = [p for p in ps if p.get("chance_share") is not None]
        ax.scatter([p["top1"] for p in chance], [p["chance_share"] for p in chance], facecolors="none",
                   edgecolors=colour, s=28, alpha=0.6)
        if f.get("slope") is None:
            continue
        lo, hi = f["top1_range"]
        line = np.linspace(lo, hi, 2)
        ax.plot(line, f["intercept"] + f["slope"] * line, color=colour, lw=1.2)
        meet = f.get("top1_at_target")
        end = min(100.0, meet) if meet is not None and meet > hi else 100.0
        ext = np.linspace(hi, end, 2)
        ax.plot(ext, f["intercept"] + f["slope"] * ext, color=colour, lw=1.0, ls="--")
    ax.axhline(target, color="black", lw=0.8, ls=":")
    ax.text(1, target + 1, f"{target:g} %: most errors inside the superclass below this", fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("top-1 % (test)")
    ax.set_ylabel("errors crossing superclasses %")
    ax.set_title("Share of errors that leave the superclass, by network accuracy\n"
                 "(filled: measured; hollow: if errors fell uniformly; dashed: the fit extrapolated)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)
