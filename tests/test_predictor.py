"""Two-stage predictor: routing maths, bit-for-bit equality with the in-place delta path (deltas
held packed and decoded per group against decoding them the old way), one resident network
whatever the number of specialists, what it holds by component, the routing spelling."""

import copy
import threading

import pytest
import torch

from supersub.delta import DeltaConfig, add_delta, applied, export_delta, materialize
from supersub.hierarchy import Hierarchy, Subclass, Superclass
from supersub.metrics import superclass_probs
from supersub.predictor import TwoStagePredictor
from supersub.resnet import STAGES, ModelConfig, build_model, state_bytes
from supersub.routing import HARD, Routing, StageOutputs, assemble, combine, plan, specialist_passes


def make_hierarchy(n_super=3, base_size=3):
    return Hierarchy(
        "test",
        tuple(
            Superclass(f"S{i}", f"S{i}", tuple(Subclass(f"c{i}_{j}", f"c{i}_{j}") for j in range(base_size + i)))
            for i in range(n_super)
        ),
    )


def make_predictor(h, resident="vanilla", stages=("layer3", "layer4"), other=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    n_out = h.num_subclasses if resident == "vanilla" else h.num_superclasses
    base = build_model(ModelConfig(backbone="resnet10", width=0.25), n_out, 32).eval()
    for m in base.modules():  # non-trivial BN statistics, so that BN handling matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_var.data.uniform_(0.5, 2.0)
    cfg = DeltaConfig(keep=0.2, bits=4, stages=list(stages))
    deltas = {}
    for s, sup in enumerate(h.superclasses):
        spec = copy.deepcopy(base)
        layers = add_delta(spec, cfg, torch.nn.Linear(spec.num_features, len(sup.subclasses) + int(other)))
        for d in layers:
            d.delta.data.normal_(0, 0.05)
        deltas[s] = export_delta(spec, cfg, s)
    return TwoStagePredictor(copy.deepcopy(base), h, deltas, resident, **kwargs), base, deltas


@pytest.mark.parametrize("stages", [("layer4",), ("layer3", "layer4"), tuple(STAGES)])
def test_specialist_equals_the_in_place_path_bit_for_bit(stages):
    """The predictor computes a specialist's weights beside the resident's; the reference puts the
    delta onto the network in place (supersub.delta.applied) and runs its own forward."""
    h = make_hierarchy()
    pred, base, deltas = make_predictor(h, stages=stages)
    x = torch.randn(7, 3, 32, 32)
    trunk, _, _ = pred.stage1(x)
    reference = copy.deepcopy(base)
    for s in range(h.num_superclasses):
        got = pred.specialist(s, trunk)
        with torch.no_grad(), applied(reference, materialize(deltas[s])) as head:
            h_ref = reference.forward_stages(trunk, pred.first_stage, len(STAGES))
            want = torch.softmax(reference.forward_head(h_ref, head), 1)
        assert torch.equal(got, want), s
    # the resident network was never changed
    for a, b in zip(pred.base.state_dict().values(), base.state_dict().values()):
        assert torch.equal(a, b)


@torch.no_grad()
def predict_the_old_way(base, h, deltas, resident, x, routing, router=None):
    """The reference two-stage prediction: each routed group's delta decoded per weight
    (``materialize``: int64 positions + fp32 values) and put onto a copy of the resident network
    in place (``applied``), stage one by the network's (or the router's) own forward."""
    net = copy.deepcopy(base).eval()
    first = min(int(d.meta["first_stage"]) for d in deltas.values())
    trunk = net.forward_stages(x, 0, first)
    fine = None
    if router is not None:
        sup = torch.softmax(router(trunk).float(), 1)
    else:
        probs = torch.softmax(net.forward_head(net.forward_stages(trunk, first, len(STAGES))).float(), 1)
        sup, fine = (superclass_probs(probs, h), probs) if resident == "vanilla" else (probs, None)
    p = plan(sup, routing)
    answers = {}
    for s, (b, _) in p.calls.items():
        with applied(net, materialize(deltas[s])) as head:
            answers[s] = torch.softmax(net.forward_head(net.forward_stages(trunk[b], first, len(STAGES)), head).float(), 1)
    out = assemble(h, sup, fine, p, answers)
    return combine(out, routing), out.super_probs


@pytest.mark.parametrize("resident,stages", [("vanilla", ("layer4",)), ("vanilla", tuple(STAGES)),
                                             ("generalist", ("layer3", "layer4"))])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_packed_engine_predicts_what_decoding_the_old_way_predicts(resident, stages, cache_bytes):
    """Deltas held packed and decoded per routed group (cache off, the serving default) or kept
    decoded: hard, soft and thresholded soft routing give the old engine's answers bit for bit."""
    h = make_hierarchy(4)
    pred, base, deltas = make_predictor(h, resident, stages=stages, cache_bytes=cache_bytes)
    x = torch.randn(12, 3, 32, 32)
    for routing in (HARD, Routing("soft", 2), Routing("soft", 3, 0.5), Routing("soft", 4)):
        for _ in range(2):  # the second time from the cache, when there is one
            fine, sup = pred.predict(x, routing)
            want_fine, want_sup = predict_the_old_way(base, h, deltas, resident, x, routing)
            assert torch.equal(sup, want_sup) and torch.equal(fine, want_fine), routing
    assert all(torch.equal(a, b) for a, b in zip(pred.base.state_dict().values(), base.state_dict().values()))


def test_predictors_on_one_network_share_its_flat_buffer_or_refuse_to_run():
    """Two predictors built on the same network object (evaluation-style reuse) patch the same
    buffer, as they patched the same weights before; a network laid out again for other delta
    layers is refused at the next group, never run without its delta."""
    h = make_hierarchy()
    _, base, deltas = make_predictor(h, stages=("layer4",))
    shared = copy.deepcopy(base)
    a = TwoStagePredictor(shared, h, deltas, "vanilla")
    b = TwoStagePredictor(shared, h, deltas, "vanilla")
    assert a.layout.buffer.data_ptr() == b.layout.buffer.data_ptr()
    x = torch.randn(9, 3, 32, 32)
    want = predict_the_old_way(base, h, deltas, "vanilla", x, Routing("soft", 2))[0]
    assert torch.equal(a.predict(x, Routing("soft", 2))[0], want) and torch.equal(b.predict(x, Routing("soft", 2))[0], want)
    _, _, other = make_predictor(h, stages=("layer3", "layer4"))
    TwoStagePredictor(shared, h, other, "vanilla")
    with pytest.raises(RuntimeError, match="flat buffer"):
        a.predict(x, HARD)


def test_resident_bytes_are_the_network_and_about_the_stored_deltas():
    h = make_hierarchy(4)
    pred, base, deltas = make_predictor(h, stages=("layer3", "layer4"))
    pred.predict(torch.randn(16, 3, 32, 32), Routing("soft", 4))
    held = pred.resident_bytes()
    assert set(held) == {"network", "router", "deltas", "decoded_cache", "decode_working_set"}
    assert held["network"] == state_bytes(base) + pred.layout.padding_bytes
    assert pred.layout.padding_bytes < 0.01 * state_bytes(base)
    assert held["router"] == 0 and held["decoded_cache"] == 0  # serving default: nothing kept decoded
    assert held["deltas"] <= sum(d.nbytes for d in deltas.values())  # no more than stored
    nnz = max(d.nnz for d in pred.deltas.values())
    assert held["decode_working_set"] == 16 * nnz  # int64 positions, fp32 values, saved fp32 entries
    kept, _, _ = make_predictor(h, stages=("layer3", "layer4"), cache_bytes=1 << 30)
    kept.predict(torch.randn(16, 3, 32, 32), Routing("soft", 4))
    assert kept.resident_bytes()["decoded_cache"] == sum(12 * d.nnz for d in kept.deltas.values())


def test_concurrent_predictions_equal_serial_ones():
    """Nothing is applied in place, so threads may share one predictor (Serve's batches)."""
    h = make_hierarchy(4)
    pred, _, _ = make_predictor(h)
    xs = [torch.randn(5, 3, 32, 32) for _ in range(6)]
    serial = [pred.predict(x, Routing("soft", 3))[0] for x in xs]
    got = [None] * len(xs)

    def work(i):
        got[i] = pred.predict(xs[i], Routing("soft", 3))[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, serial))


