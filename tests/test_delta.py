"""Sparse quantised deltas: exact export round trip, requested sparsity and bits, packing."""

import copy

import numpy as np
import pytest
import torch

from supersub.delta import (
    CompactDelta,
    DeltaConfig,
    FlatLayout,
    PackedDelta,
    PruningSchedule,
    add_delta,
    applied,
    delta_layers,
    export_delta,
    materialize,
    set_train_mode,
)
from supersub.delta.packing import (
    decode_positions,
    encode_positions,
    pack_codes,
    seeded_positions,
    unpack_codes,
)
from supersub.resnet import ModelConfig, build_model


def tiny_base(num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="resnet10", width=0.25), num_classes, 32)
    for m in model.modules():  # non-trivial BN so that BN handling matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_var.data.uniform_(0.5, 2.0)
    return model.eval()


def finetune(base, cfg, steps=12, n_out=4, seed=0):
    torch.manual_seed(seed)
    spec = copy.deepcopy(base)
    deltas = add_delta(spec, cfg, torch.nn.Linear(spec.num_features, n_out))
    params = [p for p in spec.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.2)
    schedule = PruningSchedule(deltas, cfg, steps)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, n_out, (16,))
    for step in range(steps):
        set_train_mode(spec, cfg)
        loss = torch.nn.functional.cross_entropy(spec(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule(step)
    return spec, deltas, x


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("mask", ["magnitude", "random"])
@pytest.mark.parametrize("bn", ["adapt", "frozen"])
def test_export_round_trip_is_exact(bits, mask, bn):
    base = tiny_base()
    cfg = DeltaConfig(bits=bits, mask=mask, keep=0.1, bn=bn)
    spec, _, x = finetune(base, cfg)
    packed = export_delta(spec, cfg, superclass=0)
    spec.eval()
    expected = spec(x)
    restored = copy.deepcopy(base)
    before = {k: v.clone() for k, v in restored.state_dict().items()}
    with applied(restored, materialize(PackedDelta.from_bytes(packed.to_bytes()))) as head:
        got = restored.forward_head(restored.forward_stages(x), head)
    assert torch.equal(expected, got)
    # the resident network is restored bit for bit
    assert all(torch.equal(before[k], v) for k, v in restored.state_dict().items())


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("mask,keep", [("magnitude", 0.1), ("magnitude", 0.01), ("magnitude", 1.0), ("random", 0.1)])
def test_compact_delta_decodes_exactly_what_materialize_decodes(bits, mask, keep):
    """The form the predictor holds (one gap stream, one code stream, scales with per-channel
    counts, over a flat layout of the resident's weights) decodes to materialize's positions and
    values bit for bit, with positions of every layer sorted and in its own slot; and holds about
    the stored bytes (seeded and dense positions are not stored; held, they cost one byte a gap)."""
    base = tiny_base()
    cfg = DeltaConfig(bits=bits, mask=mask, keep=keep, bn="adapt", stages=["layer2", "layer3", "layer4"])
    spec, _, x = finetune(base, cfg, steps=6)
    packed = PackedDelta.from_bytes(export_delta(spec, cfg, superclass=0).to_bytes())
    resident = copy.deepcopy(base)
    expected = resident(x)
    layout = FlatLayout(resident, packed.meta["layers"])
    assert torch.equal(resident(x), expected)  # the weights moved into the buffer, not changed
    compact = CompactDelta(packed, layout, "cpu")
    decoded, reference = compact.decode(), materialize(packed)
    assert decoded.positions.dtype == torch.int64 and bool((decoded.positions.diff() > 0).all())
    assert decoded.positions.numel() == sum(p.numel() for p, _ in reference.weights.values()) == compact.nnz
    for name, (pos, values) in reference.weights.items():
        off, shape = layout.slots[name]
        inside = (decoded.positions >= off) & (decoded.positions < off + int(np.prod(shape)))
        assert torch.equal(decoded.positions[inside] - off, pos), name
        assert torch.equal(decoded.values[inside], values), name
    assert all(torch.equal(decoded.bn[n][k], reference.bn[n][k]) for n in reference.bn for k in reference.bn[n])
    assert torch.equal(decoded.head.weight, reference.head.weight) and torch.equal(decoded.head.bias, reference.head.bias)
    if keep == 0.01:
        assert compact.exc_index.numel() > 0  # gaps over a byte: the exception list is exercised
    if mask == "magnitude" and keep < 1:
        assert compact.nbytes <= packed.nbytes  # positions and codes no bigger than stored
    else:  # seeded or dense positions are not stored: held, they cost a byte a gap
        assert compact.nbytes <= packed.nbytes + compact.nnz
    # decoded into the layout's buffer: the same weights as applied() gives the network
    buf = layout.buffer
    orig = buf.index_select(0, decoded.positions)
    buf.scatter_(0, decoded.positions, orig + decoded.values)
    reference_net = copy.deepcopy(base)
    with applied(reference_net, reference):
        want = dict(reference_net.named_modules())
        for name in reference.weights:
            assert torch.equal(dict(resident.named_modules())[name].weight, want[name].weight), name
    buf.scatter_(0, decoded.positions, orig)
    assert all(torch.equal(a, b) for a, b in zip(resident.state_dict().values(), base.state_dict().values()))


def test_flat_layout_aligns_every_weight_and_refuses_unknown_modules():
    from supersub.delta.compact import ALIGN

    model = tiny_base()
    names = ["layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1"]
    layout = FlatLayout(model, names)
    modules = dict(model.named_modules())
    for name in names:
        off, shape = layout.slots[name]
        assert off % ALIGN == 0 and modules[name].weight.data_ptr() == layout.buffer[off:].data_ptr()
    assert layout.padding_bytes == 4 * (layout.numel - sum(modules[n].weight.numel() for n in names))
    with pytest.raises(ValueError, match="no module"):
        FlatLayout(tiny_base(), ["layer9.conv"])


@pytest.mark.parametrize("keep", [0.02, 0.05, 0.3])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_exported_sparsity_and_bits_are_what_was_asked(keep, bits):
    base = tiny_base()
    cfg = DeltaConfig(bits=bits, keep=keep)
    spec, _, _ = finetune(base, cfg)
    packed = export_delta(spec, cfg, superclass=1)
    md = materialize(packed)
    for name, entry in packed.meta["layers"].items():
        numel = int(np.prod(entry["shape"]))
        assert entry["nnz"] == max(1, round(keep * numel)), name
        assert entry["bits"] == bits
        codes = packed.tensors[f"w.{name}.codes"]
        assert codes.numel() == -(-entry["nnz"] * bits // 8)  # ceil: really b bits per value
        pos, values = md.weights[name]
        assert pos.numel() == entry["nnz"] and pos.unique().numel() == pos.numel()
        scales = packed.tensors[f"w.{name}.scales"]
        fan = numel // entry["shape"][0]
        q = values / scales[pos // fan]
        assert q.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
        assert torch.allclose(q, q.round(), atol=1e-4)


def test_gradual_pruning_reaches_keep_during_training():
    base = tiny_base()
    cfg = DeltaConfig(keep=0.05, prune_end=0.5, prune_updates=5)
    _, deltas, _ = finetune(base, cfg, steps=20)
    # the mask reached its final size during finetuning, before export
    for d in deltas:
        assert d.nnz == d.k_final


def test_post_pruning_keeps_dense_delta_until_export():
    base = tiny_base()
    cfg = DeltaConfig(keep=0.05, sparsify="post", qat=False)
    spec, deltas, _ = finetune(base, cfg, steps=6)
    assert all(d.nnz == d.mask.numel() for d in deltas)
    packed = export_delta(spec, cfg, 0)
    assert all(e["nnz"] == d.k_final for e, d in zip(packed.meta["layers"].values(), deltas))


def test_stages_limit_where_the_delta_goes():
    base = tiny_base()
    cfg = DeltaConfig(stages=["layer4"])
    spec, _, _ = finetune(base, cfg, steps=2)
    names = [n for n, _ in delta_layers(spec)]
    assert names and all(n.startswith("layer4.") for n in names)
    assert cfg.first_stage == 4


def test_frozen_bn_keeps_base_statistics():
    base = tiny_base()
    cfg = DeltaConfig(bn="frozen")
    spec, _, _ = finetune(base, cfg, steps=3)
    assert torch.equal(spec.layer1[0].bn1.running_mean, base.layer1[0].bn1.running_mean)
    assert "bn" not in str(list(export_delta(spec, cfg, 0).tensors))


def test_seeded_positions_are_deterministic_and_distinct():
    a = seeded_positions(10_000, 500, seed=3)
    assert np.array_equal(a, seeded_positions(10_000, 500, seed=3))
    assert not np.array_equal(a, seeded_positions(10_000, 500, seed=4))
    assert a.size == 500 and np.unique(a).size == 500 and a.min() >= 0 and a.max() < 10_000


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_code_packing_round_trip(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**bits, 1001)
    packed = pack_codes(codes, bits)
    assert packed.size == -(-1001 * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits, 1001), codes)
    with pytest.raises(ValueError):
        pack_codes(np.array([2**bits]), bits)


def test_position_varints_round_trip_and_are_compact():
    rng = np.random.default_rng(1)
    pos = np.sort(rng.choice(10**6, 50_000, replace=False))
    enc = encode_positions(pos)
    assert np.array_equal(decode_positions(enc), pos)
    assert enc.size < 1.2 * pos.size  # ~1 byte per position at 5 % density
    big_gaps = np.array([0, 200, 70_000, 10**9])
    assert np.array_equal(decode_positions(encode_positions(big_gaps)), big_gaps)
    with pytest.raises(ValueError):
        encode_positions(np.array([3, 3]))


def test_foreign_bytes_are_refused():
    from safetensors.torch import save

    data = save({"x": torch.zeros(2)}, metadata={"supersub_delta": '{"format": "other"}'})
    with pytest.raises(ValueError, match="not a supersub delta"):
        PackedDelta.from_bytes(data)


def test_config_validation():
    with pytest.raises(ValueError):
        DeltaConfig(bits=5)
    with pytest.raises(ValueError):
        DeltaConfig(keep=0)
    with pytest.raises(ValueError):
        DeltaConfig(stages=["layer9"])
    with pytest.raises(ValueError):
        DeltaConfig(mask="random", sparsify="post")


def test_fisher_mask_is_fixed_before_training_and_exported():
    from supersub.delta import choose_fisher_masks

    base = tiny_base()
    cfg = DeltaConfig(keep=0.05, mask="fisher")
    spec = copy.deepcopy(base)
    deltas = add_delta(spec, cfg, torch.nn.Linear(spec.num_features, 4))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    choose_fisher_masks(spec, deltas, [(x, y)], torch.nn.CrossEntropyLoss(), "cpu")
    masks = [d.mask.clone() for d in deltas]
    assert all(d.nnz == d.k_final and d.fixed for d in deltas)
    opt = torch.optim.SGD([p for p in spec.parameters() if p.requires_grad], lr=0.1)
    schedule = PruningSchedule(deltas, cfg, 4)
    for step in range(4):
        loss = torch.nn.functional.cross_entropy(spec(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule(step)
    assert all(torch.equal(m, d.mask) for m, d in zip(masks, deltas))  # never pruned further
    spec.eval()
    expected = spec(x)
    packed = export_delta(spec, cfg, 0)
    restored = copy.deepcopy(base)
    with applied(restored, materialize(packed)) as head:
        assert torch.equal(expected, restored.forward_head(restored.forward_stages(x), head))
