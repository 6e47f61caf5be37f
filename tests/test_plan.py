"""``python -m jobs.pipeline --plan``: the images it plans are the images a run reads; an
unreachable ImageNet source is counted from the hierarchy and ILSVRC-2012's size; GPU workers
planned without a GPU are billed at a file's or the reference table's GPU rate, never this CPU's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import ONE_EPOCH, tiny

from supersub import plan as plan_module
from supersub.config import ConfigError, load_config
from supersub.pipeline import run_pipeline
from supersub.pipeline_config import PipelineConfig
from supersub.plan import format_plan, make_plan
from supersub.reference_throughput import REFERENCE_DECODE_PER_CPU
from supersub.runner import LocalRunner

CONTROLS = ["baselines.vanilla_long=true", "baselines.delta_all=true"]


def rates(tmp_path: Path) -> Path:
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"train_images_per_s": 1000.0, "decode_images_per_s_per_cpu": 100.0, "device": "test"}))
    return path


class RecordingRunner(LocalRunner):
    """The local runner, keeping the tasks of each call: the run's stages as it ran them."""

    def __init__(self) -> None:
        super().__init__("cpu", log=lambda _: None)
        self.calls: list[list] = []

    def run(self, tasks, resources=None):
        self.calls.append(list(tasks))
        return super().run(tasks, resources)


