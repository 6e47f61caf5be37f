"""The in-process pipeline (no Ray): end to end on tiny synthetic data, controls and costs, task
fingerprints on reruns, the CLI reproducing metrics.json, retries and partial failure."""

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest
from tiny import ONE_EPOCH, quiet, tiny

from supersub import evaluation, pipeline
from supersub.bundle import load_bundle
from supersub.data import load_manifest
from supersub.pipeline import ensemble_size, run_pipeline
from supersub.runner import LocalRunner, TaskFailed


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny("baselines.vanilla_long=true", "baselines.delta_all=true", "baselines.ensemble=2")
    return out, cfg, run_pipeline(cfg, out, log=quiet)


@pytest.mark.slow
def test_pipeline_writes_bundle_metrics_config_predictions(default_run):
    out, _, metrics = default_run
    assert (out / "config.yaml").is_file() and (out / "predictions.parquet").is_file()
    assert json.loads((out / "metrics.json").read_text())["models"] == metrics["models"]
    bundle = load_bundle(out / "bundle")
    assert bundle.resident == "vanilla" and len(bundle.load_deltas()) == 3
    assert {k: str(v) for k, v in bundle.routings.items()} == metrics["routing"]
    assert str(bundle.routing()) == metrics["serves"]["routing"]
    assert metrics["bytes"]["mean_specialist_ratio"] < 0.2


@pytest.mark.slow
def test_every_model_comes_with_its_cost_and_the_controls_are_equal_cost(default_run):
    _, _, metrics = default_run
    models = metrics["models"]
    for name in ("vanilla", "vanilla_long", "delta_all", "delta_all_pooled", "ensemble", "two_stage_hard",
                 "two_stage_soft", "two_stage_hard_pooled", "two_stage_soft_pooled", "two_stage_oracle"):
        m = models[name]
        assert 0 <= m["top1"] <= 100, name
        for key in ("bytes_in_networks", "train_images", "flops_per_image"):
            assert m[key] > 0, (name, key)
    vanilla = models["vanilla"]
    assert vanilla["bytes_in_networks"] == 1.0 and vanilla["flops_ratio"] == 1.0
    # equal training images: vanilla_long and delta_all against the two-stage model (to one batch)
    two = models["two_stage_hard"]
    assert abs(models["vanilla_long"]["train_images"] - two["train_images"]) < 32
    assert abs(models["delta_all"]["train_images"] - two["train_images"]) < 32
    assert two["train_images"] == vanilla["train_images"] + sum(s["train_images"] for s in metrics["specialists"])
    assert models["ensemble"]["members"] == 2 and models["ensemble"]["flops_ratio"] == pytest.approx(2.0)
    # FLOPs: stage one plus one pass per image (deltas on every stage: a pass is a whole network)
    assert two["flops_ratio"] == pytest.approx(1 + metrics["flops"]["specialist_pass"] / metrics["flops"]["network"])
    assert two["routing"] == "hard" and models["two_stage_soft_pooled"]["routing"] == metrics["routing"]["soft_pooled"]
    d = two["delta_vs_vanilla"]
    assert d["low"] <= d["delta"] <= d["high"]
    # the chance level of the crossing share: (C - n) / (C - 1) for superclasses of n of C classes
    assert vanilla["crossing_error_chance"] == pytest.approx(100 * 6 / 8)
    # latency: interleaved rounds; a ratio the work rules out is no result (None, with the reason)
    assert metrics["latency"]["rounds"] == 7 and len(metrics["latency"]["load_average"]) == 2
    for name in ("vanilla_long", "ensemble", "delta_all_pooled", "two_stage_hard", "two_stage_soft_pooled"):
        lat = models[name]["latency"]
        assert (models[name]["latency_ratio"] is None) == (not lat["reliable"]) == (name in metrics["latency"]["unreliable"])
    for name in ("two_stage_hard", "two_stage_soft", "delta_all_pooled"):  # they run the vanilla forward and more
        assert models[name]["latency_ratio"] is None or models[name]["latency_ratio"] >= 1.0, models[name]["latency"]
    long = models["vanilla_long"]["latency_ratio"]  # the same network as vanilla
    assert long is None or 0.75 <= long <= 1.25


