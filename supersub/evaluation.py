"""Evaluation of the two-stage model against its baselines, with what each model costs.

One pass of the predictor over a split collects stage one and the specialists of each image's
top-K superclasses (:class:`supersub.routing.StageOutputs`); every routing (hard, soft, pooled)
is then a recombination of those numbers, so calibration on ``val`` costs one pass and the
``test`` numbers another. Every model is reported with its cost beside its accuracy:

* ``bytes_in_networks`` — stored bytes, in units of the vanilla network;
* ``train_images`` — images through a network in training (forward + backward), every task that
  made the model counted;
* ``flops_per_image`` — inference FLOPs (PyTorch's counter) on the real test routing;
* ``latency_ratio`` — one test batch against the vanilla network's forward, every model timed in
  the same interleaved rounds (:func:`supersub.cost.interleaved`): the median of the per-round
  ratios, ``None`` when the measurement cannot be right — a two-stage model faster than its own
  stage one, a network far from the same architecture's time, rounds spread too wide — with the
  measured value, spread and reason under ``latency`` and the load average in ``evaluation``;
* ``delta_vs_vanilla`` — top-1 difference to the vanilla network with a paired bootstrap 95 %
  interval over the test images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supersub import atomic
from supersub.cost import interleaved, load_average, network_flops, pass_flops, ratio, two_stage_flops
from supersub.data.loaders import LoaderSpec, make_loader
from supersub.hierarchy import Hierarchy
from supersub.metrics import (
    classification_metrics,
    per_superclass_accuracy,
    severity_matrix,
    within_superclass_accuracy,
)
from supersub.models import state_bytes
from supersub.networks import load_network
from supersub.predictor import TwoStagePredictor
from supersub.routing import (
    FAMILIES,
    HARD,
    K_GRID,
    RESIDENT_WEIGHT_GRID,
    Routing,
    StageOutputs,
    calibrate,
    combine,
    default_routing,
    resolve,
    specialist_passes,
)
from supersub.stats import paired_bootstrap
from supersub.tasks import load_packed, load_router
from supersub.train import predict_logits


# ----------------------------------------------------------------------------- passes
def collect(predictor: TwoStagePredictor, loader, top: int, oracle: bool = True):
    """Stage outputs with the top-``top`` specialists, the oracle-routed outputs (each image's
    true superclass; None unless ``oracle``), and the fine labels, over every batch of ``loader``."""
    coarse = torch.tensor(predictor.hierarchy.fine_to_coarse)
    routed, forced, labels = [], [], []
    for x, y in loader:
        y = y.cpu()
        routed.append(predictor.run(x, top))
        if oracle:
            forced.append(predictor.run(x, forced=coarse[y]))
        labels.append(y)
    return StageOutputs.cat(routed), StageOutputs.cat(forced) if oracle else None, torch.cat(labels)


def network_probs(model, loader, device) -> torch.Tensor:
    """Softmax outputs ``[N, C or S]`` of a plain network over ``loader``."""
    logits, _ = predict_logits(model, loader, device)
    return torch.softmax(logits, 1)


def pool(p: torch.Tensor, resident: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log-linear pooling ``p · resident^α`` (renormalised), as routing's resident weight does."""
    if alpha <= 0:
        return p
    return torch.softmax(p.clamp_min(1e-30).log() + alpha * resident.clamp_min(1e-30).log(), 1)


def choose_alpha(p: torch.Tensor, resident: torch.Tensor, labels: torch.Tensor) -> float:
    """The pooling weight (0 or the routing grid) with the best top-1 on these (val) outputs."""
    best = max((0.0, *RESIDENT_WEIGHT_GRID), key=lambda a: (pool(p, resident, a).argmax(1).eq(labels).float().mean().item(), -a))
    return float(best)


# ----------------------------------------------------------------------------- inputs
@dataclass
class EvaluationInputs:
    """Where everything a run's evaluation reads lives (task folders)."""

    manifest_dir: str
    image_size: int
    resident: str  # vanilla | generalist
    resident_dir: str
    vanilla_dir: str
    specialist_dirs: list[str]  # index = superclass
    baseline_dirs: dict[str, list[str]] = field(default_factory=dict)  # vanilla_scaled, vanilla_long, ensemble
    delta_all_dir: str | None = None
    specialists_use_vanilla: bool = False  # init, head rows or distillation from it: its training counts too
    router_dir: str | None = None  # generalist.kind=trunk_router: stage one is the trunk + this head
    loader: str = "auto"
    num_workers: int = 2
    cache_dir: str | None = None


