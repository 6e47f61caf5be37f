"""The README's commands, run as written — relative paths, from a repository root, tiny overrides
appended — so that the README cannot drift from the code again.

The repository root is a temporary folder holding links to the repository's folders: every
relative path resolves as in a checkout, and the outputs (runs/, report/) land in the temporary
folder. ``.venv/bin/python`` and ``supersub`` are this interpreter.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ray_helpers import ENV, REPO, TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# (pattern of a README command, what is appended to it)
COMMANDS = [
    (r"-m jobs\.pipeline --config jobs/configs/default\.yaml --out runs/default\b", [*TINY]),
    (r"-m jobs\.tune --space tune_spaces/default\.yaml --from runs/default --budget 0\.05",
     ["--space", "tune_spaces/tiny.yaml", "--budget", "1.0"]),  # fewer trials; every size fits
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


def test_the_readme_commands_run_as_written(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("jobs", "tune_spaces", "supersub", "serve", "tests", "README.md"):
        (root / name).symlink_to(REPO / name)
    # A fresh, short Ray temp dir: the jobs start their own Ray, apart from the session's.
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ssreadme-", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    commands = readme_commands()
    for pattern, extra in COMMANDS:
        found = [c for c in commands if re.search(pattern, c)]
        assert found, f"the README has no command matching {pattern}"
        argv = runnable(found[0]) + extra
        proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{found[0]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if "jobs.pipeline" in found[0]:  # (a Tune search runs the same specialist once a trial)
            epochs = re.findall(r"(\w+ epoch \d+/\d+):", proc.stdout + proc.stderr)
            assert len(epochs) == len(set(epochs)), f"an epoch line printed twice by {found[0]}"
        if "jobs.tune" in found[0]:
            assert (root / "runs" / "default" / "tune" / "best.yaml").is_file(), proc.stdout[-4000:]
    assert (root / "runs" / "default" / "bundle" / "manifest.json").is_file()
    assert (root / "runs" / "default" / "tune" / "best.yaml").is_file()
    assert (root / "runs" / "tuned" / "metrics.json").is_file()
    assert (root / "runs" / "study" / "study.md").is_file()
    assert (root / "report" / "index.html").is_file()
