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
  measured value, spread and reason under ``latency`` and the load average in ``evaluation``.
  Controls added after the evaluation (:meth:`Evaluation.add_network_controls`) are timed in
  rounds of their own, interleaved with the vanilla forward again: still a ratio to the vanilla
  network measured in the same rounds as it;
* ``delta_vs_vanilla`` — top-1 difference to the vanilla network with a paired bootstrap 95 %
  interval over the test images.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from supersub import atomic
from supersub.cost import interleaved, load_average, network_flops, pass_flops, ratio, two_stage_flops
from supersub.data.loaders import LoaderSpec, make_loader
from supersub.delta import PackedDelta
from supersub.epoch import predict_logits
from supersub.hierarchy import Hierarchy
from supersub.metrics import (
    classification_metrics,
    per_superclass_accuracy,
    severity_matrix,
    within_superclass_accuracy,
)
from supersub.networks import NetworkSpec, load_network
from supersub.predictor import TwoStagePredictor
from supersub.resnet import ResNet, state_bytes
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
from supersub.trunk_router import RouterSpec, TrunkRouter


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
    resident: Literal["generalist", "vanilla"]  # as bundles and the predictor name it
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

    @property
    def has_generalist(self) -> bool:
        """Stage one is a superclass network of its own, not the vanilla network."""
        return self.resident == "generalist"


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


# ----------------------------------------------------------------------------- what it loads
class Networks:
    """The run's plain networks on the device, each read from its folder once (by folder and
    class order), whichever rows, predictors and bundle files use it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loaded: dict[tuple[str, tuple[str, ...]], tuple[ResNet, NetworkSpec]] = {}

    def get(self, folder: str, order: list[str]) -> tuple[ResNet, NetworkSpec]:
        key = (str(folder), tuple(order))
        if key not in self._loaded:
            model, spec, _ = load_network(folder, order)
            self._loaded[key] = (model.to(self.device), spec)
        return self._loaded[key]


@dataclass
class LoadedModels:
    """What an evaluation loaded, each once: the bundle is written from these, and rows added
    later (:meth:`Evaluation.add_network_controls`) reuse them."""

    networks: Networks
    resident: tuple[ResNet, NetworkSpec]
    vanilla: tuple[ResNet, NetworkSpec]
    deltas: dict[int, PackedDelta]  # by superclass
    router: tuple[TrunkRouter, RouterSpec] | None


@dataclass
class Probe:
    """What rows added after the first pass are measured with, as the first pass measured: the
    test loader, the latency batch, the vanilla network's FLOPs and bytes."""

    inputs: EvaluationInputs
    hierarchy: Hierarchy
    device: torch.device
    loader: Callable[[str], Any]  # split -> loader
    test_split: str
    x1: torch.Tensor  # one serving-sized test batch for latency
    net_flops: int
    vanilla_bytes: int
    bootstrap: int
    latency: bool


