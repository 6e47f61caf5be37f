"""The orchestration layer: jobs.pipeline on Ray (one local Ray per session), MLflow tracking,
resumption, a simulated two-node cluster, failure recovery, ray job submit, and the
in-process mode without Ray or MLflow.

Everything runs the default config (jobs/configs/default.yaml) on tiny settings
(tests/ray_helpers.py: 240 synthetic 16-px images, 2 superclasses, 2 epochs, resnet10 x 0.25).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_helpers import (
    DEFAULT_CONFIG,
    ENV,
    PYTHON,
    REPO,
    TINY,
    call_with_timeout,
    copy_without_specialists,
    free_port,
    parquet_source,
    stop_cluster,
    tiny_config,
    tiny_run,
)

from jobs.pipeline import build_parser, help_config, overrides_from
from jobs.tracking import numeric
from supersub.config import dotted_keys, load_config
from supersub.data import load_manifest
from supersub.pipeline_config import PipelineConfig


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_run(tmp_path_factory.mktemp("jobs"))


# ------------------------------------------------------------------------------ fast
def test_cli_parses_overrides_and_help_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--config", "c.yaml", "--out", "o", "delta.bits=8", "seed=3"])
    assert args.overrides == ["delta.bits=8", "seed=3"]
    assert "resources.runner" in help_config() and "tracking.enabled" in help_config()
    best = tmp_path / "best.yaml"
    best.write_text("overrides:\n  delta.keep: 0.02\n  specialist.optim.lr: 0.01\ntrial: x\n")
    cfg = load_config(PipelineConfig, DEFAULT_CONFIG, overrides_from(best) + ["delta.bits=8"])
    assert (cfg.delta.keep, cfg.delta.bits, cfg.specialist.optim.lr) == (0.02, 8, 0.01)


def test_metric_flattening() -> None:
    flat = dotted_keys({"models": {"vanilla": {"top1": 1.0}}, "specialists": [{"val_acc": 2}], "name": "x"}, lists=True)
    assert flat == {"models.vanilla.top1": 1.0, "specialists.0.val_acc": 2, "name": "x"}
    assert numeric({**flat, "sizes": [3, 4], "nan": float("nan"), "ok": True}) == {
        "models.vanilla.top1": 1.0, "specialists.0.val_acc": 2.0, "sizes.0": 3.0, "sizes.1": 4.0}


def test_default_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    import supersub.remote as remote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(remote, "HOME", tmp_path / "home")
    assert remote.default_tracking_uri() == f"sqlite:///{tmp_path}/home/mlflow.db"  # sqlite:////abs/...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert remote.default_tracking_uri() == "http://127.0.0.1:5000"
    assert remote.default_tracking_uri("sqlite:///rel.db") == f"sqlite:///{Path.cwd() / 'rel.db'}"


def test_the_runs_page_a_job_prints() -> None:
    from jobs.tracking import runs_page

    # the experiment's runs table: its own page may open on MLflow 3's GenAI overview
    assert runs_page("http://10.0.0.5:5000/", "7") == "http://10.0.0.5:5000/#/experiments/7/runs"
    local = runs_page("sqlite:////home/u/.supersub/mlflow.db", "1")
    assert "mlflow ui --backend-store-uri sqlite:////home/u/.supersub/mlflow.db" in local
    assert local.endswith("http://127.0.0.1:5000/#/experiments/1/runs")


def test_the_console_keeps_the_jobs_lines_and_drops_rays_chatter() -> None:
    """What jobs.console shows of the lines Ray forwards and of the records Ray's loggers emit in
    a worker (not verbose): the logs on disk are not touched by either."""
    import logging

    from jobs.console import _RayBelowWarning, filter_lines

    lines = ["specialist_0 epoch 1/2: loss 1.1 val acc 50.0%", "",
             "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1})",
             "Failed to send resource request for train-9a. If this only happens transiently ...",
             "Traceback (most recent call last):", '  File "client.py", line 58, in send', "    ray.get(",
             "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
             "specialist_0 epoch 2/2: loss 1.0 val acc 58.3%", "ValueError: a real error stays"]
    assert filter_lines(lines, 1234) == [lines[0], lines[8], lines[9]]
    assert filter_lines(["WARNING: 8 PYTHON worker processes have been started"], "raylet") == []
    keep = _RayBelowWarning()

    def record(name: str, level: int, path: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, "m", None, None)

    report = "/x/site-packages/ray/train/v2/_internal/execution/context.py"
    assert not keep.filter(record(report, logging.INFO, report))  # the logger named after its file
    assert not keep.filter(record("ray.train", logging.INFO, "/x/site-packages/ray/train/a.py"))
    assert keep.filter(record("ray.train", logging.WARNING, "/x/site-packages/ray/train/a.py"))
    assert keep.filter(record("root", logging.INFO, "/work/main/supersub/fit.py"))  # the job's own


def test_downloaded_bundles_are_cached_beside_the_tracking_store(tmp_path: Path, monkeypatch) -> None:
    import supersub.remote as remote

    monkeypatch.delenv("SUPERSUB_CACHE", raising=False)
    monkeypatch.setattr(remote, "HOME", tmp_path / "home")
    assert remote._cache_root(f"sqlite:///{tmp_path}/ml/mlflow.db") == tmp_path / "ml" / "cache" / "bundles"
    assert remote._cache_root("http://127.0.0.1:5000") == tmp_path / "home" / "cache" / "bundles"
    monkeypatch.setenv("SUPERSUB_CACHE", str(tmp_path / "elsewhere"))
    assert remote._cache_root(f"sqlite:///{tmp_path}/ml/mlflow.db") == tmp_path / "elsewhere" / "bundles"
    assert not (tmp_path / "home").exists()


def test_a_tuned_run_reuses_the_run_its_best_yaml_came_from(tmp_path: Path) -> None:
    from jobs.pipeline import build_parser, reuse_runs

    run = tmp_path / "runs" / "default"
    (run / "tasks").mkdir(parents=True)
    (run / "tune").mkdir()
    (run / "tune" / "best.yaml").write_text("overrides: {delta.bits: 2}\n")
    parse = build_parser().parse_args
    assert reuse_runs(parse(["--overrides-from", str(run / "tune" / "best.yaml")])) == [run]
    other = tmp_path / "runs" / "other"
    (other / "tasks").mkdir(parents=True)
    assert reuse_runs(parse(["--overrides-from", str(run / "tune" / "best.yaml"), "--reuse-from", str(other)])) == [other]
    (tmp_path / "mine.yaml").write_text("overrides: {delta.bits: 2}\n")
    assert reuse_runs(parse(["--overrides-from", str(tmp_path / "mine.yaml")])) == []  # not a run's tune/best.yaml


@pytest.mark.parametrize("args,message", [
    (["data.source=/nonexistent"], "source not found: /nonexistent"),
    (["data.hierarchy=nonsense"], "unknown hierarchy 'nonsense'"),
    (["delta.bits=5"], "delta.bits"),
    (["--reuse-from", "/nonexistent"], "--reuse-from /nonexistent: not a run folder"),
])
def test_user_errors_are_one_line_before_ray_or_mlflow(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    """Exit 2, one line, no traceback — and nothing started: no Ray, no MLflow run, no folder.
    In this process (the job's ``main``); the command line's own exit is the next test's."""
    from jobs.pipeline import main

    db = tmp_path / "mlflow.db"
    code = main(["--config", str(DEFAULT_CONFIG), "--out", str(tmp_path / "out"), *args,
                 f"tracking.tracking_uri=sqlite:///{db}"])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "ray:" not in out
    assert not db.exists() and not (tmp_path / "out").exists()
    out_file = tmp_path / "file"
    out_file.write_text("x")
    assert main(["--config", str(DEFAULT_CONFIG), "--out", str(out_file)]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_user_error_is_one_line_and_exit_2_from_the_command_line(tmp_path: Path) -> None:
    """``python -m jobs.pipeline`` as a user runs it: exit 2 and one stderr line (no warning an
    import prints), nothing written."""
    proc = subprocess.run(
        [PYTHON, "-m", "jobs.pipeline", "--config", str(DEFAULT_CONFIG), "--out", str(tmp_path / "out"),
         "data.source=/nonexistent", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **ENV},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobs.pipeline: error: ") and "source not found: /nonexistent" in lines[0], \
        proc.stderr
    assert "ray:" not in proc.stdout and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_ray_data_loader_matches_core_targets() -> None:
    """The worker-side Ray Data loader over a stand-in shard: the epoch's rows and targets are
    exactly supersub.data.loaders.select's, training epochs have len() full batches."""
    import numpy as np
    import torch

    from jobs.ray_data import RayDataLoader, needed_rows
    from supersub.data.loaders import LoaderSpec, select

    fine = np.repeat(np.arange(6), 10)  # 6 classes, 10 images each; superclass = class // 3
    coarse = fine // 3
    spec = LoaderSpec("train", "specialist", True, 4, superclass=1, negatives=0.5, seed=0)
    rows = needed_rows(fine, coarse, spec, 3, epochs=3)

    class Shard:  # what get_dataset_shard returns, as far as the loader uses it
        def iter_torch_batches(self, batch_size, **_):
            order = np.random.default_rng(0).permutation(rows)
            for i in range(0, order.size, batch_size):
                r = torch.from_numpy(order[i:i + batch_size])
                yield {"row": r, "image": r.view(-1, 1, 1, 1).expand(-1, 8, 8, 3).to(torch.uint8)}

    loader = RayDataLoader(Shard(), spec, fine, coarse, 3, torch.device("cpu"))
    for epoch in range(3):
        loader.set_epoch(epoch)
        want_rows, want_targets = select(fine, coarse, spec, 3, epoch)
        expected = dict(zip(want_rows.tolist(), want_targets.tolist()))
        batches = list(loader)
        assert len(batches) == len(loader) == want_rows.size // 4
        for x, y in batches:
            assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
            row = torch.round(x[:, 0, 0, 0] * 0.229 * 255 + 0.485 * 255).long()  # undo the normalisation
            assert [expected[r] for r in row.tolist()] == y.tolist()


@pytest.mark.slow
def test_local_runner_without_ray_or_mlflow(tmp_path: Path) -> None:
    """The GPU-box mode: `import ray` / `import mlflow` fail, and the pipeline still runs."""
    code = ("import sys; sys.modules['ray'] = None; sys.modules['mlflow'] = None\n"
            "from jobs.pipeline import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "local"
    proc = subprocess.run(
        [PYTHON, "-c", code, "--config", str(DEFAULT_CONFIG), "--out", str(out), *TINY,
         "specialist.optim.epochs=1", "train.epochs=1", "resources.runner=local", "tracking.enabled=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **ENV},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "bundle" / "manifest.json").is_file()


# ------------------------------------------------------------------------------ Ray
@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_pipeline_end_to_end_with_live_mlflow_runs_and_a_registered_model(tiny: dict) -> None:
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from serve_helpers import image_bytes

    out = tiny["out"]
    for name in ("bundle/manifest.json", "metrics.json", "config.yaml", "report/index.html"):
        assert (out / name).is_file(), name
    assert load_config(PipelineConfig, out / "config.yaml").resources.runner == "ray"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"vanilla", "vanilla_long", "delta_all", "two_stage_hard", "two_stage_soft"} <= set(metrics["models"])

    client = MlflowClient(tiny["uri"])
    exp = client.get_experiment_by_name("supersub")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline:default (tiny)")  # config name (out folder)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["delta.keep"] == "0.05"
    assert parent.data.metrics["top1_vanilla"] == pytest.approx(metrics["models"]["vanilla"]["top1"])
    assert "top1_served" in parent.data.metrics and "models/two_stage_soft/top1" in parent.data.metrics
    assert not any(k.startswith(("hierarchy", "routing", "specialists")) for k in parent.data.metrics)  # settings
    assert parent.data.tags["routing.soft"] == metrics["routing"]["soft"]
    assert parent.inputs.dataset_inputs[0].dataset.digest == metrics["manifest_fingerprint"][:16]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "metrics.json", "hierarchy.json", "report"} <= artifacts
    # the page says every number it shows is in report.json: so that is logged beside it
    assert {"report/index.html", "report/report.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    # no float32 noise (54.00000214576721); counts (images, FLOPs) are exact integers of any length
    assert all(v.is_integer() or v == float(f"{v:.7g}") for v in parent.data.metrics.values())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3 opens it on its runs

    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"vanilla", "specialist_0", "specialist_1", "delta_all", "vanilla_long"} <= set(nested)
    for name, run in nested.items():  # live: the run was open while the task trained, not made after it
        assert run.info.status == "FINISHED", name
        result = Path(metrics["tasks"][name]) / "metrics.json"
        finished = result.stat().st_mtime
        began = finished - json.loads(result.read_text())["wall_seconds"]
        assert run.info.start_time / 1000 <= began + 1.0 and run.info.end_time / 1000 >= finished - 1.0, name
    for name in ("specialist_0", "specialist_1"):  # complete per-epoch curves, logged concurrently
        run_id = nested[name].info.run_id
        for key in ("train_loss", "val_acc", "images_per_s", "lr"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == [1, 2], (name, key)
        assert "delta_bytes" in nested[name].data.metrics and "final_val_acc" in nested[name].data.metrics

    # the bundle as a registered MLflow model that loads and predicts
    versions = client.search_model_versions("name='supersub'")
    latest = max(versions, key=lambda v: int(v.version))
    assert latest.run_id == parent.info.run_id and "top1_served" in latest.tags
    mlflow.set_tracking_uri(tiny["uri"])
    model = mlflow.pyfunc.load_model(f"models:/supersub/{latest.version}")
    answer = model.predict(pd.DataFrame({"image": [image_bytes(i) for i in range(3)]}))
    assert len(answer) == 3 and set(answer["routing"]) == {metrics["serves"]["routing"]}
    h = json.loads((out / "bundle" / "manifest.json").read_text())["hierarchy"]
    assert set(answer["subclass_id"]) <= {c["id"] for s in h["superclasses"] for c in s["subclasses"]}


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_reuses_finished_tasks_and_retrains_on_other_data(tiny: dict, tmp_path: Path) -> None:
    from jobs.pipeline import run

    lines: list[str] = []
    cfg = tiny_config(tiny["out"], tiny["uri"])
    call_with_timeout(run, 240, cfg, tiny["out"], log=lines.append)
    log = "\n".join(lines)
    for name in ("vanilla", "specialist_0", "specialist_1", "delta_all", "vanilla_long"):
        assert f"{name}: done earlier with the same inputs and settings, reused" in log
    assert "as Ray Train run" not in log  # no Train run started
    # The case: the same --out with other data retrains the vanilla network, never reuses it.
    copy = copy_without_specialists(tiny["out"], tmp_path / "other")
    lines.clear()
    # (no controls: the vanilla network and the specialists are what this checks)
    cfg = tiny_config(copy, None, "data.max_train_per_class=20", "baselines.vanilla_long=false",
                      "baselines.delta_all=false")
    call_with_timeout(run, 480, cfg, copy, log=lines.append)
    assert any(line.startswith("vanilla: data.manifest changed") for line in lines), lines
    assert any(line.startswith("vanilla: started as Ray Train run") for line in lines)


@pytest.mark.ray
@pytest.mark.slow
def test_a_task_restored_from_another_jobs_storage_says_so_and_is_tracked(tiny: dict, tmp_path: Path) -> None:
    """A second --out on the first job's storage path: Ray Train restores each specialist's
    finished run by name. The job says which folder it came from, and each one still has its
    MLflow run, FINISHED, tagged with that folder, with the recorded per-epoch curve."""
    from mlflow.tracking import MlflowClient

    from jobs.pipeline import run

    out = copy_without_specialists(tiny["out"], tmp_path / "second")
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    lines: list[str] = []
    cfg = tiny_config(out, uri, f"resources.storage_path={tiny['out'] / 'ray'}")
    call_with_timeout(run, 480, cfg, out, log=lines.append)
    first = {p.name: p for p in (tiny["out"] / "tasks").glob("specialist_*")}
    for name in ("specialist_0", "specialist_1"):
        origin = next(p for n, p in first.items() if n.startswith(f"{name}-"))
        assert f"{name}: reused from {origin}" in "\n".join(lines), [line for line in lines if name in line]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    for name in ("specialist_0", "specialist_1"):
        run_ = next(r for r in runs if r.info.run_name == name)
        assert run_.info.status == "FINISHED" and run_.data.tags["supersub.reused_from"].startswith(str(tiny["out"]))
        assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, "val_acc")) == [1, 2]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path: Path) -> None:
    """Failure injection (an epoch hook the test passes to the runner): the rank-0 worker process
    exits after epoch 1's checkpoint is committed; Train's FailureConfig restarts the worker group,
    which must resume at epoch 2. Also runs DDP over 2 workers, and the Ray Data input path
    reading a Parquet image source (PNG bytes in row groups)."""
    import ray_helpers
    from ray import cloudpickle
    from ray_helpers import fail_once_after_epoch_1

    from jobs.runner import RayRunner

    cloudpickle.register_pickle_by_value(ray_helpers)  # the hook travels to workers that cannot import tests/
    from supersub.pipeline import data_options, network_task, prepare_data
    from supersub.runner import run_tasks

    source, hierarchy = parquet_source(tmp_path / "source")
    cfg = tiny_config(tmp_path, None, "resources.num_workers=2", "resources.cpus_per_worker=0.5", "data.loader=ray_data",
                      f"data.source={source}", f"data.hierarchy={hierarchy}")
    manifest_dir = prepare_data(cfg, tmp_path, log=lambda s: None)
    assert load_manifest(manifest_dir).meta["source"]["kind"] == "parquet"
    task = network_task("vanilla", "fine", cfg, data_options(cfg, manifest_dir), tmp_path / "tasks")
    runner = RayRunner(cfg.resources, tmp_path, data_loader=cfg.data.loader, log=lambda s: None,
                       epoch_hook=fail_once_after_epoch_1)
    result = call_with_timeout(run_tasks, 420, runner, [task], cfg.resources, lambda s: None)[0]
    assert (Path(task.out_dir) / "failed_once").is_file(), "the failure was not injected"
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    # each rank reported epoch 1 once (before the failure) and epoch 2 once (after the restart)
    assert sorted(int(x) for x in (Path(task.out_dir) / "epochs.log").read_text().split()) == [1, 1, 2, 2]
    assert (Path(task.out_dir) / "model.safetensors").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_spreads_specialists(tiny: dict, tmp_path: Path) -> None:
    """A simulated two-node cluster (ray.cluster_utils.Cluster, 1 CPU a node) in its own process:
    two 1-CPU specialists run at once, one per node; inputs travel through the object store,
    checkpoints go to a file:// storage URI, and outputs come back as the runs' final checkpoints."""
    out = copy_without_specialists(tiny["out"], tmp_path / "two")
    temp_dir = tempfile.mkdtemp(prefix="ss2n-", dir="/tmp")
    env = {**os.environ, **ENV, "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([PYTHON, str(REPO / "tests" / "ray_helpers.py"), "two-node", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    finally:
        call_with_timeout(stop_cluster, 60, temp_dir)  # anything the subprocess left behind
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    placed = result["specialist_nodes"]
    assert set(placed) == {"specialist_0", "specialist_1"}
    assert set(placed.values()) == set(result["nodes"])  # one on each node
    assert (out / "metrics.json").is_file() and list((out / "tasks").glob("specialist_1-*/delta.safetensors"))
    assert not any("warning" in line for line in result["log"])  # storage was a URI: no local-path warning
    assert list((out / "ray-storage").glob("specialist_0-*/checkpoint_*"))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_to_a_started_cluster(tiny: dict, tmp_path: Path) -> None:
    """`ray start --head` on private ports and temp dir, `ray job submit` of the pipeline, then the
    cluster's processes stopped by pid (`ray stop` would stop every Ray on this host)."""
    out = copy_without_specialists(tiny["out"], tmp_path / "job")
    temp_dir = tempfile.mkdtemp(prefix="ssjob-", dir="/tmp")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **ENV, "RAY_TMPDIR": temp_dir, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    try:
        subprocess.run(
            # Every port of its own: the session's Ray (and anyone else's) holds the defaults, and a
            # job agent that cannot bind 52365 leaves the job server answering "No available agent".
            [str(bin_dir / "ray"), "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *(f"--{name}-port={free_port()}" for name in
               ("dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export", "ray-client-server"))],
            env=env, check=True, capture_output=True, timeout=120,
        )
        cmd = [str(bin_dir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", ".",
               "--runtime-env-json", json.dumps({"env_vars": ENV}), "--",
               "python", "-m", "jobs.pipeline", "--config", "jobs/configs/default.yaml", "--out", str(out), *TINY,
               "tracking.enabled=false"]
        deadline = time.monotonic() + 480
        while True:  # the job agent comes up some seconds after `ray start` returns
            submit = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=max(30, deadline - time.monotonic()))
            if "No available agent" not in submit.stderr or time.monotonic() > deadline - 60:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-3000:]
        assert "ray: joined" in submit.stdout and "1 node(s), 2 CPU" in submit.stdout  # the started cluster
        assert "succeeded" in submit.stdout + submit.stderr
        assert (out / "metrics.json").is_file() and (out / "bundle" / "manifest.json").is_file()
    finally:
        call_with_timeout(stop_cluster, 60, temp_dir)
