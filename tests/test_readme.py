"""The README's commands, run as written — relative paths, from a repository root, tiny overrides
appended — so that the README cannot drift from the code again.

The repository root is a temporary folder holding links to the repository's folders: every
relative path resolves as in a checkout, and the outputs (runs/, report/) land in the temporary
folder. ``.venv/bin/python`` and ``supersub`` are this interpreter. The jobs run beside the test
session's Ray and start their own, as a user's would beside someone else's on a shared host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import pytest
from ray_helpers import ENV, REPO, TINY, call_with_timeout, stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

ASHA = "<asha.yaml>"  # in COMMANDS: the path of ASHA_SPACE, written for the run

# (pattern of a README command, what is appended to it)
COMMANDS = [
    (r"-m jobs\.pipeline --config jobs/configs/default\.yaml --out runs/default\b", [*TINY]),
    (r"-m jobs\.tune --space tune_spaces/default\.yaml --from runs/default --budget 0\.05",
     ["--space", ASHA, "--superclasses", "0", "--budget", "1.0"]),  # ASHA_SPACE below; every size fits
    (r"-m jobs\.pipeline --config jobs/configs/default\.yaml --out runs/tuned --overrides-from runs/default/tune/best\.yaml",
     [*TINY]),
    (r"-m jobs\.study --study jobs/configs/study_default\.yaml --out runs/study", [*TINY, "--variants", "ours", "--seeds", "0"]),
    (r"^supersub evaluate --bundle runs/default/bundle --data runs/default/data", []),
    (r"^supersub report --run runs/default --out report/", []),
]


def readme_commands() -> list[str]:
    """Every shell command of the README's bash blocks, continuation lines joined, comments cut."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(re.sub(r"\s+", " ", cmd))
    return out


def runnable(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if words[0] == ".venv/bin/python":
        return [sys.executable, *words[1:]]
    if words[0] == "supersub":
        return [sys.executable, "-m", "supersub.cli", *words[1:]]
    raise AssertionError(f"not a command this test runs: {cmd}")


# jobs.tune's appended space: ASHA over three trials, one at a time, on superclass 0. lr 1e-9
# leaves the specialist's new head at chance level where lr 0.2 (the config's) trains it: ASHA
# stops trial 2 at its first rung (epoch 1 of 2), below trial 1, and trial 3 must still start
# after it (the stopped trial's resources freed: the State API reached the job's own cluster).
ASHA_SPACE = ("num_samples: 1\nmax_concurrent_trials: 1\nscheduler: {grace_period: 1, reduction_factor: 2}\n"
              "overrides: [specialist.optim.epochs=2]\nspace:\n  specialist.optim.lr: {grid: [0.2, 1.0e-9, 0.2]}\n")


@pytest.fixture(scope="module")
def readme_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's commands run once, in order, beside the test session's Ray (each job starts its
    own: two Rays on this host). ``{"root", "uri", "logs": {pattern: output}}``."""
    tmp_path = tmp_path_factory.mktemp("readme")
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("jobs", "tune_spaces", "supersub", "serve", "tests", "README.md"):
        (root / name).symlink_to(REPO / name)
    (tmp_path / "asha.yaml").write_text(ASHA_SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    temp_dir = tempfile.mkdtemp(prefix="ssreadme-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)  # the session's, pinned in this process
    commands = readme_commands()
    logs = {}
    try:
        for pattern, extra in COMMANDS:
            found = [c for c in commands if re.search(pattern, c)]
            assert found, f"the README has no command matching {pattern}"
            extra = [str(tmp_path / "asha.yaml") if e == ASHA else e for e in extra]
            proc = subprocess.run(runnable(found[0]) + extra, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=900)
            logs[pattern] = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"{found[0]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    finally:
        call_with_timeout(stop_cluster, 60, temp_dir)  # anything a job left behind
    return {"root": root, "uri": uri, "logs": logs}


def test_the_readme_commands_run_as_written(readme_run: dict) -> None:
    root = readme_run["root"]
    for pattern, text in readme_run["logs"].items():
        if "jobs\\.pipeline" in pattern:  # (a Tune search runs the same specialist once a trial)
            epochs = re.findall(r"(\w+ epoch \d+/\d+):", text)
            assert len(epochs) == len(set(epochs)), f"an epoch line printed twice by {pattern}"
    assert (root / "runs" / "default" / "bundle" / "manifest.json").is_file()
    assert (root / "runs" / "default" / "tune" / "best.yaml").is_file()
    assert (root / "runs" / "tuned" / "metrics.json").is_file()
    tuned = next(text for pattern, text in readme_run["logs"].items() if "runs/tuned" in pattern)
    assert re.search(r"^vanilla: finished in \S+/runs/default/tasks/vanilla-\w+ with the same inputs and settings, "
                     r"reused \(linked", tuned, re.M), tuned[-3000:]  # only what the tuned settings change trains
    assert (root / "runs" / "study" / "study.md").is_file()
    assert (root / "report" / "index.html").is_file()


def test_pipeline_and_tune_beside_another_ray(readme_run: dict) -> None:
    """Another Ray runs (this session's) when the pipeline and the Tune job start their own.
    Unpinned, Train's placement-group cleaner and the State API found two clusters ("Found
    multiple active Ray instances") and trials after an ASHA stop never started. Here: no
    traceback, every trial starts, ASHA stops one, the jobs end; epoch lines once each."""
    from mlflow.tracking import MlflowClient

    for pattern, text in readme_run["logs"].items():
        assert "Traceback" not in text and "multiple active Ray instances" not in text, f"{pattern}\n{text[-5000:]}"
        assert "Reporting training result" not in text, pattern
        epoch_lines = [line for line in text.splitlines() if "epoch " in line and "/" in line]
        assert len(epoch_lines) == len(set(epoch_lines)), epoch_lines  # once each
    summary = json.loads((readme_run["root"] / "runs" / "default" / "tune" / "pareto.json").read_text())
    statuses = [t["status"] for t in summary["trials"]]
    assert len(statuses) == 3 and all(t["iterations"] for t in summary["trials"]), summary["trials"]  # all started
    assert "error" not in statuses, summary["trials"]
    assert "stopped early" in statuses and "completed" in statuses, statuses
    client = MlflowClient(readme_run["uri"])
    runs = client.search_runs([client.get_experiment_by_name("supersub").experiment_id])
    trials = [r for r in runs if r.data.tags.get("supersub.kind") == "tune_trial"]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials), [(r.info.run_name, r.info.status) for r in trials]
    assert sum(r.data.tags.get("stopped_early") == "true" for r in trials) == statuses.count("stopped early")