@pytest.mark.parametrize("flops_ratio, members", [(0.9, 1), (1.23, 1), (1.9993, 2), (2.0, 2), (2.73, 2), (3.46, 3)])
def test_ensemble_gets_as_many_members_as_the_flops_pay_for(flops_ratio, members):
    assert ensemble_size(flops_ratio) == members


@pytest.mark.slow
def test_evaluate_cli_reproduces_metrics_json_exactly(default_run, capsys):
    from supersub.cli import main

    out, _, metrics = default_run
    assert main(["evaluate", "--bundle", str(out / "bundle"), "--data", str(out / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test"
    for name in ("vanilla", "two_stage_hard", "two_stage_soft", "two_stage_hard_pooled", "two_stage_soft_pooled",
                 "two_stage_oracle"):
        assert result["models"][name]["top1"] == metrics["models"][name]["top1"], name
    assert result["models"]["two_stage_soft"]["routing"] == metrics["routing"]["soft"]


@pytest.mark.slow
def test_rerun_reuses_exactly_the_unchanged_tasks(default_run):
    out, cfg, metrics = default_run
    logs = []
    again = run_pipeline(cfg, out, log=logs.append)
    reused = [line for line in logs if "reused" in line]
    assert len(reused) == 2 + 3 + 1 + 1  # vanilla + the second ensemble member, 3 specialists, delta_all, vanilla_long
    assert not any("epoch" in line for line in logs)
    timings = ("latency_ratio", "latency")
    for name, m in metrics["models"].items():  # the same numbers, but for timings
        assert {k: v for k, v in again["models"][name].items() if k not in timings} == \
            {k: v for k, v in m.items() if k not in timings}


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A run of the tiny config at one epoch: the folder a changed config is rerun on."""
    out = tmp_path_factory.mktemp("one_epoch")
    run_pipeline(tiny(*ONE_EPOCH), out, log=quiet)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("change,retrained", [
    ("data.max_train_per_class=20", "vanilla: data.manifest"),
    ("data.source=synthetic:superclasses=3,subclasses=3,per_class=30,size=16,confusion=0.1", "vanilla: data.manifest"),
    ("train.lr=0.05", "vanilla: optim.lr"),
])
def test_changed_data_or_settings_retrain_and_keep_the_old(one_epoch_run, tmp_path, change, retrained):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)  # the run before the change, trained once for every change
    logs = []
    run_pipeline(tiny(*ONE_EPOCH, change), out, log=logs.append)
    assert any(line.startswith(retrained) and "training anew" in line for line in logs), logs
    # the specialists start from the new vanilla network: its hash is part of their identity
    assert any(line.startswith("specialist_0:") and "inputs.resident" in line for line in logs)
    assert len(list((out / "tasks").glob("vanilla-*"))) == 2  # the earlier one stays
    if "max_train" in change:
        m = load_manifest(out / "data")
        assert m.counts()["train"] == 9 * 20


@pytest.mark.slow
def test_paper_generalist_specialists_from_vanilla_and_learned_hierarchy(tmp_path):
    own = run_pipeline(tiny(*ONE_EPOCH, "generalist.kind=own", "specialist.negatives=0", "specialist.init=vanilla",
                            "evaluation.serve=hard", "baselines.scaled=true", "baselines.scaled_width=0.25"),
                       tmp_path / "own", log=quiet)
    assert "generalist" in own["models"] and "vanilla_scaled" in own["models"]
    assert "two_stage_soft_pooled" not in own["models"]  # pooling needs a vanilla resident
    bundle = load_bundle(tmp_path / "own" / "bundle")
    assert bundle.resident == "generalist" and str(bundle.routing()) == "hard"  # serve=hard ships hard routing
    assert own["serves"] == {"model": "two_stage_hard", "routing": "hard"}
    init = json.loads((tmp_path / "own" / "tasks" / next(
        p.name for p in (tmp_path / "own" / "tasks").iterdir() if p.name.startswith("specialist_0"))
        / "task.json").read_text())
    assert init["identity"]["inputs"]["init"]  # started from the vanilla network
    logs = []
    learned = run_pipeline(tiny(*ONE_EPOCH, "data.hierarchy=learned:2", "data.learned_from=synthetic"), tmp_path / "learned", log=logs.append)
    assert learned["hierarchy"]["name"] == "learned:2" and sum(learned["hierarchy"]["sizes"]) == 9
    logs.clear()
    run_pipeline(tiny(*ONE_EPOCH, "data.hierarchy=learned:3", "data.learned_from=synthetic"), tmp_path / "learned", log=logs.append)
    assert any(line.startswith("learned_3: running") for line in logs)  # another K: learned anew
    assert any("vanilla: done earlier" in line for line in logs)  # the vanilla network is the same task


@pytest.mark.slow
def test_local_runner_retries_then_reports_the_failed_task(tmp_path):
    calls = []

    def flaky(task, epoch):
        calls.append((task.name, epoch))
        first = (task.name, epoch) == ("specialist_0", 1) and calls.count(("specialist_0", 1)) == 1
        if task.name == "specialist_1" or first:
            raise RuntimeError(f"injected failure in {task.name}")

    runner = LocalRunner("cpu", retries=1, log=quiet, epoch_hook=flaky)
    with pytest.raises(TaskFailed) as e:
        run_pipeline(tiny(), tmp_path / "run", runner=runner, log=quiet)
    assert list(e.value.failures) == ["specialist_1"] and "specialist_1 failed" in e.value.first_line
    tasks = tmp_path / "run" / "tasks"
    done = {p.name.split("-")[0] for p in tasks.iterdir() if (p / "metrics.json").is_file()}
    # the others finished and were saved (the default config's controls too)
    assert done == {"vanilla", "specialist_0", "specialist_2", "delta_all", "vanilla_long"}
    # failed once after epoch 1 (checkpointed), retried from there
    assert calls.count(("specialist_0", 1)) == 1 and ("specialist_0", 2) in calls
    # a rerun retries only what failed
    logs = []
    run_pipeline(tiny(), tmp_path / "run", log=logs.append)
    assert [line.split(":")[0] for line in logs if ": running in" in line] == ["specialist_1"]
    assert any("specialist_1: resumed after epoch 2" in line for line in logs)  # from its checkpoint


@pytest.mark.slow
def test_a_manifest_built_by_the_cli_is_used_as_is(tmp_path):
    from supersub.cli import main

    data = tmp_path / "built"
    assert main(["data", "build", "--source", "synthetic:superclasses=3,subclasses=3,per_class=40,size=16",
                 "--hierarchy", "synthetic", "--out", str(data)]) == 0
    metrics = run_pipeline(tiny(f"data.manifest={data}", "data.source=/nonexistent"), tmp_path / "run", log=quiet)
    assert metrics["manifest_dir"] == str(data.resolve()) and not (tmp_path / "run" / "data").exists()
    assert metrics["manifest_fingerprint"] == load_manifest(data).fingerprint


@pytest.mark.slow
def test_evaluate_on_a_manifest_of_another_hierarchy_says_how_they_differ(default_run, tmp_path, capsys):
    from supersub.cli import main
    from supersub.data import build_manifest

    out, _, _ = default_run
    other = tmp_path / "other"
    build_manifest("synthetic:superclasses=2,subclasses=3,per_class=10,size=16", "synthetic", other, progress=False)
    assert main(["evaluate", "--bundle", str(out / "bundle"), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another hierarchy than the bundle's" in err and "not the bundle's 'synthetic" not in err


@pytest.mark.slow
def test_a_run_opens_and_hashes_its_manifest_once(tmp_path, monkeypatch):
    """The driver opens the manifest once and carries it; its sha256 is read once a process, by
    the driver and the in-process tasks alike (tasks on workers open their own)."""
    opened, hashed = [], []
    load = pipeline.load_manifest
    monkeypatch.setattr(pipeline, "load_manifest", lambda path: opened.append(path) or load(path))
    real_open = builtins.open

    def spying_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "manifest.parquet" and "r" in mode:
            hashed.append(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    run_pipeline(tiny("train.epochs=1", "specialist.optim.epochs=1", "evaluation.latency=false",
                      "baselines.delta_all=true", "baselines.vanilla_long=true"), tmp_path / "run", log=quiet)
    assert len(opened) == 1 and len(hashed) == 1, (opened, hashed)


@pytest.mark.slow
def test_late_controls_evaluate_their_own_rows_and_every_network_is_read_once(tmp_path, monkeypatch):
    """The FLOPs-matched controls (an ensemble, a bigger network), trained after the evaluation,
    add their rows to it: stage one and the specialists run once a split, the bundle and the
    predictions are written once, and every network and delta is read from its folder once (the
    ensemble's first member is the vanilla network, a generalist's bundle carries that same one)."""
    counts: dict[str, list] = {"collect": [], "predictions": [], "bundle": [], "network": [], "delta": []}

    def spy(module, name, key):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: counts[key].append(a[0]) or real(*a, **k))

    spy(evaluation, "collect", "collect")
    spy(evaluation, "load_network", "network")
    spy(evaluation, "load_packed", "delta")
    spy(pipeline, "save_predictions", "predictions")
    spy(pipeline, "write_bundle", "bundle")
    cfg = tiny(*ONE_EPOCH, "evaluation.latency=true", "generalist.kind=own", "baselines.ensemble=auto",
               "baselines.scaled_flops=true", "baselines.delta_all=true", "baselines.vanilla_long=true")
    metrics = run_pipeline(cfg, tmp_path / "run", log=quiet)
    late = [name for name in ("ensemble", "vanilla_flops") if name in metrics["models"]]
    assert "ensemble" in late and metrics["models"]["ensemble"]["members"] >= 2
    assert len(counts["collect"]) == 2  # val, then test: once
    assert len(counts["predictions"]) == len(counts["bundle"]) == 1
    for key in ("network", "delta"):
        folders = [str(f) for f in counts[key]]
        assert len(folders) == len(set(folders)), (key, folders)
    # the late rows sit beside the other network controls, and were timed in their own rounds
    names = list(metrics["models"])
    assert names[:3 + len(late)] == ["vanilla", "vanilla_long", *late, "delta_all"]
    assert [r["models"] for r in metrics["latency"]["own_rounds"]] == [late]
    assert all(metrics["models"][name]["latency"]["rounds"] == 7 for name in late)
    assert load_bundle(tmp_path / "run" / "bundle").load_vanilla() is not None


def test_a_tuned_run_links_the_tasks_its_source_run_finished(tmp_path):
    """``reuse_from`` (jobs.pipeline --reuse-from, or the run a tune/best.yaml came from): a task
    that finished there with the same fingerprint is hard-linked in, not trained; the tasks a
    tuned setting changes train; a damaged source task and a folder of the run itself are left."""
    src = tmp_path / "default"
    run_pipeline(tiny(*ONE_EPOCH), src, log=quiet)
    logs = []
    run_pipeline(tiny(*ONE_EPOCH, "delta.bits=2"), tmp_path / "tuned", log=logs.append, reuse_from=[src])
    assert [line.split(":")[0] for line in logs if "reused (linked" in line] == ["vanilla", "vanilla_long"]
    assert {line.split(" ")[0] for line in logs if " epoch " in line} == {"specialist_0", "specialist_1", "specialist_2",
                                                                         "delta_all"}  # its delta is quantised too
    vanilla = next((tmp_path / "tuned" / "tasks").glob("vanilla-*"))
    twin = src / "tasks" / vanilla.name
    assert (vanilla / "model.safetensors").stat().st_ino == (twin / "model.safetensors").stat().st_ino
    assert not list(vanilla.glob("*.lock")) and not list(vanilla.parent.glob("*.tmp*"))
    # A damaged source (its weights are not what it recorded) is trained anew, not linked.
    (twin / "model.safetensors").unlink()
    (twin / "model.safetensors").write_bytes(b"not the weights")
    logs.clear()
    run_pipeline(tiny(*ONE_EPOCH, "delta.bits=8"), tmp_path / "other", log=logs.append, reuse_from=[src])
    assert [line.split(":")[0] for line in logs if "reused (linked" in line] == ["vanilla_long"]
    assert any(line.startswith("vanilla epoch") for line in logs)
