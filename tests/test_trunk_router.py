"""The trunk router (generalist.kind=trunk_router): stage one on the vanilla network's trunk, only
the routed specialist's tail in stage two — its arithmetic, its cost, its training (trunk frozen),
and the pipeline → bundle → `supersub evaluate` round trip."""

import copy
import json

import pytest
import torch
from test_predictor import make_hierarchy, make_predictor, predict_the_old_way
from tiny import quiet, tiny

from supersub.bundle import load_bundle, write_bundle
from supersub.config import ConfigError, load_config
from supersub.cost import flops_matched_model, network_flops, two_stage_flops
from supersub.delta import DeltaConfig
from supersub.errors import BundleError
from supersub.networks import NetworkSpec
from supersub.pipeline import run_pipeline
from supersub.pipeline_config import PipelineConfig
from supersub.predictor import TwoStagePredictor
from supersub.resnet import STAGES, ModelConfig, build_model
from supersub.routing import Routing
from supersub.trunk_router import RoutedTrunk, router_spec


def routed_predictor(stages=("layer4",), width=0.5, seed=0):
    h = make_hierarchy()
    _, base, deltas = make_predictor(h, stages=stages, seed=seed)
    first = STAGES.index(stages[0])
    spec = router_spec(base, first, 32, width, h.num_superclasses)
    torch.manual_seed(seed + 1)
    router = spec.build().eval()
    return TwoStagePredictor(copy.deepcopy(base), h, deltas, "vanilla", router=router), base, deltas, router, spec


def test_stage_one_is_the_trunk_and_the_router_only():
    pred, base, _, router, _ = routed_predictor()
    x = torch.randn(5, 3, 32, 32)
    trunk, sup, fine = pred.stage1(x)
    with torch.no_grad():
        want_trunk = base.forward_stages(x, 0, pred.first_stage)
        want_sup = torch.softmax(router(want_trunk), 1)
    assert torch.equal(trunk, want_trunk) and torch.allclose(sup, want_sup)
    assert fine is None  # no resident tail ran: nothing to pool with
    # hard routing: each image's answer is its top superclass's specialist on the same trunk
    p, _ = pred.predict(x, Routing("hard"))
    top = sup.argmax(1)
    for i in range(5):
        s = int(top[i])
        spec = pred.specialist(s, trunk[i : i + 1])[0]
        members = pred.hierarchy.coarse_to_fine[s]
        inside = spec[: len(members)] / spec[: len(members)].sum()
        assert torch.allclose(p[i, members], inside, atol=1e-6)
        assert p[i].sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("stages", [("layer4",), ("layer3", "layer4")])
def test_packed_engine_with_the_router_predicts_what_decoding_the_old_way_predicts(stages):
    """Deltas held packed and decoded per routed group, behind the trunk router: hard and soft
    routing give the old engine's answers (deltas decoded per weight, applied in place) bit for bit."""
    pred, base, deltas, router, _ = routed_predictor(stages=stages)
    x = torch.randn(10, 3, 32, 32)
    for routing in (Routing("hard"), Routing("soft", 2), Routing("soft", 3, 0.6)):
        fine, sup = pred.predict(x, routing)
        want_fine, want_sup = predict_the_old_way(base, pred.hierarchy, deltas, "vanilla", x, routing, router)
        assert torch.equal(sup, want_sup) and torch.equal(fine, want_fine), routing
    assert pred.resident_bytes()["router"] == sum(t.numel() * t.element_size() for t in router.state_dict().values())


def test_hard_routing_costs_about_one_network():
    pred, base, deltas, _, _ = routed_predictor(stages=("layer4",))
    stage1, one_pass = two_stage_flops(pred, 32)
    net = network_flops(base, 32)
    assert stage1 < net  # the vanilla tail is not run in stage one
    assert (stage1 + one_pass) / net <= 1.05
    vanilla_resident = TwoStagePredictor(copy.deepcopy(base), pred.hierarchy, deltas, "vanilla")
    s1, p1 = two_stage_flops(vanilla_resident, 32)
    assert (s1 + p1) / net > 1.15  # the old stage one: a whole forward, then the tail again


def test_a_router_needs_a_trunk_and_a_vanilla_resident():
    h = make_hierarchy()
    _, base, deltas = make_predictor(h, stages=tuple(STAGES))
    with pytest.raises(ValueError, match="stem"):
        router_spec(base, 0, 32, 0.5, h.num_superclasses)
    _, gbase, gdeltas = make_predictor(h, resident="generalist", stages=("layer4",))
    router = router_spec(gbase, 4, 32, 0.5, h.num_superclasses).build()
    with pytest.raises(ValueError, match="generalist"):
        TwoStagePredictor(gbase, h, gdeltas, "generalist", router=router)
    with pytest.raises(ValueError, match="stem"):
        load_config(PipelineConfig, "jobs/configs/default.yaml", ["generalist.kind=trunk_router"])
    with pytest.raises(ConfigError):
        load_config(PipelineConfig, "jobs/configs/default.yaml", ["generalist.kind=trunk_router", "delta.stages=[layer4]",
                                                                  "generalist.router_width=-1"])


