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


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    """``study.md`` (the tables) and the rows into ``study.json``."""
    (out / "study.md").write_text(markdown(rows))
    path = out / "study.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["rows"] = rows
    path.write_text(json.dumps(doc, indent=2))
