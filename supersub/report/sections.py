"""Gathering one report section: the numbers, the recomputed confusions, the figures, the gallery.

A section shows the models its ``metrics.json`` has (:func:`~supersub.report.inputs.fine_models`),
each with its accuracy and costs as the pipeline measured them; confusions, error counts and LCA
heights are recomputed from ``predictions.parquet`` for all of them, confusion matrices and the
gallery for the section's model (``--model``, by default the model the bundle serves). Figures and
gallery thumbnails are written as PNGs under the output folder; the page inlines them.
"""


from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from supersub.config import ConfigError
from supersub.errors import DataError
from supersub.hierarchy import Hierarchy
from supersub.report.inputs import (
    CHECKED_KEYS,
    METRIC_KEYS,
    ORACLE,
    RunSource,
    error_models,
    find_data,
    fine_models,
    load_predictions,
    read_json,
    thumbnail,
)


# ----------------------------------------------------------------------------- gathering
def clean(x: Any) -> Any:
    """JSON-safe: numpy numbers become Python ones, NaN and infinities ``None``."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [clean(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def recompute(pred: np.ndarray, labels: np.ndarray, h: Hierarchy, severity: np.ndarray) -> dict[str, Any]:
    """Metrics and confusions of saved predictions, by :mod:`supersub.metrics`: a one-hot
    distribution has the saved argmax, so top-1, superclass accuracy, crossing share and
    severity are those of the model (top-5 is not: it is left out)."""
    import torch

    from supersub.metrics import classification_metrics, confusions

    p = torch.nn.functional.one_hot(torch.from_numpy(pred), h.num_subclasses).float()
    y = torch.from_numpy(labels)
    metrics = classification_metrics(p, y, h, severity=severity)
    conf = confusions(p, y, h)
    errors = int(conf["fine"].sum() - np.trace(conf["fine"]))
    # Every off-diagonal count of the superclass confusion is a fine error across superclasses.
    crossing = int(conf["superclass"].sum() - np.trace(conf["superclass"]))
    heights = severity[labels, pred][pred != labels]
    return {
        "metrics": {k: metrics[k] for k in CHECKED_KEYS},
        "superclass": conf["superclass"], "fine": conf["fine"],
        "errors": {"errors": errors, "within": errors - crossing, "crossing": crossing},
        "lca_heights": {int(k): int(v) for k, v in enumerate(np.bincount(heights)) if v},
    }


def gallery_picks(pred: np.ndarray, labels: np.ndarray, prob: np.ndarray | None, fine_confusion: np.ndarray,
                  n: int, per_pair: int) -> list[tuple[int, list[int]]]:
    """``[(pair rank, rows)]``: misclassified rows, the most confused pairs first, at most
    ``per_pair`` a pair (its most confident mistakes first), ``n`` in all."""
    from supersub.metrics import most_confused_pairs

    out, left = [], n
    for rank, (t, p, _) in enumerate(most_confused_pairs(fine_confusion, top=max(n, 1))):
        if left <= 0:
            break
        rows = np.flatnonzero((labels == t) & (pred == p))
        if prob is not None:
            rows = rows[np.argsort(-prob[rows], kind="stable")]
        rows = rows[: min(per_pair, left)].tolist()
        out.append((rank, rows))
        left -= len(rows)
    return out


def _at(values: list[Any] | None, i: int) -> Any:
    return values[i] if values is not None and i < len(values) else None


def _default_model(served: str | None, fine: list[str]) -> str:
    """The served model; for runs that do not say, the soft two-stage model, else the last non-oracle."""
    for name in (served, "two_stage_soft"):
        if name in fine:
            return name
    rest = [k for k in fine if k != ORACLE] or fine
    if not rest:
        raise DataError("metrics.json has no model with a top-1")
    return rest[-1]


class Section:
    """Builds one section: its numbers (``self.data``, written to report.json), its figures and
    gallery images (PNGs under ``out/slug``, referenced relative to ``out``)."""

    def __init__(self, src: RunSource, out: Path, slug: str, model: str | None) -> None:
        self.src, self.out = src, out
        self.dir = out / slug if slug else out
        self.dir.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.h, self.manifest = find_data(src, self.notes)
        m = src.metrics
        self.supers = [s.name for s in self.h.superclasses]
        self.classes = [s.name for s in self.h.subclasses]
        models = {k: {x: v[x] for x in METRIC_KEYS if x in v} for k, v in m.get("models", {}).items()}
        self.fine = fine_models(models)
        serves = m.get("serves") or {}
        self.model = model = model or _default_model(serves.get("model"), self.fine)
        if model not in self.fine:
            raise ConfigError(f"--model {model}: {src.name} has {self.fine}")
        self.data: dict[str, Any] = {
            "name": src.name, "slug": slug, "test_split": m.get("test_split"), "mlflow_run_id": src.mlflow_run_id,
            "seed": src.seed, "seeds": src.seeds,
            "hierarchy": {"name": self.h.name, "superclasses": self.supers,
                          "sizes": [len(s.subclasses) for s in self.h.superclasses]},
            "resident": "generalist" if "generalist" in models else "vanilla",
            "model": model, "routing": m.get("routing", {}), "serves": serves, "models": models,
            "fine_models": self.fine, "notes": self.notes, "figures": {},
        }

    def fig(self, key: str) -> Path:
        path = self.dir / f"{key}.png"
        self.data["figures"][key] = path.relative_to(self.out).as_posix()
        return path

    def build(self, gallery: int, per_pair: int, tune: Path | None) -> dict[str, Any]:
        from supersub import plots

        models, fine = self.data["models"], self.fine
        plots.grouped_bars([plots.label(k) for k in fine], {
            "top-1": [models[k]["top1"] for k in fine],
            "superclass accuracy": [models[k].get("superclass_acc") for k in fine]},
            self.fig("models"), ylabel="test accuracy (%)", title="Accuracy per model", wrap=True)
        path = self.src.folder / "predictions.parquet" if self.src.folder else None
        if path is not None and path.is_file():
            self._from_predictions(load_predictions(path), gallery, per_pair)
        else:
            self.notes.append("no predictions.parquet: confusions, galleries and LCA heights are left out")
        self._per_superclass()
        self._storage()
        self._pareto(tune or (self.src.folder / "tune" / "pareto.json" if self.src.folder else None))
        self.data["severity"] = {k: {x: models[k].get(x) for x in ("mistake_severity", "mean_lca_height")}
                                 | {"lca_heights": self.data.get("lca_heights", {}).get(k)} for k in fine}
        return self.data

    # ------------------------------------------------------------------ from predictions.parquet
    def _from_predictions(self, preds: dict[str, Any], gallery: int, per_pair: int) -> None:
        from supersub import plots
        from supersub.metrics import most_confused_pairs, severity_matrix

        if self.model not in preds["pred"]:
            raise ConfigError(f"--model {self.model}: predictions.parquet has {sorted(preds['pred'])}")
        h, labels, sev = self.h, preds["label"], severity_matrix(self.h)
        if len(labels) and int(labels.max()) >= h.num_subclasses:
            raise DataError(f"{self.src.name}: predictions name classes beyond the hierarchy's {h.num_subclasses}")
        missing = [k for k in self.fine if k not in preds["pred"]]
        if missing:
            self.notes.append(f"predictions.parquet has no predictions of {', '.join(missing)}")
        rec = {k: recompute(preds["pred"][k], labels, h, sev) for k in self.fine if k in preds["pred"]}
        for k, r in rec.items():  # metrics.json and predictions.parquet come from one evaluation
            off = [x for x in CHECKED_KEYS if abs(r["metrics"][x] - self.data["models"].get(k, {}).get(x, math.nan)) > 0.01]
            if off:
                self.notes.append(f"{k}: predictions.parquet and metrics.json disagree on {', '.join(off)}")
        self.data["errors"] = {k: r["errors"] | {"crossing_share": r["metrics"]["crossing_error_share"]}
                               for k, r in rec.items() if k in error_models(self.data["models"])}
        self.data["lca_heights"] = {k: r["lca_heights"] for k, r in rec.items()}
        errs = self.data["errors"]
        plots.error_split(list(errs), [e["within"] for e in errs.values()], [e["crossing"] for e in errs.values()],
                          self.fig("errors"))
        panels = list(dict.fromkeys(k for k in ("vanilla", self.model) if k in rec))
        self.data["confusion"] = {"models": panels, "superclass": {k: rec[k]["superclass"] for k in panels}, "within": []}
        plots.confusion_panels({k: rec[k]["superclass"] for k in panels}, self.supers, self.supers,
                               self.fig("confusion_superclass"), title="Superclass confusion (true → predicted)")
        for s, members in enumerate(h.coarse_to_fine):
            counts = {}
            for k in panels:
                rows = rec[k]["fine"][members]
                block = rows[:, members]
                # The extra column keeps each row summing to the class's images: errors that left it.
                counts[k] = np.concatenate([block, (rows.sum(1) - block.sum(1))[:, None]], 1)
            names = [self.classes[i] for i in members]
            self.data["confusion"]["within"].append({"superclass": s, "classes": names, "counts": counts})
            plots.confusion_panels(counts, names, [*names, "other superclasses"], self.fig(f"confusion_{s:03d}"),
                                   title=f"Within {self.supers[s]}")
        fine_conf = rec[self.model]["fine"]
        self.data["pairs"] = [self._pair(t, p, c, sev) for t, p, c in most_confused_pairs(fine_conf, top=20)]
        self._gallery(preds, fine_conf, sev, gallery, per_pair)
        plots.severity_histogram(self.data["lca_heights"], self.fig("severity"))

    def _pair(self, t: int, p: int, count: int, sev: np.ndarray) -> dict[str, Any]:
        ts, ps = self.h.fine_to_coarse[t], self.h.fine_to_coarse[p]
        return {"true": t, "pred": p, "count": count, "true_name": self.classes[t], "pred_name": self.classes[p],
                "true_super": self.supers[ts], "pred_super": self.supers[ps], "crossing": ts != ps,
                "lca_height": int(sev[t, p])}

    def _gallery(self, preds: dict[str, Any], fine_conf: np.ndarray, sev: np.ndarray, n: int, per_pair: int) -> None:
        self.data["gallery"] = []
        if self.manifest is None or n <= 0:
            return
        store, k = self.manifest.store(), self.model
        pred, prob, labels = preds["pred"][k], preds["prob"][k], preds["label"]
        for rank, rows in gallery_picks(pred, labels, prob, fine_conf, n, per_pair):
            t, p = int(labels[rows[0]]), int(pred[rows[0]])
            group = self._pair(t, p, int(fine_conf[t, p]), sev) | {"rank": rank, "images": []}
            for row in rows:
                uri = preds["uri"][row]
                file = self.dir / "gallery" / f"{len(self.data['gallery']):02d}_{len(group['images']):02d}.png"
                try:
                    thumbnail(store.read(uri), file)
                except (DataError, OSError) as e:
                    self.notes.append(f"gallery: {uri} not readable ({e})")
                    continue
                group["images"].append({"row": row, "uri": uri, "file": file.relative_to(self.out).as_posix(),
                                        "prob": _at(prob, row), "true_prob": _at(preds["true_prob"][k], row)})
            self.data["gallery"].append(group)

    # ------------------------------------------------------------------ from metrics.json
    def _per_superclass(self) -> None:
        from supersub import plots

        ps, m = self.src.metrics.get("per_superclass", {}), self.src.metrics
        spec = {s["superclass"]: s for s in m.get("specialists", [])}
        rows = []
        for s, name in enumerate(self.supers):
            row = {"superclass": s, "name": name, "classes": len(self.h.superclasses[s].subclasses),
                   "vanilla": _at(ps.get("vanilla"), s), "vanilla_within": _at(ps.get("vanilla_within"), s),
                   "specialist": _at(ps.get(ORACLE), s), "two_stage": _at(ps.get(self.model), s),
                   "specialist_val_acc": spec.get(s, {}).get("val_acc"), "delta_ratio": spec.get(s, {}).get("delta_ratio")}
            a, b = row["specialist"], row["vanilla_within"]
            row["gain"] = a - b if a is not None and b is not None else None
            rows.append(row)
        self.data["per_superclass"] = rows
        series = {"vanilla": "vanilla", "vanilla_within": "vanilla, answer kept in the true superclass",
                  "specialist": "specialist (oracle routing)", "two_stage": plots.label(self.model)}
        plots.grouped_bars(self.supers, {label: [r[k] for r in rows] for k, label in series.items()},
                           self.fig("per_superclass"), ylabel="test top-1 (%)", title="Per superclass: specialist vs vanilla")

    def _storage(self) -> None:
        """Per-specialist delta bytes (metrics.json's ``bytes``) and every model's top-1 at its
        stored bytes (its ``bytes_in_networks``)."""
        from supersub import plots

        b, models = self.src.metrics.get("bytes"), self.data["models"]
        if not b:
            self.notes.append("metrics.json has no byte counts")
            return
        net = b["network"]
        per = list(b["per_specialist"].values())
        st = {"network": net, "specialists": len(per), "mean_ratio": b["mean_specialist_ratio"],
              "specialists_total": b.get("specialists_total", sum(per)), "total_networks": b["total_in_networks"],
              "per_specialist": [{"name": n, "bytes": v, "ratio": v / net} for n, v in zip(self.supers, per)]}
        st["points"] = [{"model": k, "networks": models[k]["bytes_in_networks"], "top1": models[k]["top1"]}
                        for k in error_models(models) if models[k].get("bytes_in_networks") is not None]
        self.data["storage"] = st
        plots.bytes_bars(self.supers, [r["ratio"] for r in st["per_specialist"]], self.fig("bytes"),
                         total=st["total_networks"])
        if st["points"]:
            plots.accuracy_vs_bytes(st["points"], self.fig("accuracy_vs_bytes"))
        else:
            self.notes.append("metrics.json gives no model's stored bytes (bytes_in_networks)")

    def _pareto(self, path: Path | None) -> None:
        from supersub import plots

        if path is not None and path.is_dir():
            path = path / "tune" / "pareto.json" if (path / "tune").is_dir() else path / "pareto.json"
        if path is None or not path.is_file():
            return
        tune = read_tune(path, self.src.metrics.get("bytes", {}).get("network"))
        if not tune["trials"]:
            self.notes.append(f"{path}: no completed trial with an accuracy and a size")
            return
        specs = self.src.metrics.get("specialists") or []
        if specs and self.src.metrics.get("bytes"):
            tune["run_point"] = {"val_acc": float(np.mean([s["val_acc"] for s in specs])),
                                 "delta_ratio": self.src.metrics["bytes"]["mean_specialist_ratio"]}
        self.data["pareto"] = tune
        front = [t for t in tune["trials"] if t["trial_id"] in tune["front"]]
        best = next((t for t in tune["trials"] if t["trial_id"] == tune["best"]), None)
        plots.pareto(tune["trials"], front, tune.get("run_point"), self.fig("pareto"), budget=tune.get("budget"),
                     best=best)


def read_tune(path: Path, network_bytes: float | None) -> dict[str, Any]:
    """A tune job's ``pareto.json`` (``{budget, trials, front, best}``), or any list of
    ``{..., val_acc, delta_ratio | delta_bytes}`` records; unfinished trials are left out."""
    data = read_json(path)
    records = data.get("trials") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of trials or an object with 'trials'")
    trials = []
    for i, r in enumerate(records):
        ratio = r.get("delta_ratio")
        if ratio is None and r.get("delta_bytes") is not None and network_bytes:
            ratio = r["delta_bytes"] / network_bytes
        if r.get("status", "completed") != "completed" or ratio is None or r.get("val_acc") is None:
            continue
        params = r.get("params") or {k: v for k, v in r.items() if k not in
                                     ("trial_id", "status", "val_acc", "delta_ratio", "delta_bytes", "delta_density")}
        trials.append({"trial_id": str(r.get("trial_id", i)), "val_acc": float(r["val_acc"]),
                       "delta_ratio": float(ratio), "params": params})
    front = data.get("front") if isinstance(data, dict) else None
    if front is None:  # the trials no other beats on both accuracy (higher) and size (lower)
        front, best = [], -math.inf
        for t in sorted(trials, key=lambda t: (t["delta_ratio"], -t["val_acc"])):
            if t["val_acc"] > best:
                front.append(t["trial_id"])
                best = t["val_acc"]
    best = data.get("best") if isinstance(data, dict) else None
    return {"file": str(path), "budget": data.get("budget") if isinstance(data, dict) else None,
            "trials": trials, "front": [str(f) for f in front],
            "best": best.get("trial_id") if isinstance(best, dict) else None}