def test_training_the_router_leaves_the_trunk_untouched():
    _, base, _, _, spec = routed_predictor()
    router = spec.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = RoutedTrunk(base, router, 4).train()
    assert not base.training and router.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 3, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics alike
    assert any(p.grad is not None for p in router.parameters())


def test_bundle_round_trip_and_a_router_that_does_not_fit_is_refused(tmp_path):
    pred, base, deltas, router, spec = routed_predictor()
    h = pred.hierarchy
    write_bundle(
        tmp_path / "b", base=base, base_spec=NetworkSpec(ModelConfig(backbone="resnet10", width=0.25), h.num_subclasses, 32),
        resident="vanilla", hierarchy=h, deltas=deltas, delta_cfg=DeltaConfig(keep=0.2, bits=4, stages=["layer4"]),
        routings={"hard": "hard", "soft": "soft:2@0.9"}, serves={"model": "two_stage_hard", "routing": "hard"},
        router=(router, spec),
    )
    b = load_bundle(tmp_path / "b")
    x = torch.randn(6, 3, 32, 32)
    for r in (Routing("hard"), Routing("soft", 2, 0.9)):
        assert torch.equal(b.predictor().predict(x, r)[0], pred.predict(x, r)[0])
    assert "router.safetensors" in b.manifest["files"]
    m = json.loads((tmp_path / "b/manifest.json").read_text())
    m["router"]["num_superclasses"] = 5
    (tmp_path / "b/manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="router"):
        load_bundle(tmp_path / "b")


def test_pipeline_trains_the_router_and_evaluate_reproduces_it(tmp_path, capsys):
    from supersub.cli import main

    cfg = tiny("generalist.kind=trunk_router", "delta.stages=[layer4]", "generalist.router_optim.epochs=2",
               "generalist.router_optim.batch_size=32", "baselines.vanilla_long=false", "baselines.delta_all=false",
               "baselines.scaled_flops=true", "generalist.router_distill=0.5")
    metrics = run_pipeline(cfg, tmp_path, log=quiet)
    models = metrics["models"]
    served = models[metrics["serves"]["model"]]
    bigger = flops_matched_model(cfg.model, 9, 16, served["flops_ratio"])
    assert ("vanilla_flops" in models) == (bigger is not None)  # the FLOPs-matched bigger network, when one fits
    if bigger is not None:
        assert 1.0 < models["vanilla_flops"]["flops_ratio"] <= served["flops_ratio"] + 1e-9
    assert "two_stage_hard_pooled" not in models and "two_stage_soft_pooled" not in models  # nothing to pool with
    assert models["two_stage_hard"]["flops_ratio"] <= 1.05
    router_dir = metrics["tasks"]["router"]
    router_images = json.loads((tmp_path / router_dir / "metrics.json").read_text())["train_images"]
    assert router_images > 0
    assert models["two_stage_hard"]["train_images"] == (models["vanilla"]["train_images"] + router_images
                                                         + sum(s["train_images"] for s in metrics["specialists"]))
    b = load_bundle(tmp_path / "bundle")
    assert b.router_spec is not None and b.router_spec.first_stage == 4
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "data"),
                 "--routing", "hard+0.5"]) == 2  # no vanilla answer in stage one to pool with
    for name in ("vanilla", "two_stage_hard", "two_stage_soft", "two_stage_oracle", "stage1"):
        assert result["models"][name].get("top1") == models[name].get("top1"), name
        assert result["models"][name]["superclass_acc"] == models[name]["superclass_acc"], name


def test_serving_refuses_pooling_without_the_vanilla_answer():
    from serve.app import check_routing

    assert check_routing(Routing.parse("soft:2@0.7"), 3, "trunk_router") is not None
    with pytest.raises(ValueError, match="trunk_router"):
        check_routing(Routing.parse("hard+0.5"), 3, "trunk_router")


def test_the_flops_matched_network_is_the_biggest_that_fits():
    m = ModelConfig(backbone="resnet10", width=0.125)
    assert flops_matched_model(m, 9, 16, 1.0) is None  # nothing bigger costs no more than the network itself
    base = network_flops(build_model(m, 9, 16), 16)
    for ratio in (1.5, 2.5):
        f = network_flops(build_model(flops_matched_model(m, 9, 16, ratio), 9, 16), 16)
        assert base < f <= ratio * base


