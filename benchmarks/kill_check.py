"""The crash contract, checked: SIGKILL a pipeline job at six moments, rerun it into the same
``--out``, and compare with an uninterrupted run.

    python benchmarks/kill_check.py --work /tmp/kill [--runner local|ray] [key=value ...]

For each moment — mid-epoch of the vanilla network, after it (a specialist starts), during the
specialists, during ``delta_all``, during evaluation, while the bundle is written — it starts
``python -m jobs.pipeline`` in its own process group, kills the whole group with SIGKILL when
the moment comes (a line of the job's output, or ``bundle.tmp<pid>/`` appearing), reruns the job
into the same folder and compares with the reference run:

* every task's weights and delta (sha256 of ``model.safetensors`` / ``delta.safetensors``, by
  task folder),
* every model's test top-1 in ``metrics.json``,
* the bundle's file hashes (``bundle/manifest.json`` ``files``),

and that the rerun reused or resumed (it says which tasks it reused). Prints one line a moment
and exits 1 if any differs. Tiny settings by default (the README's short settings run in minutes
a job; pass overrides to change them). Tracking is off: MLflow is not what is checked here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.source=synthetic:superclasses=2,subclasses=3,per_class=40,size=16", "data.image_size=16",
    "data.num_workers=0", "model.width=0.125", "train.epochs=3", "train.batch_size=32", "specialist.optim.epochs=2",
    "specialist.optim.batch_size=32", "evaluation.bootstrap=50", "report=false", "tracking.enabled=false",
]
# (name, what marks the moment: a line of the driver's output, or "file:<glob>" — a path under
# --out that appears, which Ray's lagging forwarding of worker lines cannot delay). An epoch's
# checkpoint marks the start of the next epoch.
MOMENTS = [
    ("mid-epoch", "file:tasks/vanilla-*/checkpoint/checkpoint.pt"),
    ("after vanilla", "specialist_0: "),
    ("during specialists", "file:tasks/specialist_1-*/checkpoint/checkpoint.pt"),
    ("during delta_all", "file:tasks/delta_all-*/checkpoint/checkpoint.pt"),
    ("during evaluation", "== evaluation"),
    ("while the bundle is written", "file:bundle.tmp*"),
]


def job(out: Path, runner: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(REPO / "jobs/configs/default.yaml"), "--out", str(out),
           *TINY, f"resources.runner={runner}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(out: Path, runner: str, extra: list[str], timeout: float) -> list[str]:
    p = job(out, runner, extra)
    text, _ = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{out}: the job exited {p.returncode}:\n{text[-3000:]}")
    return text.splitlines()


def kill_at(out: Path, marker: str, runner: str, extra: list[str], timeout: float) -> bool:
    """Runs the job until ``marker`` and SIGKILLs its process group; False if it finished first."""
    p = job(out, runner, extra)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()  # the job's lines as they come
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if marker.startswith("file:"):
                hit = any(out.glob(marker[5:]))
            else:
                hit = any(marker in x for x in list(lines))
            if hit:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return True
            time.sleep(0.001 if marker.startswith("file:") else 0.05)
        return False
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def fingerprint(out: Path) -> dict:
    """What must be bit-identical: weights and deltas by task folder, top-1 by model, bundle hashes."""
    from supersub.atomic import sha256_file

    files = {f"{p.parent.name}/{p.name}": sha256_file(p) for pattern in ("*/model.safetensors", "*/delta.safetensors")
             for p in sorted((out / "tasks").glob(pattern))}
    metrics = json.loads((out / "metrics.json").read_text())
    top1 = {name: m.get("top1") for name, m in sorted(metrics["models"].items())}
    bundle = {k: v["sha256"] for k, v in json.loads((out / "bundle/manifest.json").read_text())["files"].items()}
    return {"files": files, "top1": top1, "bundle": bundle}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="an empty folder for the runs")
    ap.add_argument("--runner", default="local", choices=["local", "ray"])
    ap.add_argument("--timeout", type=float, default=900, help="seconds a job may take")
    ap.add_argument("--moments", help="comma-separated indices of MOMENTS to check (default: all six)")
    ap.add_argument("overrides", nargs="*", help="more key=value for the job")
    args = ap.parse_args(argv)
    work = Path(args.work).absolute()
    t0 = time.perf_counter()
    if not (work / "reference" / "metrics.json").is_file():  # a finished reference is reused
        finish(work / "reference", args.runner, args.overrides, args.timeout)
    ref = fingerprint(work / "reference")
    print(f"reference: {len(ref['files'])} weight/delta files, {len(ref['top1'])} models, {time.perf_counter() - t0:.0f} s",
          flush=True)
    bad = 0
    chosen = [int(i) for i in args.moments.split(",")] if args.moments else range(len(MOMENTS))
    for i in chosen:
        name, marker = MOMENTS[i]
        out = work / f"kill{i}"
        if out.exists():
            shutil.rmtree(out)
        killed = kill_at(out, marker, args.runner, args.overrides, args.timeout)
        lines = finish(out, args.runner, args.overrides, args.timeout)
        reused = sum("done earlier with the same inputs" in line or "finished meanwhile" in line for line in lines)
        resumed = sum("resumed after epoch" in line for line in lines)
        got = fingerprint(out)
        diff = [k for k in ref if ref[k] != got[k]]
        bad += bool(diff) or not killed
        print(f"{name:28s} {'killed' if killed else 'NOT KILLED (finished first)'}; rerun reused {reused} task(s), "
              f"resumed {resumed}; " + ("identical weights, deltas, top-1 and bundle" if not diff
                                        else f"DIFFERS: {', '.join(diff)}"), flush=True)
    print(f"{'all identical' if not bad else f'{bad} moment(s) failed'} ({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