# ----------------------------------------------------------------------------- the result
@dataclass
class Evaluation:
    """A run's evaluation: every model's test metrics and costs (:meth:`metrics`: JSON), the
    test probabilities behind them (:attr:`probs`, for predictions.parquet), and the models it
    loaded (:attr:`loaded`, for the bundle). Rows are ordered vanilla, the network controls, then
    the rest, however late a control was added."""

    test_split: str
    labels: torch.Tensor
    probs: dict[str, torch.Tensor]
    models: dict[str, dict[str, Any]]
    per_superclass: dict[str, list[float]]
    routing: dict[str, str]  # family -> compact routing
    serves: dict[str, str]  # {"model", "routing"}
    flops: dict[str, int]
    settings: dict[str, Any]  # batch size, superclasses run an image, amp, latency rounds: how to repeat it
    timings: dict[str, Any]
    loaded: LoadedModels
    network_rows: list[str]  # vanilla and the network controls, in order
    probe: Probe = field(repr=False)

    def metrics(self) -> dict[str, Any]:
        """The JSON part: what metrics.json holds of the evaluation."""
        return {"test_split": self.test_split, "models": self.models, "routing": self.routing, "serves": self.serves,
                "per_superclass": self.per_superclass, "flops": self.flops, "evaluation": self.settings,
                "timings": self.timings}

    def add_network_controls(self, dirs: dict[str, list[str]]) -> None:
        """Evaluates network controls trained after this evaluation (each name: its members'
        folders, averaged) and merges their rows in; names it has already are left as they are,
        and nothing else is evaluated again. Their
        latency ratios are to the vanilla forward as every other row's, timed in rounds of their
        own that interleave them with the vanilla forward (``settings["latency"]["own_rounds"]``)."""
        new = {name: d for name, d in dirs.items() if name not in self.models}
        if not new:
            return
        p = self.probe
        probs, costs, timers = network_rows(p, self.loaded.networks, new, self.probs["vanilla"], self.loaded.vanilla[0])
        if p.latency:
            vanilla = self.loaded.vanilla[0]
            timing = time_models({"vanilla": (lambda: _forward(vanilla, p.x1), {}), **timers},
                                 {"vanilla": {}, **costs}, p.device)
            latency = self.settings["latency"]
            latency["unreliable"].update(timing["unreliable"])
            latency.setdefault("own_rounds", []).append(
                {"models": list(new), "rounds": timing["rounds"], "load_average": timing["load_average"]})
        models, per_super = score_rows(probs, self.probs["vanilla"], self.labels, self.hierarchy, None, p.bootstrap)
        for name, m in models.items():
            m.update(costs[name])
            m["flops_ratio"] = m["flops_per_image"] / p.net_flops
        self.probs.update(probs)
        self.models.update(models)
        self.per_superclass.update(per_super)
        self.network_rows += list(new)
        self._order()

    @property
    def hierarchy(self) -> Hierarchy:
        return self.probe.hierarchy

    def _order(self) -> None:
        names = self.network_rows + [n for n in self.probs if n not in self.network_rows]
        self.probs = {n: self.probs[n] for n in names}
        self.models = {n: self.models[n] for n in [*names, *(n for n in self.models if n not in names)]}
        within = [k for n in names for k in (n, f"{n}_within") if k in self.per_superclass]
        self.per_superclass = {k: self.per_superclass[k] for k in within}


def network_rows(probe: Probe, networks: Networks, dirs: dict[str, list[str]], vanilla_probs: torch.Tensor,
                 vanilla: ResNet) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any]]:
    """Test probabilities, costs and latency timers of network controls (name -> the folders of
    its members, averaged); a member that is the vanilla network is the one already evaluated."""
    inputs, device, order = probe.inputs, probe.device, probe.hierarchy.subclass_ids
    probs, costs, timers = {}, {}, {}
    for name, folders in dirs.items():
        nets = [vanilla if d == inputs.vanilla_dir else networks.get(d, order)[0] for d in folders]
        probs[name] = torch.stack([vanilla_probs if d == inputs.vanilla_dir else
                                   network_probs(n, probe.loader(probe.test_split), device)
                                   for n, d in zip(nets, folders)]).mean(0)
        flops = sum(network_flops(n, inputs.image_size, device) for n in nets)
        costs[name] = {"bytes_in_networks": sum(state_bytes(n) for n in nets) / probe.vanilla_bytes,
                       "train_images": sum(_train_images(d) for d in folders), "flops_per_image": flops,
                       "latency_ratio": None}
        # Networks of the vanilla network's architecture (vanilla_long, the ensemble's members)
        # cost what it does, each: a ratio far from their count is a measurement error.
        same = flops == len(nets) * probe.net_flops
        timers[name] = (lambda nets=nets: [_forward(n, probe.x1) for n in nets], {"near": len(nets)} if same else {})
        if name == "ensemble":
            costs[name]["members"] = len(nets)
    return probs, costs, timers