def test_finetuning_trunk_and_router_together_trains_both():
    from supersub.trunk_router import MultitaskTrunk

    _, base, _, _, spec = routed_predictor()
    router = spec.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = MultitaskTrunk(base, router, 4).train()
    logits = model(torch.randn(8, 3, 32, 32))
    assert logits.shape[1] == base.fc.out_features and model.router_logits.shape == (8, spec.num_superclasses)
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, logits.shape[1], (8,))) + \
        torch.nn.functional.cross_entropy(model.router_logits, torch.randint(0, spec.num_superclasses, (8,)))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert not torch.equal(before["conv1.weight"], base.conv1.weight)  # the trunk learns too
    assert any(p.grad is not None for p in router.parameters())
    with pytest.raises(ConfigError, match="router_trunk=frozen"):
        load_config(PipelineConfig, "jobs/configs/default.yaml", ["generalist.kind=trunk_router", "delta.stages=[layer4]",
                                                                  "generalist.router_trunk=finetune",
                                                                  "generalist.router_distill=0.5"])


def test_pipeline_with_a_finetuned_trunk_uses_it_as_the_resident(tmp_path, capsys):
    """router_trunk=finetune: the router task's network is the specialists' resident and the
    bundle's base; its images count once for the two-stage model and go to vanilla_long's budget."""
    from supersub.cli import main
    from supersub.networks import network_hash

    cfg = tiny("generalist.kind=trunk_router", "delta.stages=[layer4]", "generalist.router_trunk=finetune",
               "generalist.router_optim.epochs=1", "generalist.router_optim.batch_size=32",
               "baselines.vanilla_long=true", "baselines.delta_all=false")
    metrics = run_pipeline(cfg, tmp_path, log=quiet)
    router_dir = tmp_path / metrics["tasks"]["router"]
    router = json.loads((router_dir / "metrics.json").read_text())
    assert router["network_val_acc"] >= 0 and router["val_acc"] >= 0
    finetuned = network_hash(router_dir)
    assert finetuned != network_hash(tmp_path / metrics["tasks"]["vanilla"])
    for s in metrics["tasks"]:
        if s.startswith("specialist_"):
            task = json.loads((tmp_path / metrics["tasks"][s] / "task.json").read_text())
            assert task["identity"]["inputs"]["resident"] == finetuned, s
    models = metrics["models"]
    spec_images = sum(s["train_images"] for s in metrics["specialists"])
    assert models["two_stage_hard"]["train_images"] == (models["vanilla"]["train_images"] + router["train_images"]
                                                         + spec_images)
    assert models["vanilla_long"]["train_images"] >= models["two_stage_hard"]["train_images"] - 32 * 20
    from supersub.networks import load_network

    base = load_bundle(tmp_path / "bundle").load_base().state_dict()
    ft = load_network(router_dir)[0].state_dict()
    assert all(torch.equal(base[k], ft[k]) for k in ft)  # the bundle serves the finetuned network
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("two_stage_hard", "two_stage_soft", "stage1"):
        assert result["models"][name].get("top1") == models[name].get("top1"), name


def joint_model(negatives=0.5):
    """A JointExperts on make_predictor's network (3 superclasses of 3), with its task."""
    from supersub.delta import set_train_mode
    from supersub.epoch import OptimConfig
    from supersub.tasks import JointTask
    from supersub.trunk_router import JointExperts

    h = make_hierarchy()
    _, base, _ = make_predictor(h, stages=("layer4",))
    cfg = DeltaConfig(keep=0.2, bits=4, stages=["layer4"])
    task = JointTask("unused", 4, 0.5, 0.01, cfg, OptimConfig(batch_size=8, lr=0.1), negatives, 10_000, None, "")
    experts = task.experts(base, h)
    router = router_spec(base, 4, 32, 0.5, h.num_superclasses).build()
    model = JointExperts(base, router, [e for e, _ in experts], 4, lambda m: set_train_mode(m, cfg),
                         trunk_lr_scale=0.1)
    return h, base, model, task


