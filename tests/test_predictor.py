"""Two-stage predictor: routing maths, one resident network, memory independent of N."""

import copy

import pytest
import torch

from supersub.delta import DeltaConfig, add_delta, export_delta
from supersub.hierarchy import Hierarchy, Subclass, Superclass
from supersub.models import ModelConfig, build_model
from supersub.predictor import RoutingConfig, StageOutputs, TwoStagePredictor, combine


def make_hierarchy(n_super=3, base_size=3):
    return Hierarchy(
        "test",
        tuple(
            Superclass(f"S{i}", f"S{i}", tuple(Subclass(f"c{i}_{j}", f"c{i}_{j}") for j in range(base_size + i)))
            for i in range(n_super)
        ),
    )


def make_predictor(h, resident="vanilla", stages=("layer3", "layer4"), other=True, seed=0):
    torch.manual_seed(seed)
    n_out = h.num_subclasses if resident == "vanilla" else h.num_superclasses
    base = build_model(ModelConfig(backbone="resnet10", width=0.25), n_out, 32).eval()
    cfg = DeltaConfig(keep=0.2, bits=4, stages=list(stages))
    deltas = {}
    for s, sup in enumerate(h.superclasses):
        spec = copy.deepcopy(base)
        layers = add_delta(spec, cfg, torch.nn.Linear(spec.num_features, len(sup.subclasses) + int(other)))
        for d in layers:
            d.delta.data.normal_(0, 0.05)
        deltas[s] = export_delta(spec, cfg, s)
    return TwoStagePredictor(copy.deepcopy(base), h, deltas, resident), base, deltas


@pytest.mark.parametrize("resident", ["vanilla", "generalist"])
def test_soft_routing_with_all_superclasses_is_the_full_mixture(resident):
    h = make_hierarchy()
    pred, _, _ = make_predictor(h, resident, other=False)
    x = torch.randn(6, 3, 32, 32)
    probs, sup = pred.predict(x, RoutingConfig(mode="soft", k=h.num_superclasses))
    # full mixture by hand: p(sub) = sum_s p(s) p(sub | s)
    expected = torch.zeros(6, h.num_subclasses)
    trunk, sup_ref, _ = pred.stage1(x)
    for s, members in enumerate(h.coarse_to_fine):
        expected[:, members] = sup_ref[:, s : s + 1] * pred.specialist(s, trunk)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(sup, sup_ref)


def test_hard_routing_answers_inside_the_top_superclass():
    h = make_hierarchy()
    pred, _, _ = make_predictor(h)
    x = torch.randn(8, 3, 32, 32)
    probs, sup = pred.predict(x, RoutingConfig(mode="hard"))
    coarse = torch.tensor(h.fine_to_coarse)
    assert torch.equal(coarse[probs.argmax(1)], sup.argmax(1))
    trunk, _, _ = pred.stage1(x)
    for b in range(8):
        s = int(sup[b].argmax())
        local = pred.specialist(s, trunk[b : b + 1])[0, : len(h.coarse_to_fine[s])]
        assert int(probs[b].argmax()) == h.coarse_to_fine[s][int(local.argmax())]


def test_threshold_routes_confident_images_to_one_specialist():
    h = make_hierarchy()
    pred, _, _ = make_predictor(h)
    x = torch.randn(8, 3, 32, 32)
    out = pred.run(x, 2)
    top1 = out.super_probs.max(1).values
    t = float(top1.median())
    probs = combine(out, RoutingConfig(mode="soft", k=2, threshold=t))
    hard = combine(out, RoutingConfig(mode="hard"))
    confident = top1 >= t
    assert confident.any() and (~confident).any()
    assert torch.allclose(probs[confident], hard[confident])
    # predict() with a threshold gives the same answer as recombining a full top-2 run
    got, _ = pred.predict(x, RoutingConfig(mode="soft", k=2, threshold=t))
    assert torch.allclose(got, probs, atol=1e-6)


def test_resident_weight_pools_with_vanilla_probabilities():
    out = StageOutputs(
        super_probs=torch.tensor([[0.6, 0.4]]),
        resident_fine=torch.tensor([[0.1, 0.5, 0.3, 0.1]]),
        routes=torch.tensor([[0, 1]]),
        spec_fine=torch.tensor([[[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]]),
    )
    plain = combine(out, RoutingConfig(mode="hard"))
    assert int(plain.argmax()) == 0
    pooled = combine(out, RoutingConfig(mode="hard", resident_weight=1.0))
    assert int(pooled.argmax()) == 1  # 0.4*0.5 > 0.6*0.1
    assert pooled[0, 2:].sum() == 0  # still inside the routed superclass


def test_other_output_lowers_a_specialists_weight():
    # specialist 0 says "not mine" (80 % other) → superclass 1's answer wins the mixture
    out = StageOutputs(
        super_probs=torch.tensor([[0.55, 0.45]]),
        resident_fine=None,
        routes=torch.tensor([[0, 1]]),
        spec_fine=torch.tensor([[[0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1]]]),
    )
    assert int(combine(out, RoutingConfig(mode="soft", k=2)).argmax()) == 2


def make_flat_hierarchy(n_super, n_classes=12):
    per = n_classes // n_super
    return Hierarchy(
        "flat",
        tuple(
            Superclass(f"S{i}", f"S{i}", tuple(Subclass(f"c{i * per + j}", "c") for j in range(per)))
            for i in range(n_super)
        ),
    )


def test_predictor_memory_does_not_grow_with_the_number_of_specialists(monkeypatch):
    import gc
    import weakref

    import supersub.predictor as predictor_module

    live = weakref.WeakSet()
    most_alive = []
    real_materialize, real_applied = predictor_module.materialize, predictor_module.applied

    def tracking_materialize(packed, device):
        m = real_materialize(packed, device)
        live.add(m)
        return m

    def tracking_applied(model, delta):
        gc.collect()
        most_alive.append(len(live))
        return real_applied(model, delta)

    monkeypatch.setattr(predictor_module, "materialize", tracking_materialize)
    monkeypatch.setattr(predictor_module, "applied", tracking_applied)

    def device_bytes(pred):
        tensors = list(pred.base.parameters()) + list(pred.base.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    sizes = {}
    for n_super in (2, 6):  # same 12 subclasses, 2 or 6 specialists
        pred, _, _ = make_predictor(make_flat_hierarchy(n_super))
        pred.predict(torch.randn(32, 3, 32, 32), RoutingConfig(mode="soft", k=n_super))
        sizes[n_super] = device_bytes(pred)
        assert pred._cache == {}
    assert sizes[2] == sizes[6]  # one resident network, whatever N
    assert most_alive and max(most_alive) == 1  # one materialised delta at a time


def test_lru_cache_is_bounded_by_bytes():
    h = make_hierarchy(4)
    pred, _, _ = make_predictor(h)
    one = pred._delta(0).nbytes
    pred.cache_bytes = int(2.5 * one)
    pred.predict(torch.randn(16, 3, 32, 32), RoutingConfig(mode="soft", k=4))
    assert 1 <= len(pred._cache) <= 2


def test_missing_specialist_is_an_error():
    h = make_hierarchy()
    pred, base, deltas = make_predictor(h)
    del deltas[1]
    with pytest.raises(ValueError, match="superclass"):
        TwoStagePredictor(base, h, deltas, "vanilla")


def test_routing_parse():
    assert RoutingConfig.parse("hard").mode == "hard"
    assert RoutingConfig.parse("soft:3").k == 3
    with pytest.raises(ValueError):
        RoutingConfig.parse("soft:x")