def _train_images(folder: str | None) -> int:
    path = Path(folder) / "metrics.json" if folder else None
    return int(json.loads(path.read_text()).get("train_images", 0)) if path and path.is_file() else 0


def routings(out: StageOutputs, labels: torch.Tensor, has_resident: bool, calibrated: bool, max_k: int) -> dict[str, Routing]:
    """The reported routings by family: calibrated on these outputs (val), or the defaults."""
    families = [f for f in FAMILIES if has_resident or not f.endswith("_pooled")]
    if not calibrated:
        return {f: default_routing(f) for f in families if not f.endswith("_pooled")}
    return {f: calibrate(out, labels, f, max_k) for f in families}


def served_routing(spec: str, chosen: dict[str, Routing]) -> tuple[str, Routing]:
    """``(model name, routing)`` the bundle serves; a ``*_pooled`` family without a vanilla
    resident falls back to its unpooled family."""
    if spec.endswith("_pooled") and spec not in chosen:
        spec = spec.removesuffix("_pooled")
    r = resolve(spec, chosen)
    name = f"two_stage_{spec}" if spec in chosen else "two_stage_served"
    return name, r


# ----------------------------------------------------------------------------- the run
def evaluate_run(inputs: EvaluationInputs, hierarchy: Hierarchy, manifest, device: torch.device, amp,
                 evaluation, log=print) -> dict[str, Any]:
    """Calibrates routing on val, evaluates every model on test; returns the metrics plus the
    per-model test probabilities (``probs``), labels and the objects the bundle needs."""
    h = hierarchy
    order = h.subclass_ids
    own = inputs.resident == "generalist"
    resident, resident_spec, _ = load_network(inputs.resident_dir, h.superclass_ids if own else order)
    deltas = {s: load_packed(d) for s, d in enumerate(inputs.specialist_dirs)}
    test_split = "test" if manifest.counts().get("test", 0) else "val"

    def loader(split: str):
        spec = LoaderSpec(split, "fine", False, evaluation.batch_size)
        return make_loader(manifest, spec, image_size=inputs.image_size, mode=inputs.loader, device=device,
                           num_workers=inputs.num_workers, cache_dir=inputs.cache_dir)

    router = load_router(inputs.router_dir) if inputs.router_dir else None
    # Evaluation keeps every decoded delta on the device: each batch needs many specialists.
    predictor = TwoStagePredictor(resident, h, deltas, inputs.resident, device, amp=amp, cache_bytes=1 << 30,
                                  router=router[0] if router else None)
    top = min(max(K_GRID) if evaluation.calibrate else 2, h.num_superclasses)
    val_out, _, val_labels = collect(predictor, loader("val"), top, oracle=False) if test_split == "test" else (None, None, None)
    pools = not own and router is None  # stage one ran the vanilla network's whole forward: its answer is free
    chosen = routings(val_out, val_labels, pools, evaluation.calibrate and val_out is not None, top)
    served_name, served = served_routing(evaluation.serve, chosen)
    if served.k > top:
        raise ValueError(f"evaluation.serve={evaluation.serve}: k={served.k} exceeds the {top} superclasses evaluated")
    predictor.timings.update(stage1_s=0.0, stage2_s=0.0, specialist_passes=0, images=0)
    out, oracle, labels = collect(predictor, loader(test_split), top)

    # ---- the networks: vanilla and the baselines, on val (for pooling) and test
    vanilla, _, _ = load_network(inputs.vanilla_dir, order)
    vanilla = vanilla.to(device)
    probs: dict[str, torch.Tensor] = {"vanilla": network_probs(vanilla, loader(test_split), device)}
    vanilla_bytes = state_bytes(vanilla)
    costs: dict[str, dict[str, Any]] = {}
    x1 = next(iter(loader(test_split)))[0][:64].to(device)  # one serving-sized batch for latency
    net_flops = network_flops(vanilla, inputs.image_size, device)
    # What each model's latency is timed on (all at the end, interleaved) and what its work allows:
    # model -> (one call on x1, {"near"|"at_least": ratio to vanilla, "contains": a timed part}).
    timers: dict[str, tuple[Any, dict[str, Any]]] = {"vanilla": (lambda: _forward(vanilla, x1), {})}
    costs["vanilla"] = {"bytes_in_networks": 1.0, "train_images": _train_images(inputs.vanilla_dir),
                        "flops_per_image": net_flops, "latency_ratio": None}
    for name, dirs in inputs.baseline_dirs.items():
        nets = [load_network(d, order)[0].to(device) for d in dirs]
        probs[name] = torch.stack([network_probs(n, loader(test_split), device) for n in nets]).mean(0)
        flops = sum(network_flops(n, inputs.image_size, device) for n in nets)
        costs[name] = {"bytes_in_networks": sum(state_bytes(n) for n in nets) / vanilla_bytes,
                       "train_images": sum(_train_images(d) for d in dirs), "flops_per_image": flops,
                       "latency_ratio": None}
        # Networks of the vanilla network's architecture (vanilla_long, the ensemble's members)
        # cost what it does, each: a ratio far from their count is a measurement error.
        same = flops == len(nets) * net_flops
        timers[name] = (lambda nets=nets: [_forward(n, x1) for n in nets], {"near": len(nets)} if same else {})
        if name == "ensemble":
            costs[name]["members"] = len(nets)

    if inputs.delta_all_dir:  # one delta over all classes, pooled with the vanilla network like the two-stage model
        all_pred = TwoStagePredictor(vanilla, _one_superclass(h), {0: load_packed(inputs.delta_all_dir)}, "vanilla",
                                     device, amp=amp, cache_bytes=1 << 30)
        p_test = _delta_all_probs(all_pred, loader(test_split))
        alpha = 0.0
        if test_split == "test":
            p_val = _delta_all_probs(all_pred, loader("val"))
            v_val = network_probs(vanilla, loader("val"), device)
            alpha = choose_alpha(p_val, v_val, val_labels)
        probs["delta_all"] = p_test
        probs["delta_all_pooled"] = pool(p_test, probs["vanilla"], alpha)
        d_bytes = load_packed(inputs.delta_all_dir).nbytes / vanilla_bytes
        one_pass = pass_flops(vanilla, all_pred.first_stage, inputs.image_size, device)
        trained = costs["vanilla"]["train_images"] + _train_images(inputs.delta_all_dir)
        # Pooled: the vanilla forward and a delta pass, so never faster than the vanilla network.
        timers["delta_all_pooled"] = (lambda: all_pred.predict(x1, HARD), {"at_least": 1.0})
        costs["delta_all"] = {"bytes_in_networks": 1 + d_bytes, "train_images": trained, "flops_per_image": net_flops,
                              "latency_ratio": None}
        costs["delta_all_pooled"] = {"bytes_in_networks": 1 + d_bytes, "train_images": trained,
                                     "flops_per_image": net_flops + one_pass, "latency_ratio": None, "alpha": alpha}

    # ---- the two-stage model under each routing
    stage1_flops, one_pass = two_stage_flops(predictor, inputs.image_size)
    total_bytes = (state_bytes(resident) + sum(d.nbytes for d in deltas.values())
                   + (state_bytes(router[0]) if router else 0)) / vanilla_bytes
    # A router that finetuned the trunk is also the resident: the vanilla network it started from
    # counts once, the finetuning once.
    finetuned = inputs.router_dir is not None and inputs.resident_dir == inputs.router_dir
    trained = (_train_images(inputs.vanilla_dir if finetuned else inputs.resident_dir)
               + sum(_train_images(d) for d in inputs.specialist_dirs)
               + (_train_images(inputs.vanilla_dir) if own and inputs.specialists_use_vanilla else 0)
               + _train_images(inputs.router_dir))  # the router's images went through the trunk too
    reported = {f"two_stage_{f}": r for f, r in chosen.items()}
    if served_name == "two_stage_served":
        reported[served_name] = served
    timers["stage1"] = (lambda: predictor.stage1(x1), {})
    for name, r in reported.items():
        probs[name] = combine(out, r)
        passes = specialist_passes(out, r)
        # A two-stage prediction runs its stage one and more: never faster than stage one alone.
        # With the vanilla network as stage one, not faster than the vanilla network either.
        timers[name] = (lambda r=r: predictor.predict(x1, r), {"contains": "stage1", **({"at_least": 1.0} if pools else {})})
        costs[name] = {"bytes_in_networks": total_bytes, "train_images": trained, "routing": str(r),
                       "specialist_passes_per_image": passes, "flops_per_image": stage1_flops + passes * one_pass,
                       "latency_ratio": None}
    probs["two_stage_oracle"] = combine(oracle, HARD)
    costs["two_stage_oracle"] = {"bytes_in_networks": total_bytes, "train_images": trained, "routing": "oracle",
                                 "specialist_passes_per_image": 1.0, "flops_per_image": stage1_flops + one_pass,
                                 "latency_ratio": None}
    if own:  # the generalist alone: superclass accuracy
        gen_probs = network_probs(resident.to(device), loader(test_split), device)

    timing = time_models(timers, costs, device) if evaluation.latency else None

    # ---- metrics, costs, intervals
    models, per_super = score_models(probs, labels, h, out, evaluation.bootstrap)
    for name, m in models.items():
        if name in costs:
            m.update(costs[name])
            m["flops_ratio"] = m["flops_per_image"] / net_flops
    if own:
        true_super = torch.tensor(h.fine_to_coarse)[labels]
        models["generalist"] = {"superclass_acc": 100.0 * gen_probs.argmax(1).eq(true_super).float().mean().item()}
    return {
        "test_split": test_split,
        "models": models,
        "routing": {f: str(r) for f, r in chosen.items()},
        "serves": {"model": served_name, "routing": str(served)},
        "per_superclass": per_super,
        "flops": {"network": net_flops, "stage1": stage1_flops, "specialist_pass": one_pass},
        "evaluation": {"batch_size": evaluation.batch_size, "top": top, "amp": str(amp) if amp else None,
                       "latency": timing},
        "timings": dict(predictor.timings),
        # for the caller: predictions, the bundle
        "labels": labels,
        "probs": probs,
        "_resident": (resident, resident_spec),
        "_router": router,
        "_deltas": deltas,
    }