def test_joint_training_trains_trunk_router_and_experts_and_keeps_their_base():
    """router_trunk=joint: one loss trains the trunk (at its own lr), the router and every expert
    whose superclass is in the batch; the resident's tail and head, every delta's base, stay fixed."""
    from supersub.epoch import build_optimizer

    h, base, model, task = joint_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expert_before = [{k: v.clone() for k, v in e.state_dict().items()} for e in model.experts]
    model.train()
    assert base.layer1.training and not base.layer4.training  # the tail keeps the resident's statistics
    opt = build_optimizer(model, task.optim)
    peak = 0.1 * 8 / 128  # lr is given for 128 images
    assert sorted({g["lr"] for g in opt.param_groups if g["params"]}) == pytest.approx([peak * 0.1, peak])
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])  # superclasses 0 and 1 only
    loss = task.loss(model, h, 0.0)(model(x), y, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = base.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # the trunk learns
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("layer4.", "fc.")))
    assert any(p.grad is not None for p in model.router.parameters())
    changed = [any(not torch.equal(v, e.state_dict()[k]) for k, v in eb.items() if "original" not in k)
               for e, eb in zip(model.experts, expert_before)]
    # experts 0 and 1 saw their images; expert 2 only negatives (labelled "other"), if drawn
    assert changed[0] and changed[1]
    for e, eb in zip(model.experts, expert_before):  # each delta's base is the resident's tail, still
        assert all(torch.equal(v, e.state_dict()[k]) for k, v in eb.items() if "original" in k)


def test_joint_negatives_go_to_another_expert_as_other_and_follow_the_batch():
    """The draw of negatives is a function of the batch's labels and the seed (a resumed run draws
    the same), never an image's own expert, and its target is that expert's "other" output."""
    h, _, model, task = joint_model()
    seen: list[tuple[int, torch.Tensor]] = []
    model.expert = lambda s, trunk, real=model.expert: seen.append((s, trunk.shape[0])) or real(s, trunk)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 0, 0, 0, 0, 0, 0])  # all superclass 0
    loss_fn = task.loss(model, h, 0.0)
    first = loss_fn(model(x), y, x)
    counts = dict(seen)
    assert counts[0] == 8 and sum(counts.values()) == 8 + task.negatives_per_batch  # 4 negatives, elsewhere
    seen.clear()
    assert torch.equal(loss_fn(model(x), y, x), first) and dict(seen) == counts  # the same draw again


def test_joint_budget_is_in_expert_passes():
    _, _, _, task = joint_model()
    assert task.negatives_per_batch == 4 and task.steps == 10_000 // 12
    assert task.expert_passes == task.steps * 12 <= 10_000 and task.trunk_images == task.steps * 8


def test_joint_config_is_refused_where_it_cannot_run():
    base = ["generalist.kind=trunk_router", "delta.stages=[layer4]", "generalist.router_trunk=joint"]
    load_config(PipelineConfig, "jobs/configs/default.yaml", base)
    for extra, why in ((["generalist.kind=vanilla"], "trunk_router"), (["delta.mask=fisher"], "separate"),
                       (["specialist.distill=0.5"], "separate"), (["resources.num_workers=2"], "one worker")):
        with pytest.raises(ConfigError, match=why):
            load_config(PipelineConfig, "jobs/configs/default.yaml", base + extra)


def test_pipeline_with_joint_training_serves_its_experts(tmp_path, capsys):
    """router_trunk=joint: one task writes the finetuned resident, the router and every expert's
    delta; the controls get the specialists' budget; `supersub evaluate` reproduces the bundle."""
    from supersub.cli import main
    from supersub.networks import load_network, network_hash

    cfg = tiny("generalist.kind=trunk_router", "delta.stages=[layer4]", "generalist.router_trunk=joint",
               "generalist.router_optim.lr=0.02", "baselines.vanilla_long=true", "baselines.delta_all=false")
    metrics = run_pipeline(cfg, tmp_path, log=quiet)
    assert not any(name.startswith("specialist_") for name in metrics["tasks"])  # the joint task trained them
    joint_dir = tmp_path / metrics["tasks"]["joint"]
    joint = json.loads((joint_dir / "metrics.json").read_text())
    assert network_hash(joint_dir) != network_hash(tmp_path / metrics["tasks"]["vanilla"])
    assert len(metrics["specialists"]) == 3 and all(s["delta_bytes"] > 0 for s in metrics["specialists"])
    assert joint["train_images"] == joint["trunk_images"] // 32 * (32 + 16)
    models = metrics["models"]
    assert models["two_stage_hard"]["train_images"] == models["vanilla"]["train_images"] + joint["train_images"]
    assert models["vanilla_long"]["train_images"] == models["two_stage_hard"]["train_images"]
    assert models["two_stage_hard"]["flops_ratio"] <= 1.05
    b = load_bundle(tmp_path / "bundle")
    base = b.load_base().state_dict()
    assert all(torch.equal(base[k], v) for k, v in load_network(joint_dir)[0].state_dict().items())
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("two_stage_hard", "two_stage_soft", "two_stage_oracle", "stage1"):
        assert result["models"][name].get("top1") == models[name].get("top1"), name
