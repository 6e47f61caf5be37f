"""``python -m jobs.pipeline --plan``: the images it plans are the images a run reads; an
unreachable ImageNet source is counted from the hierarchy and ILSVRC-2012's size (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supersub.config import load_config
from supersub.pipeline import run_pipeline
from supersub.pipeline_config import PipelineConfig
from supersub.plan import format_plan, make_plan

TINY = [
    "resources.runner=local",
    "tracking.enabled=false",
    "report=false",
    "data.source=synthetic:superclasses=3,subclasses=3,per_class=40,size=16,confusion=0.1",
    "data.image_size=16",
    "data.num_workers=0",
    "model.width=0.125",
    "train.epochs=2",
    "train.batch_size=32",
    "specialist.optim.epochs=2",
    "specialist.optim.batch_size=32",
    "evaluation.bootstrap=50",
    "baselines.vanilla_long=true",
    "baselines.delta_all=true",
]


def rates(tmp_path: Path) -> Path:
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"train_images_per_s": 1000.0, "decode_images_per_s_per_cpu": 100.0, "device": "test"}))
    return path


JOINT = ["generalist.kind=trunk_router", "delta.stages=[layer4]", "generalist.router_trunk=joint", "baselines.delta_all=false"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], JOINT], ids=["separate", "joint"])
def test_planned_images_are_what_a_tiny_run_trains_on(tmp_path: Path, extra: list[str]) -> None:
    cfg = load_config(PipelineConfig, "jobs/configs/default.yaml", TINY + extra)
    out = tmp_path / "run"
    plan = make_plan(cfg, out, rates(tmp_path), log=lambda _: None)  # builds out/data, which the run reuses
    assert "counts from the manifest built from synthetic" in plan["counts_from"]
    metrics = run_pipeline(cfg, out, log=lambda _: None)
    planned = {t["name"]: t for t in plan["tasks"]}
    trained = {name: json.loads((Path(d) / "metrics.json").read_text()) for name, d in metrics["tasks"].items()}
    assert set(planned) == set(trained)  # every task the run trained, and no other
    for name, t in planned.items():
        assert t["train_images"] == trained[name]["train_images"], name
    assert {t["stage"] for t in plan["tasks"]} == {"base networks", "specialists and controls"}
    # No GPUs in this config: CPU-hours only, and the time follows the given rates.
    assert plan["totals"]["gpu_hours"] == 0 and plan["totals"]["cpu_hours"] > 0
    assert "vanilla_long" in format_plan(plan)


def test_unreachable_imagenet_is_counted_from_the_hierarchy(tmp_path: Path) -> None:
    cfg = load_config(PipelineConfig, "jobs/configs/imagenet_paper10.yaml", [])
    plan = make_plan(cfg, None, rates(tmp_path), log=lambda _: None)
    assert "not reachable" in plan["counts_from"] and "1,281,167" in plan["counts_from"]
    per_class = 1281 - round(1281 * cfg.data.val_fraction)
    assert plan["counts"] == {"train": 277 * per_class, "val": 277 * (1281 - per_class), "test": 277 * 50}
    vanilla = next(t for t in plan["tasks"] if t["name"] == "vanilla")
    assert vanilla["train_images"] == cfg.train.epochs * (277 * per_class // cfg.train.batch_size) * cfg.train.batch_size
    assert vanilla["workers"] == 8 and vanilla["gpus"] == 1.0
    specialists = [t for t in plan["tasks"] if t["name"].startswith("specialist_")]
    assert len(specialists) == 10 and all(t["gpus"] == 0.5 for t in specialists)
    # 1,000 images/s a GPU, 100 a CPU × 8 CPUs: decode-bound at 800 images/s a worker.
    assert vanilla["hours"] == pytest.approx((vanilla["train_images"] / 6400 + vanilla["val_images"] / 6400) / 3600)
    assert plan["totals"]["gpu_hours"] == pytest.approx(sum(t["gpu_hours"] for t in plan["tasks"]))


def test_plan_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.pipeline import main

    assert main(["--config", "jobs/configs/imagenet_paper10.yaml", "--plan", "--plan-throughput",
                 str(rates(tmp_path)), "--plan-json", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "GPU-hours" in text and "specialist_9" in text
    assert json.loads((tmp_path / "plan.json").read_text())["totals"]["gpu_hours"] > 0
    assert main(["--config", "jobs/configs/imagenet_paper10.yaml", "--plan", "--plan-throughput",
                 str(tmp_path / "missing.json")]) == 2


def test_rates_from_the_benchmarks_json(tmp_path: Path) -> None:
    data = tmp_path / "data.json"  # benchmarks/data_throughput.py --json (the part the plan reads)
    data.write_text(json.dumps({"cpu": {"tensor/1proc": {"per_core": {"median": 300.0}}}}))
    train = tmp_path / "train.json"  # benchmarks/train_throughput.py --json
    train.write_text(json.dumps({"device": "NVIDIA H100", "auto_chooses": "bf16 channels_last",
                                 "images_per_s": {"bf16 channels_last": {"network": 2500.0, "specialist": 2000.0},
                                                  "fp32 contiguous": {"network": 900.0, "specialist": 800.0}}}))
    cfg = load_config(PipelineConfig, "jobs/configs/imagenet_paper10.yaml", [])
    plan = make_plan(cfg, None, [data, train], log=lambda _: None)
    assert plan["rates"]["decode_images_per_s_per_cpu"] == 300.0
    assert plan["rates"]["train_images_per_s_per_worker"] == 2500.0
