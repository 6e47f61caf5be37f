"""The table of a study: every model of every variant, accuracy over seeds beside what it costs.

One row per (variant, model): top-1 mean and standard deviation over the seeds that finished;
the top-1 difference to the vanilla network of the same runs with a paired bootstrap 95 %
interval over test images (each image's correctness averaged over seeds first, so resampling
keeps an image's seeds together); stored bytes and inference FLOPs in vanilla networks; training
images; latency ratio; and the share of errors that cross superclasses beside its chance level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from supersub.stats import mean_sd, paired_bootstrap

# Row order: the vanilla network and its controls first, then the two-stage models.
ORDER = ("vanilla", "vanilla_long", "vanilla_scaled", "vanilla_flops", "ensemble", "delta_all", "delta_all_pooled", "two_stage_hard",
         "two_stage_soft", "two_stage_hard_pooled", "two_stage_soft_pooled", "two_stage_served", "two_stage_oracle")
COST_KEYS = ("bytes_in_networks", "train_images", "flops_per_image", "flops_ratio", "latency_ratio",
             "specialist_passes_per_image", "crossing_error_share", "crossing_error_chance", "superclass_acc")


def _correct(run_dir: str, model: str) -> np.ndarray | None:
    import pyarrow.parquet as pq

    path = Path(run_dir) / "predictions.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path, columns=["label", f"pred_{model}"])
    return (t.column(f"pred_{model}").to_numpy() == t.column("label").to_numpy()).astype(np.float64)


def summarise(results: dict[str, dict[str, Any]], bootstrap: int = 1000) -> list[dict[str, Any]]:
    """Rows of the study table from ``study.json``'s ``results`` ({variant: {seed: {dir, metrics}}})."""
    rows = []
    for variant, by_seed in results.items():
        seeds = sorted(by_seed, key=int)
        names = [n for n in ORDER if all(n in by_seed[s]["metrics"]["models"] for s in seeds)]
        vanilla = [_correct(by_seed[s]["dir"], "vanilla") for s in seeds]
        for name in names:
            ms = [by_seed[s]["metrics"]["models"][name] for s in seeds]
            top1, sd = mean_sd([m["top1"] for m in ms])
            row: dict[str, Any] = {"variant": variant, "model": name, "seeds": [int(s) for s in seeds],
                                   "top1": top1, "top1_sd": sd, "top1_by_seed": [m["top1"] for m in ms]}
            if name != "vanilla":
                mine = [_correct(by_seed[s]["dir"], name) for s in seeds]
                if all(v is not None for v in mine + vanilla) and len({v.size for v in mine + vanilla}) == 1:
                    row["delta_vs_vanilla"] = paired_bootstrap(np.mean(mine, 0), np.mean(vanilla, 0), bootstrap)
            for k in COST_KEYS:
                vals = [m.get(k) for m in ms if m.get(k) is not None]
                row[k] = float(np.mean(vals)) if vals else None
            row["routing"] = ms[0].get("routing")
            rows.append(row)
        stage1 = [by_seed[s]["metrics"]["models"]["stage1"]["superclass_acc"] for s in seeds]
        rows.append({"variant": variant, "model": "stage1", "superclass_acc": float(np.mean(stage1)),
                     "seeds": [int(s) for s in seeds]})
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The study table as Markdown, one block per variant."""
    head = ("| model | top-1 (mean ± sd) | Δ vs vanilla [95 % CI] | bytes (networks) | train images | "
            "FLOPs / image (networks) | latency ratio | routing | cross % (chance) |")
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        vr = [r for r in rows if r["variant"] == variant]
        stage1 = next((r for r in vr if r["model"] == "stage1"), None)
        seeds = vr[0]["seeds"]
        out += [f"**{variant}** — seeds {', '.join(map(str, seeds))}; stage-one superclass accuracy "
                f"{_fmt(stage1 and stage1['superclass_acc'], '.2f')} %", "", head, "|" + "---|" * 9]
        for r in vr:
            if r["model"] == "stage1":
                continue
            d = r.get("delta_vs_vanilla")
            delta = f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "—"
            cross = f"{_fmt(r.get('crossing_error_share'), '.1f')} ({_fmt(r.get('crossing_error_chance'), '.1f')})"
            out.append(
                f"| {r['model']} | {r['top1']:.2f} ± {r['top1_sd']:.2f} | {delta} | {_fmt(r.get('bytes_in_networks'), '.3f')} "
                f"| {_fmt(r.get('train_images'), ',.0f')} | {_fmt(r.get('flops_ratio'), '.2f')} "
                f"| {_fmt(r.get('latency_ratio'), '.2f')} | {r.get('routing') or '—'} | {cross} |"
            )
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the regime map
# The controls a two-stage model is judged against: every model that is not the two-stage model.
CONTROLS = ("vanilla", "vanilla_long", "vanilla_scaled", "vanilla_flops", "ensemble", "delta_all", "delta_all_pooled")
FLOPS_SLACK = 0.02  # as ensemble_size: a specialist's head is a hair smaller than the vanilla one's


def _cell(run_dir: str) -> dict[str, Any]:
    """What places a run in the map: images per class, width, tail (delta stages), stage one."""
    import yaml

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    per_class = cfg["data"].get("max_train_per_class")
    return {"images_per_class": "all" if per_class is None else int(per_class), "width": cfg["model"]["width"],
            "tail": "+".join(cfg["delta"]["stages"]), "stage_one": cfg["generalist"]["kind"],
            "delta": f"{cfg['delta']['keep']:g} kept, {cfg['delta']['bits']} bits"}


def _mean(by_seed: dict[str, Any], seeds: list[str], model: str, key: str) -> float:
    return float(np.mean([by_seed[s]["metrics"]["models"][model][key] for s in seeds]))


def regime_map(results: dict[str, dict[str, Any]], bootstrap: int = 1000) -> list[dict[str, Any]]:
    """One row per variant (a cell of the map) and two-stage model (``two_stage_hard`` and the
    served one): its top-1 minus the best control whose inference FLOPs are at most its own, with
    the paired bootstrap 95 % interval over test images (each image's correctness averaged over
    the seeds both finished), beside bytes, training images and FLOPs of both."""
    rows = []
    for variant, by_seed in results.items():
        seeds = sorted(by_seed, key=int)
        first = by_seed[seeds[0]]
        served = first["metrics"].get("serves", {}).get("model")
        for name in dict.fromkeys(n for n in ("two_stage_hard", served) if n):
            ms = [by_seed[s]["metrics"]["models"].get(name) for s in seeds]
            if any(m is None or m.get("flops_ratio") is None for m in ms):  # a run without costs: not on the map
                continue
            flops = max(m["flops_ratio"] for m in ms)
            costed = [c for c in CONTROLS if all(by_seed[s]["metrics"]["models"].get(c, {}).get("flops_ratio") is not None
                                                 for s in seeds)]
            controls = [c for c in costed
                        if max(by_seed[s]["metrics"]["models"][c]["flops_ratio"] for s in seeds) <= flops + FLOPS_SLACK]
            if not controls:
                continue
            top1 = {c: float(np.mean([by_seed[s]["metrics"]["models"][c]["top1"] for s in seeds])) for c in controls}
            best = max(controls, key=lambda c: top1[c])
            mine = [_correct(by_seed[s]["dir"], name) for s in seeds]
            theirs = [_correct(by_seed[s]["dir"], best) for s in seeds]
            diff = (paired_bootstrap(np.mean(mine, 0), np.mean(theirs, 0), bootstrap)
                    if all(v is not None for v in mine + theirs) else None)
            rows.append({
                "variant": variant, **_cell(first["dir"]), "model": name, "routing": ms[0].get("routing"),
                "seeds": [int(s) for s in seeds], "top1": float(np.mean([m["top1"] for m in ms])),
                "best_control": best, "best_control_top1": top1[best], "controls_considered": controls,
                "minus_best_control": diff,
                **{k: _mean(by_seed, seeds, name, k) for k in ("bytes_in_networks", "train_images", "flops_ratio")},
                **{f"control_{k}": _mean(by_seed, seeds, best, k) for k in ("bytes_in_networks", "train_images", "flops_ratio")},
            })
    return rows


def regime_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| cell (variant) | images / class | width | tail | two-stage model | top-1 | best control at ≤ its FLOPs "
            "| its top-1 | two-stage − control [95 % CI] | bytes | train images | FLOPs |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        d = r["minus_best_control"]
        diff = f"**{d['delta']:+.2f}** [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "—"
        out.append(
            f"| {r['variant']} | {r['images_per_class']} | {r['width']:g} | {r['tail']} | {r['model']} ({r['routing']}) "
            f"| {r['top1']:.2f} | {r['best_control']} | {r['best_control_top1']:.2f} | {diff} "
            f"| {r['bytes_in_networks']:.3f} vs {r['control_bytes_in_networks']:.3f} "
            f"| {r['train_images']:,.0f} vs {r['control_train_images']:,.0f} "
            f"| {r['flops_ratio']:.2f} vs {r['control_flops_ratio']:.2f} |")
    return "\n".join(out) + "\n"


def write_regime_map(results: dict[str, dict[str, Any]], out: Path, bootstrap: int = 1000) -> list[dict[str, Any]]:
    """``regime_map.md``, ``regime_map.png`` and ``regime_map`` in ``study.json``."""
    rows = regime_map(results, bootstrap)
    if not rows:
        return rows
    (out / "regime_map.md").write_text(regime_markdown(rows))
    from supersub.plots import regime_map_plot

    regime_map_plot(rows, out / "regime_map.png")
    path = out / "study.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["regime_map"] = rows
    path.write_text(json.dumps(doc, indent=2))
    return rows


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    """``study.md`` (the tables) and the rows into ``study.json``."""
    (out / "study.md").write_text(markdown(rows))
    path = out / "study.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["rows"] = rows
    path.write_text(json.dumps(doc, indent=2))
