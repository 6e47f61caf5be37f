"""Evaluation of the two-stage model against its baselines, and routing calibration.

One pass of the predictor over a split collects stage-one outputs and the specialists of each
image's top-K superclasses (:class:`supersub.predictor.StageOutputs`); every routing variant
(hard, soft top-k, thresholds, resident pooling) is then a cheap recombination of those numbers,
so calibration on ``val`` costs one pass and the ``test`` numbers another.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from supersub.hierarchy import Hierarchy
from supersub.metrics import (
    classification_metrics,
    per_superclass_accuracy,
    severity_matrix,
    within_superclass_accuracy,
)
from supersub.predictor import RoutingConfig, StageOutputs, TwoStagePredictor, combine
from supersub.train import predict_logits

# The grid searched on val. k beyond 3 rarely helps and costs a specialist pass per image each.
K_GRID = (1, 2, 3)
THRESHOLD_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
RESIDENT_WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


def collect(predictor: TwoStagePredictor, loader, top: int) -> tuple[StageOutputs, StageOutputs, torch.Tensor]:
    """Stage outputs with the top-``top`` specialists, the oracle-routed outputs (each image's
    true superclass), and the fine labels, over every batch of ``loader``."""
    coarse = torch.tensor(predictor.hierarchy.fine_to_coarse)
    routed, oracle, labels = [], [], []
    for x, y in loader:
        y = y.cpu()
        routed.append(predictor.run(x, top))
        oracle.append(predictor.run(x, forced=coarse[y]))
        labels.append(y)
    return StageOutputs.cat(routed), StageOutputs.cat(oracle), torch.cat(labels)


def specialist_passes(out: StageOutputs, routing: RoutingConfig) -> float:
    """Mean number of specialist forward passes per image under ``routing``."""
    if routing.mode == "hard":
        return 1.0
    k = min(routing.k, out.routes.shape[1])
    confident = out.super_probs.gather(1, out.routes[:, :1]).squeeze(1) >= routing.threshold
    return (confident.float() + (~confident).float() * k).mean().item()


def calibrate(out: StageOutputs, labels: torch.Tensor, base: RoutingConfig, has_resident: bool) -> RoutingConfig:
    """The routing configuration with the best top-1 on these (val) outputs; ties go to the
    cheaper one (fewer specialist passes, then smaller resident weight)."""
    if base.mode == "hard":
        grid = [dataclasses.replace(base, resident_weight=a) for a in (RESIDENT_WEIGHT_GRID if has_resident else (0.0,))]
    else:
        grid = [
            dataclasses.replace(base, k=k, threshold=t, resident_weight=a)
            for k, t, a in itertools.product(
                [k for k in K_GRID if k <= out.routes.shape[1]],
                THRESHOLD_GRID,
                RESIDENT_WEIGHT_GRID if has_resident else (0.0,),
            )
        ]
    scored = []
    for r in grid:
        acc = combine(out, r).argmax(1).eq(labels).float().mean().item()
        scored.append((-acc, specialist_passes(out, r), r.resident_weight, r.k, r.threshold, r))
    scored.sort(key=lambda t: t[:5])
    return dataclasses.replace(scored[0][-1], calibrate=False)


def network_probs(model, loader, device) -> torch.Tensor:
    """Softmax outputs ``[N, C or S]`` of a plain network over ``loader``."""
    logits, _ = predict_logits(model, loader, device)
    return torch.softmax(logits, 1)


def evaluate_two_stage(
    predictor: TwoStagePredictor,
    hierarchy: Hierarchy,
    test_loader,
    val_loader=None,
    routing: RoutingConfig | None = None,
    baselines: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Metrics of the two-stage model (hard, soft — calibrated on ``val_loader`` when given —
    and oracle routing) and of baseline fine-class probabilities (``baselines[name]`` aligned
    with ``test_loader``'s order).

    Returns ``{"models": {name: metrics}, "routing": {...}, "per_superclass": {...},
    "labels": [N], "probs": {name: [N, C]}}``."""
    routing = routing or RoutingConfig()
    has_resident = predictor.resident == "vanilla"
    top = max(K_GRID) if routing.calibrate else routing.k
    top = min(top, hierarchy.num_superclasses)
    sev = severity_matrix(hierarchy)

    chosen = {"hard": RoutingConfig(mode="hard", k=1, calibrate=False), "soft": routing}
    if val_loader is not None and routing.calibrate:
        val_out, _, val_labels = collect(predictor, val_loader, top)
        chosen["hard"] = calibrate(val_out, val_labels, RoutingConfig(mode="hard", k=1), has_resident)
        chosen["soft"] = calibrate(val_out, val_labels, dataclasses.replace(routing, mode="soft"), has_resident)
    predictor.timings.update(stage1_s=0.0, stage2_s=0.0, specialist_passes=0, images=0)
    out, oracle, labels = collect(predictor, test_loader, top)

    probs_by_model = dict(baselines or {})
    for name, r in chosen.items():
        probs_by_model[f"two_stage_{name}"] = combine(out, r)
    probs_by_model["two_stage_oracle"] = combine(oracle, RoutingConfig(mode="hard", k=1, calibrate=False))

    models: dict[str, dict[str, float]] = {}
    per_super: dict[str, list[float]] = {}
    for name, probs in probs_by_model.items():
        two_stage = name.startswith("two_stage") and name != "two_stage_oracle"
        m = classification_metrics(probs, labels, hierarchy, super_probs=out.super_probs if two_stage else None, severity=sev)
        if two_stage:
            m["specialist_passes_per_image"] = specialist_passes(out, chosen[name.removeprefix("two_stage_")])
        models[name] = m
        per_super[name] = per_superclass_accuracy(probs, labels, hierarchy)
        if not name.startswith("two_stage"):
            per_super[f"{name}_within"] = within_superclass_accuracy(probs, labels, hierarchy)
    # Stage one on its own: the superclass accuracy routing starts from.
    true_super = torch.tensor(hierarchy.fine_to_coarse)[labels]
    models["stage1"] = {"superclass_acc": 100.0 * out.super_probs.argmax(1).eq(true_super).float().mean().item()}
    return {
        "models": models,
        "routing": {k: dataclasses.asdict(v) for k, v in chosen.items()},
        "per_superclass": per_super,
        "labels": labels,
        "probs": probs_by_model,
    }



def save_predictions(path, uris: list[str], labels: torch.Tensor, probs: dict[str, torch.Tensor], hierarchy: Hierarchy) -> None:
    """One row per evaluated image: its reference, true class, and per model the predicted class,
    the probability of that prediction and of the true class (what a report's galleries need)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    coarse = torch.tensor(hierarchy.fine_to_coarse)
    cols = {"uri": pa.array(uris), "label": pa.array(labels.int().numpy()), "superclass": pa.array(coarse[labels].int().numpy())}
    for name, p in probs.items():
        pred = p.argmax(1)
        cols[f"pred_{name}"] = pa.array(pred.int().numpy())
        cols[f"prob_{name}"] = pa.array(p.gather(1, pred[:, None]).squeeze(1).float().numpy())
        cols[f"true_prob_{name}"] = pa.array(p.gather(1, labels[:, None].long()).squeeze(1).float().numpy())
    pq.write_table(pa.table(cols), path)
