"""The in-process pipeline (no Ray): end to end on tiny synthetic data, resume, variants."""

import json

import pytest

from supersub.bundle import load_bundle
from supersub.config import ConfigError, load_config
from supersub.pipeline import PipelineConfig, run_pipeline

TINY = [
    "resources.runner=local",
    "tracking.enabled=false",
    "data.source=synthetic:superclasses=3,subclasses=3,per_class=40,size=16",
    "data.image_size=16",
    "data.num_workers=0",
    "model.width=0.125",
    "train.epochs=2",
    "train.batch_size=32",
    "specialist.optim.epochs=2",
    "specialist.optim.batch_size=32",
]


def tiny(*overrides):
    return load_config(PipelineConfig, "jobs/configs/default.yaml", [*TINY, *overrides])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    logs = []
    metrics = run_pipeline(tiny(), out, log=logs.append)
    return out, metrics, logs


@pytest.mark.slow
def test_pipeline_writes_bundle_metrics_config_predictions(default_run):
    out, metrics, _ = default_run
    assert (out / "config.yaml").is_file() and (out / "predictions.parquet").is_file()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["models"]["two_stage_soft"]["top1"] == metrics["models"]["two_stage_soft"]["top1"]
    for name in ("vanilla", "two_stage_hard", "two_stage_soft", "two_stage_oracle"):
        assert 0 <= metrics["models"][name]["top1"] <= 100
    bundle = load_bundle(out / "bundle")
    assert bundle.resident == "vanilla" and len(bundle.load_deltas()) == 3
    assert metrics["bytes"]["mean_specialist_ratio"] < 0.2
    # the calibrated routing is what the bundle serves with
    assert bundle.routing().k == metrics["routing"]["soft"]["k"]


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_refuses_changed_ones(default_run):
    out, metrics, _ = default_run
    logs = []
    again = run_pipeline(tiny(), out, log=logs.append)
    assert any("vanilla: done earlier, skipped" in line for line in logs)
    assert sum("done earlier, skipped" in line for line in logs) == 4  # vanilla + 3 specialists
    assert again["models"]["two_stage_soft"] == metrics["models"]["two_stage_soft"]
    with pytest.raises(ConfigError, match="other settings"):
        run_pipeline(tiny("train.epochs=3"), out, log=logs.append)


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_pipeline_numbers(default_run, capsys):
    from supersub.cli import main

    out, metrics, _ = default_run
    assert main(["evaluate", "--bundle", str(out / "bundle"), "--data", str(out / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test"
    for name in ("vanilla", "two_stage_soft", "two_stage_oracle"):
        assert result["models"][name]["top1"] == pytest.approx(metrics["models"][name]["top1"], abs=1e-6)


@pytest.mark.slow
def test_paper_generalist_and_learned_hierarchy(tmp_path):
    own = run_pipeline(tiny("generalist.kind=own", "specialist.negatives=0", "baselines.scaled=true",
                            "baselines.scaled_width=0.25"), tmp_path / "own", log=lambda s: None)
    assert "generalist" in own["models"] and "vanilla_scaled" in own["models"]
    assert load_bundle(tmp_path / "own" / "bundle").resident == "generalist"
    learned = run_pipeline(tiny("data.hierarchy=learned:2", "data.learned_from=synthetic"), tmp_path / "learned",
                           log=lambda s: None)
    assert learned["hierarchy"]["name"] == "learned:2" and len(learned["hierarchy"]["sizes"]) == 2
    assert sum(learned["hierarchy"]["sizes"]) == 9