TRUNK_ROUTER = ["generalist.kind=trunk_router", "delta.stages=[layer4]"]
SETTINGS = {  # every generalist.kind, and for the trunk router every router_trunk
    "vanilla": [],
    "own": ["generalist.kind=own"],
    "trunk_router-frozen": TRUNK_ROUTER,
    "trunk_router-finetune": [*TRUNK_ROUTER, "generalist.router_trunk=finetune"],
    "trunk_router-joint": [*TRUNK_ROUTER, "generalist.router_trunk=joint", "baselines.delta_all=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("extra", list(SETTINGS.values()), ids=list(SETTINGS))
def test_the_plan_is_the_tasks_a_tiny_run_trains(tmp_path: Path, extra: list[str]) -> None:
    """Stage by stage, the plan's tasks are the tasks the run hands its runner: names, kinds and
    training images."""
    cfg = tiny(*CONTROLS, *ONE_EPOCH, *extra)
    out = tmp_path / "run"
    plan = make_plan(cfg, out, rates(tmp_path), log=lambda _: None)  # builds out/data, which the run reuses
    assert "counts from the manifest built from synthetic" in plan["counts_from"]
    runner = RecordingRunner()
    run_pipeline(cfg, out, runner=runner, log=lambda _: None)
    planned: dict[str, list] = {}
    for t in plan["tasks"]:
        planned.setdefault(t["stage"], []).append((t["name"], t["kind"], t["train_images"]))
    trained = [[(t.name, t.kind, t.result()["train_images"]) for t in call] for call in runner.calls]
    assert list(planned.values()) == trained
    stages = ["base networks", *(["finetuned trunk"] if "generalist.router_trunk=finetune" in extra else []),
              "specialists and controls"]
    assert list(planned) == stages
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


# ----------------------------------------------------------------------------- where the rates come from
A100_RESNET50_AMP = 2470.0  # the table's A100 figure (NVIDIA DeepLearningExamples), ResNet-50 @ 224, AMP
FULL_WIDTH = ["model.width=1"]  # the table's own network: no scaling


def no_measuring(*args, **kwargs):
    raise AssertionError("measured on this machine")


@pytest.fixture
def cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a GPU that fails the test if the plan measures anything on it."""
    monkeypatch.setattr(plan_module, "gpu_here", lambda cfg: False)
    monkeypatch.setattr(plan_module, "measure_train_rate", no_measuring)
    monkeypatch.setattr(plan_module, "measure_decode_rate", no_measuring)


def paper10(extra: list[str] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, "jobs/configs/imagenet_paper10.yaml", list(extra))


def test_gpu_config_on_a_cpu_machine_is_billed_at_the_table(cpu_machine: None) -> None:
    plan = make_plan(paper10(FULL_WIDTH), None, log=lambda _: None)
    rates = plan["rates"]
    assert rates["train_from"] == "table" and rates["gpu"] == "A100"
    assert rates["train_images_per_s_per_worker"] == A100_RESNET50_AMP
    assert rates["decode_images_per_s_per_cpu"] == REFERENCE_DECODE_PER_CPU
    # 8 workers, 1 GPU and 8 CPUs each: GPU-bound (8 × 565 decoded/s > 2,470), validation decode-bound.
    vanilla = next(t for t in plan["tasks"] if t["name"] == "vanilla")
    expected = (vanilla["train_images"] / (8 * A100_RESNET50_AMP)
                + vanilla["val_images"] / (8 * 8 * REFERENCE_DECODE_PER_CPU)) / 3600
    assert vanilla["hours"] == pytest.approx(expected) and vanilla["gpu_hours"] == pytest.approx(8 * expected)
    text = format_plan(plan)
    line = next(row for row in text.splitlines() if row.startswith("training rate:"))
    assert "this machine has no GPU" in line and "reference table, GPU A100" in line
    assert "github.com/NVIDIA/DeepLearningExamples" in line and "GPU-h" in text


def test_shipped_imagenet_config_stays_within_3x_of_the_table(cpu_machine: None) -> None:
    plan = make_plan(paper10(), None, log=lambda _: None)
    # the paper's ResNet-50 at full width: the table's own entry, not scaled
    assert plan["rates"]["train_from"] == "table" and plan["rates"]["train_images_per_s_per_worker"] == A100_RESNET50_AMP
    # A task's GPU-hours at the table's rate: its images / 2,470 (a half GPU trains at half the rate for half the GPU).
    table_hours = sum(t["train_images"] for t in plan["tasks"]) / A100_RESNET50_AMP / 3600
    assert table_hours / 3 <= plan["totals"]["gpu_hours"] <= table_hours * 3


def test_plan_gpu_picks_the_kind_even_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "gpu_here", lambda cfg: True)
    monkeypatch.setattr(plan_module, "measure_train_rate", no_measuring)
    monkeypatch.setattr(plan_module, "measure_decode_rate", no_measuring)
    plan = make_plan(paper10(FULL_WIDTH), None, log=lambda _: None, gpu="h100")
    assert plan["rates"]["gpu"] == "H100" and plan["rates"]["train_images_per_s_per_worker"] > A100_RESNET50_AMP
    assert "derived" in plan["rates"]["source"]["train"]  # no public H100 figure of this exact kind


def test_a_gpu_machine_measures_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "gpu_here", lambda cfg: True)
    monkeypatch.setattr(plan_module, "measure_train_rate", lambda cfg, n: (3000.0, "resnet50 on cuda"))
    monkeypatch.setattr(plan_module, "measure_decode_rate", lambda size: 400.0)
    plan = make_plan(paper10(FULL_WIDTH), None, log=lambda _: None)
    assert plan["rates"]["train_from"] == "measured" and plan["rates"]["train_images_per_s_per_worker"] == 3000.0


def test_a_throughput_file_wins_over_the_table(tmp_path: Path, cpu_machine: None) -> None:
    plan = make_plan(paper10(FULL_WIDTH), None, rates(tmp_path), log=lambda _: None, gpu="H100")
    assert plan["rates"]["train_from"] == "file" and plan["rates"]["train_images_per_s_per_worker"] == 1000.0
    assert plan["rates"]["decode_images_per_s_per_cpu"] == 100.0
    decode_only = tmp_path / "decode.json"
    decode_only.write_text(json.dumps({"decode_images_per_s_per_cpu": 300.0}))
    plan = make_plan(paper10(FULL_WIDTH), None, decode_only, log=lambda _: None)
    assert plan["rates"]["train_from"] == "table" and plan["rates"]["decode_images_per_s_per_cpu"] == 300.0


def test_a_cpu_measured_file_does_not_bill_gpus(tmp_path: Path, cpu_machine: None) -> None:
    cpu = tmp_path / "train.json"  # benchmarks/train_throughput.py run on a CPU
    cpu.write_text(json.dumps({"device": "cpu", "auto_chooses": "fp32 channels_last",
                               "images_per_s": {"fp32 channels_last": {"network": 72.0}}}))
    with pytest.raises(ConfigError, match="measured on a CPU"):
        make_plan(paper10(FULL_WIDTH), None, cpu, log=lambda _: None)


def test_unknown_gpu_kind_is_one_line(capsys: pytest.CaptureFixture, cpu_machine: None) -> None:
    from jobs.pipeline import main

    assert main(["--config", "jobs/configs/imagenet_paper10.yaml", "--plan", "--plan-gpu", "B300"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "B300" in err and "A100, H100, V100" in err


def test_cpu_config_is_measured_here_in_cpu_hours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "gpu_here", lambda cfg: False)
    monkeypatch.setattr(plan_module, "measure_train_rate", lambda cfg, n: (50.0, "resnet10 on cpu"))
    monkeypatch.setattr(plan_module, "measure_decode_rate", lambda size: 400.0)
    cfg = paper10(FULL_WIDTH + ["resources.gpus_per_worker=0", "resources.specialist_gpus=0"])
    plan = make_plan(cfg, None, log=lambda _: None)
    assert plan["rates"]["train_from"] == "measured" and plan["totals"]["gpu_hours"] == 0
    text = format_plan(plan)
    assert "CPU-h" in text and "GPU-h " not in text and "measured here" in text
    with pytest.raises(ConfigError, match="take no GPU"):
        make_plan(cfg, None, log=lambda _: None, gpu="A100")
