"""A study: several pipeline variants over the same data and base networks, one summary table.

    python -m jobs.study --study jobs/configs/study_tiny_imagenet.yaml --out runs/study [key=value ...]

The study file names a base pipeline config and the variants, each a list of ``key=value``
overrides of generalist / specialist / delta / routing / baselines / hierarchy settings (anything
else would change the shared data and networks and is refused). ``key=value`` on the command line applies to every
variant. Variants run in the file's order; ``--variants a,b`` picks some, ``--time-budget-s``
stops starting new ones when the time is spent (what is done stays in ``study.json``).

It runs in this process (``resources.runner=local``), with neither Ray nor MLflow needed: it is
how the findings in ``docs/results.md`` were produced on a GPU machine without Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from supersub.config import ConfigError, dotted_keys, load_config, parse_overrides
from supersub.pipeline import LocalRunner, PipelineConfig, run_pipeline

# Sections a variant may change without touching the shared data and base networks.
VARIANT_SECTIONS = {"generalist", "specialist", "delta", "routing", "baselines", "name"}
VARIANT_KEYS = {"data.hierarchy"}


def load_study(path: str | Path) -> tuple[Path, dict[str, list[str]]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"config", "variants"}
    if unknown or "config" not in data or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise ConfigError(f"{path}: a study file has 'config' (a pipeline config) and a non-empty 'variants' mapping")
    variants = {}
    for name, overrides in data["variants"].items():
        overrides = list(overrides or [])
        for key, value in dotted_keys(parse_overrides(overrides)).items():
            if key.split(".")[0] not in VARIANT_SECTIONS and key not in VARIANT_KEYS:
                raise ConfigError(f"{path}: variant {name} changes {key}, which the variants share")
            del value
        variants[str(name)] = overrides
    return (path.parent / data["config"]).resolve(), variants


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, m in results.items():
        models = m["models"]
        van = models.get("vanilla", {})
        row = {
            "variant": name,
            "vanilla": van.get("top1"),
            "vanilla_scaled": models.get("vanilla_scaled", {}).get("top1"),
            "hard": models["two_stage_hard"]["top1"],
            "soft": models["two_stage_soft"]["top1"],
            "oracle": models["two_stage_oracle"]["top1"],
            "stage1_super": models["stage1"]["superclass_acc"],
            "vanilla_cross%": van.get("crossing_error_share"),
            "soft_cross%": models["two_stage_soft"]["crossing_error_share"],
            "delta_ratio": m["bytes"]["mean_specialist_ratio"],
            "total_networks": m["bytes"]["total_in_networks"],
            "soft_k": m["routing"]["soft"]["k"],
            "soft_alpha": m["routing"]["soft"]["resident_weight"],
        }
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no variant finished)"
    cols = list(rows[0])
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(cell(r[c]).rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study YAML (config + variants)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variants", help="comma-separated subset of the variants, in the file's order")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="start no new variant after this many seconds")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    args = p.parse_args(argv)

    config_path, variants = load_study(args.study)
    if args.variants:
        chosen = args.variants.split(",")
        missing = [v for v in chosen if v not in variants]
        if missing:
            raise ConfigError(f"unknown variant(s) {missing}; the study has {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in chosen}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Validate every variant before spending time on any.
    configs = {
        name: load_config(PipelineConfig, config_path, [*args.overrides, *ov, f"name={name}", "resources.runner=local"])
        for name, ov in variants.items()
    }
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    summary = out / "study.json"
    if summary.is_file():
        results = {k: v for k, v in json.loads(summary.read_text())["results"].items() if k in configs}
    for name, cfg in configs.items():
        if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
            print(f"time budget spent: {name} and later variants not started", flush=True)
            break
        print(f"===== variant {name}", flush=True)
        t0 = time.perf_counter()
        metrics = run_pipeline(cfg, out / name, LocalRunner(cfg.device), shared_dir=out / "shared")
        metrics["variant_seconds"] = time.perf_counter() - t0
        results[name] = metrics
        # Re-read before writing: another study process on the same folder (other variants run
        # concurrently) may have added its results since this one started.
        merged = json.loads(summary.read_text())["results"] if summary.is_file() else {}
        merged[name] = metrics
        summary.write_text(json.dumps({"study": str(args.study), "results": merged}, indent=2))
    print(format_rows(summary_rows(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