@pytest.mark.parametrize("resident", ["vanilla", "generalist"])
def test_soft_routing_with_all_superclasses_is_the_full_mixture(resident):
    h = make_hierarchy()
    pred, _, _ = make_predictor(h, resident, other=False)
    x = torch.randn(6, 3, 32, 32)
    probs, sup = pred.predict(x, Routing("soft", h.num_superclasses))
    expected = torch.zeros(6, h.num_subclasses)  # p(sub) = sum_s p(s) p(sub | s), by hand
    trunk, sup_ref, _ = pred.stage1(x)
    for s, members in enumerate(h.coarse_to_fine):
        expected[:, members] = sup_ref[:, s : s + 1] * pred.specialist(s, trunk)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(sup, sup_ref)


def test_hard_routing_answers_inside_the_top_superclass():
    h = make_hierarchy()
    pred, _, _ = make_predictor(h)
    x = torch.randn(8, 3, 32, 32)
    probs, sup = pred.predict(x, HARD)
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
    routing = Routing("soft", 2, t)
    probs, hard = combine(out, routing), combine(out, HARD)
    confident = top1 >= t
    assert confident.any() and (~confident).any()
    assert torch.allclose(probs[confident], hard[confident])
    # only the unsure images pay a second pass, and predict() runs exactly those
    p = plan(out.super_probs, routing)
    assert p.passes == int(confident.sum()) + 2 * int((~confident).sum())
    assert specialist_passes(out, routing) == pytest.approx(p.passes / 8)
    got, _ = pred.predict(x, routing)
    assert torch.allclose(got, probs, atol=1e-6)