def time_models(timers: dict[str, tuple[Any, dict[str, Any]]], costs: dict[str, dict[str, Any]], device,
                rounds: int = 7) -> dict[str, Any]:
    """Every model's latency ratio to the vanilla network, timed interleaved in the same rounds
    and checked against its work (``near``, ``at_least``, ``contains``); written into ``costs``.
    Returns how: rounds, load average before and after, the models whose ratio is unreliable."""
    before = load_average()
    times = interleaved({name: fn for name, (fn, _) in timers.items()}, rounds=rounds, warmup=1, device=device)
    after = load_average()
    unreliable = {}
    for name, (_, work) in timers.items():
        if name == "vanilla" or name not in costs:
            continue
        r = ratio(times, name, "vanilla", near=work.get("near"), at_least=work.get("at_least"),
                  why="the same architecture" if work.get("near") else f"{name} vs vanilla")
        if r.reliable and work.get("contains"):
            part = ratio(times, name, work["contains"], at_least=1.0, max_spread=float("inf"),
                         why=f"faster than its own {work['contains']}")
            if not part.reliable:
                r.reliable, r.why = False, part.why
        costs[name]["latency_ratio"] = r.value
        costs[name]["latency"] = r.to_dict()
        if not r.reliable:
            unreliable[name] = r.why
    costs["vanilla"]["latency_ratio"] = 1.0
    return {"rounds": rounds, "load_average": [before, after], "unreliable": unreliable}