# ----------------------------------------------------------------------------- the run
def evaluate_run(inputs: EvaluationInputs, hierarchy: Hierarchy, manifest, device: torch.device, amp,
                 evaluation, log=print) -> Evaluation:
    """Calibrates routing on val, evaluates every model on test with its cost; every network and
    delta is read once (the vanilla network is the resident's same object when it is the resident)."""
    h = hierarchy
    order = h.subclass_ids
    own = inputs.has_generalist
    networks = Networks(device)
    resident, resident_spec = networks.get(inputs.resident_dir, h.superclass_ids if own else order)
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
    vanilla, vanilla_spec = networks.get(inputs.vanilla_dir, order)
    probs: dict[str, torch.Tensor] = {"vanilla": network_probs(vanilla, loader(test_split), device)}
    x1 = next(iter(loader(test_split)))[0][:64].to(device)  # one serving-sized batch for latency
    probe = Probe(inputs, h, device, loader, test_split, x1, network_flops(vanilla, inputs.image_size, device),
                   state_bytes(vanilla), evaluation.bootstrap, evaluation.latency)
    net_flops, vanilla_bytes = probe.net_flops, probe.vanilla_bytes
    # What each model's latency is timed on (all at the end, interleaved) and what its work allows:
    # model -> (one call on x1, {"near"|"at_least": ratio to vanilla, "contains": a timed part}).
    timers: dict[str, tuple[Any, dict[str, Any]]] = {"vanilla": (lambda: _forward(vanilla, x1), {})}
    costs: dict[str, dict[str, Any]] = {
        "vanilla": {"bytes_in_networks": 1.0, "train_images": _train_images(inputs.vanilla_dir),
                    "flops_per_image": net_flops, "latency_ratio": None}}
    rows = network_rows(probe, networks, inputs.baseline_dirs, probs["vanilla"], vanilla)
    for into, part in zip((probs, costs, timers), rows):
        into.update(part)

    if inputs.delta_all_dir:  # one delta over all classes, pooled with the vanilla network like the two-stage model
        delta_all = load_packed(inputs.delta_all_dir)
        all_pred = TwoStagePredictor(_own_base(vanilla, predictor, delta_all), _one_superclass(h), {0: delta_all},
                                     "vanilla", device, amp=amp, cache_bytes=1 << 30)
        p_test = _delta_all_probs(all_pred, loader(test_split))
        alpha = 0.0
        if test_split == "test":
            p_val = _delta_all_probs(all_pred, loader("val"))
            v_val = network_probs(vanilla, loader("val"), device)
            alpha = choose_alpha(p_val, v_val, val_labels)
        probs["delta_all"] = p_test
        probs["delta_all_pooled"] = pool(p_test, probs["vanilla"], alpha)
        d_bytes = delta_all.nbytes / vanilla_bytes
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
        gen_probs = network_probs(resident, loader(test_split), device)

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
    return Evaluation(
        test_split=test_split, labels=labels, probs=probs, models=models, per_superclass=per_super,
        routing={f: str(r) for f, r in chosen.items()}, serves={"model": served_name, "routing": str(served)},
        flops={"network": net_flops, "stage1": stage1_flops, "specialist_pass": one_pass},
        settings={"batch_size": evaluation.batch_size, "top": top, "amp": str(amp) if amp else None, "latency": timing},
        timings=dict(predictor.timings),
        loaded=LoadedModels(networks, (resident, resident_spec), (vanilla, vanilla_spec), deltas, router),
        network_rows=["vanilla", *inputs.baseline_dirs], probe=probe,
    )


def _own_base(vanilla: ResNet, predictor: TwoStagePredictor, delta: PackedDelta) -> ResNet:
    """The network the ``delta_all`` predictor patches: the vanilla network itself, unless it is
    the two-stage predictor's resident laid out for other delta layers (two predictors on one
    network must patch the same weights), then a copy of it in memory."""
    if vanilla is not predictor.base or set(delta.meta["layers"]) == set(predictor.layout.slots):
        return vanilla
    return copy.deepcopy(vanilla)


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
    models, per_super = score_rows(probs, probs["vanilla"], labels, h, out, bootstrap)
    true_super = torch.tensor(h.fine_to_coarse)[labels]
    models["stage1"] = {"superclass_acc": 100.0 * out.super_probs.argmax(1).eq(true_super).float().mean().item()}
    return models, per_super


def score_rows(probs: dict[str, torch.Tensor], vanilla: torch.Tensor, labels: torch.Tensor, h: Hierarchy,
               out: StageOutputs | None, bootstrap: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """:func:`score_models` for the rows in ``probs`` alone, each against the vanilla network's
    test probabilities ``vanilla`` (``out``: stage one's outputs, for two-stage rows)."""
    sev = severity_matrix(h)
    correct_vanilla = vanilla.argmax(1).eq(labels).numpy()
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