def test_resident_weight_pools_with_vanilla_probabilities():
    out = StageOutputs(
        super_probs=torch.tensor([[0.6, 0.4]]),
        resident_fine=torch.tensor([[0.1, 0.5, 0.3, 0.1]]),
        routes=torch.tensor([[0, 1]]),
        spec_fine=torch.tensor([[[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]]),
    )
    assert int(combine(out, HARD).argmax()) == 0
    pooled = combine(out, Routing.parse("hard+1"))
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
    assert int(combine(out, Routing("soft", 2)).argmax()) == 2


def make_flat_hierarchy(n_super, n_classes=12):
    per = n_classes // n_super
    return Hierarchy("flat", tuple(
        Superclass(f"S{i}", f"S{i}", tuple(Subclass(f"c{i * per + j}", "c") for j in range(per))) for i in range(n_super)
    ))


def test_device_memory_is_one_network_whatever_the_number_of_specialists():
    def device_bytes(pred):
        tensors = list(pred.base.parameters()) + list(pred.base.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    for n_super in (2, 6):  # same 12 subclasses, 2 or 6 specialists
        pred, base, _ = make_predictor(make_flat_hierarchy(n_super))  # cache_bytes=0: decode on each use
        pred.predict(torch.randn(32, 3, 32, 32), Routing("soft", n_super))
        assert device_bytes(pred) == sum(t.numel() * t.element_size() for t in base.state_dict().values())
        assert pred.cached_bytes == 0 and len(pred._cache) == 0


def test_decoded_delta_cache_is_bounded_by_bytes():
    h = make_hierarchy(4)
    pred, _, _ = make_predictor(h)
    one = pred.deltas[0].decode().nbytes
    pred, _, _ = make_predictor(h, cache_bytes=int(2.5 * one))
    pred.predict(torch.randn(16, 3, 32, 32), Routing("soft", 4))
    assert 1 <= len(pred._cache) <= 2 and pred.cached_bytes <= 2.5 * one


def test_missing_specialist_is_an_error():
    h = make_hierarchy()
    pred, base, deltas = make_predictor(h)
    del deltas[1]
    with pytest.raises(ValueError, match="superclass"):
        TwoStagePredictor(base, h, deltas, "vanilla")


@pytest.mark.parametrize("text,expected", [
    ("hard", Routing("hard", 1, 1.0, 0.0)),
    ("hard+0.5", Routing("hard", 1, 1.0, 0.5)),
    ("soft", Routing("soft", 2, 1.0, 0.0)),
    ("soft:3", Routing("soft", 3, 1.0, 0.0)),
    ("soft:2@0.7", Routing("soft", 2, 0.7, 0.0)),
    ("soft:2@0.7+0.5", Routing("soft", 2, 0.7, 0.5)),
])
def test_routing_compact_form_round_trips(text, expected):
    r = Routing.parse(text)
    assert r == expected
    assert Routing.parse(str(r)) == r


@pytest.mark.parametrize("text", ["soft:x", "hard:2", "hard@0.5", "soft:0", "soft:2@1.5", "soft:2@0", "soft+inf",
                                  "soft+nan", "soft+-1", "soft:2@nan", "", "magic"])
def test_routing_compact_form_refuses_bad_values(text):
    with pytest.raises(ValueError, match="routing"):
        Routing.parse(text)


def test_calibrate_picks_the_best_on_val_and_the_cheaper_on_ties():
    from supersub.routing import calibrate

    # image 0: top-1 superclass wrong but unsure (0.55) → soft k=2 recovers it; image 1: sure and right
    out = StageOutputs(
        super_probs=torch.tensor([[0.55, 0.45], [0.95, 0.05]]),
        resident_fine=None,
        routes=torch.tensor([[0, 1], [0, 1]]),
        spec_fine=torch.tensor([[[0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1]],
                                [[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]]),
    )
    labels = torch.tensor([2, 0])
    soft = calibrate(out, labels, "soft", max_k=2)
    assert soft.k == 2 and combine(out, soft).argmax(1).tolist() == [2, 0]
    # the sure image needs no second pass: of the equally good thresholds, the cheapest is chosen
    assert soft.threshold <= 0.95 and specialist_passes(out, soft) == 1.5
    assert calibrate(out, labels, "hard", max_k=2) == HARD