def score_models(probs: dict[str, torch.Tensor], labels: torch.Tensor, h: Hierarchy, out: StageOutputs,
                 bootstrap: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Metrics of every model's test probabilities (two-stage models with their stage-one
    superclass accuracy), each model's top-1 difference to ``vanilla`` with its paired bootstrap
    interval, and per-superclass accuracies."""
    sev = severity_matrix(h)
    correct_vanilla = probs["vanilla"].argmax(1).eq(labels).numpy()
    models, per_super = {}, {}
    for name, p in probs.items():
        two_stage = name.startswith("two_stage") and name != "two_stage_oracle"
        m = classification_metrics(p, labels, h, super_probs=out.super_probs if two_stage else None, severity=sev)
        if name != "vanilla":
            m["delta_vs_vanilla"] = paired_bootstrap(p.argmax(1).eq(labels).numpy(), correct_vanilla, bootstrap)
        models[name] = m
        per_super[name] = per_superclass_accuracy(p, labels, h)
        if not name.startswith("two_stage"):
            per_super[f"{name}_within"] = within_superclass_accuracy(p, labels, h)
    true_super = torch.tensor(h.fine_to_coarse)[labels]
    models["stage1"] = {"superclass_acc": 100.0 * out.super_probs.argmax(1).eq(true_super).float().mean().item()}
    return models, per_super


def _forward(model, x) -> None:
    with torch.no_grad():
        model(x)


def _one_superclass(h: Hierarchy) -> Hierarchy:
    """``h`` with every class in one superclass: the hierarchy of the ``delta_all`` control."""
    from supersub.hierarchy import Subclass, Superclass

    return Hierarchy("all", (Superclass("all", "all", tuple(Subclass(s.id, s.name) for s in h.subclasses)),))


def _delta_all_probs(predictor: TwoStagePredictor, loader) -> torch.Tensor:
    out = [predictor.run(x, 1).spec_fine[:, 0] for x, _ in loader]
    return torch.cat(out)


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
    with atomic.atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)


