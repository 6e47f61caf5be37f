"""A manifest at ImageNet's size: build time, peak memory and a training task's data start-up on
1,281,167 rows.

The 200 full-size JPEGs of ``../shared/data/imagenet-sample-200`` are repeated under distinct
URIs: an ImageNet-style folder ``train/<wnid>/<wnid>_<i>.JPEG`` of symbolic links (1,000 classes,
1,281 or 1,282 images each) in a temporary folder, with a mapping-file hierarchy of 10
superclasses. Then, each in a fresh process (peak memory from ``wait4``'s rusage):

1. ``supersub data build --no-verify`` (the ImageNet config's ``verify: false``: verifying decodes
   every image, hours at this size): wall time, peak resident memory, the manifest's size;
2. a training task's data start-up: ``load_manifest``, its ``fingerprint`` (part of every task's
   identity), the ``dataset`` loader of the vanilla network (train, fine) and of one specialist
   (its superclass + 0.5 negatives), and the first batch of 64 at 224 px through two DataLoader
   workers: the time of each step, the loader process's peak memory and its workers'.

Nothing is written into the repository; the temporary folder is removed unless ``--keep``.

    .venv/bin/python benchmarks/manifest_scale.py [--rows 1281167] [--json OUT.json] [--keep]
    .venv/bin/python benchmarks/manifest_scale.py --manifest KEPT/m [--code DIR]   # the probe only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample-200"

PROBE = r"""
import json, resource, sys, time
t = {}
t0 = time.perf_counter()
import torch
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec, make_loader
t["imports_s"] = time.perf_counter() - t0

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

base = rss_mb()
t0 = time.perf_counter(); m = load_manifest(sys.argv[1]); t["load_manifest_s"] = time.perf_counter() - t0
t0 = time.perf_counter(); fp = m.fingerprint; t["fingerprint_s"] = time.perf_counter() - t0
t0 = time.perf_counter(); counts = m.counts(); t["counts_s"] = time.perf_counter() - t0
t["rss_after_manifest_mb"] = rss_mb() - base
kw = dict(image_size=224, mode="dataset", device=torch.device("cpu"), num_workers=2)
t0 = time.perf_counter(); net = make_loader(m, LoaderSpec("train", "fine", True, 64), **kw); n = len(net)
t["network_loader_s"] = time.perf_counter() - t0
t0 = time.perf_counter(); spec = make_loader(m, LoaderSpec("train", "specialist", True, 64, 0, 0.5), **kw); ns = len(spec)
t["specialist_loader_s"] = time.perf_counter() - t0
t["rss_after_loaders_mb"] = rss_mb() - base
t0 = time.perf_counter(); it = iter(net); x, y = next(it); t["first_batch_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(3):
    next(it)
t["next_3_batches_s"] = time.perf_counter() - t0
del it
t["rss_after_first_batches_mb"] = rss_mb() - base
t["batches"] = {"network": n, "specialist_0": ns}
t["counts"] = counts
t["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(t))
"""


def run_measured(cmd: list[str], cwd: Path = REPO) -> tuple[float, float, str]:
    """``(wall s, peak RSS MiB, stdout)`` of a child process (its own peak, from ``wait4``)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def make_source(root: Path, rows: int, classes: int) -> tuple[Path, Path, float]:
    """The folder of links and the hierarchy file; returns the seconds it took."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    shard = next(SAMPLE.glob("*.parquet"), None)
    if shard is None:
        sys.exit(f"no Parquet shard in {SAMPLE}")
    images = pq.read_table(shard, columns=["image"]).column("image").to_pylist()
    src = root / "jpeg200"
    src.mkdir(parents=True)
    files = []
    for i, row in enumerate(images):
        f = src / f"{i:03d}.JPEG"
        f.write_bytes(row["bytes"])
        files.append(str(f))
    folder = root / "imagenet" / "train"
    wnids = [f"n{c:08d}" for c in range(classes)]
    k = 0
    for c, w in enumerate(wnids):
        d = folder / w
        d.mkdir(parents=True)
        for i in range(rows // classes + (c < rows % classes)):
            os.symlink(files[k % len(files)], d / f"{w}_{i}.JPEG")
            k += 1
    mapping = root / "h10.csv"
    mapping.write_text("subclass,superclass\n" + "".join(f"{w},s{c % 10}\n" for c, w in enumerate(wnids)))
    return root / "imagenet", mapping, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_281_167)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--manifest", type=Path, help="only the start-up probe, on this manifest (e.g. one --keep left)")
    p.add_argument("--code", type=Path, default=REPO, help="the probe imports supersub from this folder (before/after: "
                   "`git archive COMMIT supersub | tar -x -C DIR`)")
    args = p.parse_args(argv)
    py = sys.executable
    if args.manifest:
        load0 = os.getloadavg()
        probe_s, probe_rss, out = run_measured([py, "-c", PROBE, str(args.manifest.absolute())], cwd=args.code)
        probe = {**json.loads(out.strip().splitlines()[-1]), "process_wall_s": probe_s, "process_peak_rss_mb": probe_rss,
                 "code": str(args.code), "loadavg": {"before": list(load0), "after": list(os.getloadavg())}}
        print(json.dumps(probe, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(probe, indent=2))
        return 0
    root = Path(tempfile.mkdtemp(prefix="supersub-manifest-scale-"))
    try:
        load0 = os.getloadavg()
        source, mapping, setup_s = make_source(root, args.rows, args.classes)
        print(f"{args.rows:,} links to {len(list((root / 'jpeg200').iterdir()))} JPEGs in {setup_s:.0f} s ({root})", flush=True)
        build_s, build_rss, _ = run_measured([py, "-m", "supersub.cli", "data", "build", "--source", str(source),
                                              "--hierarchy", str(mapping), "--out", str(root / "m"), "--no-verify",
                                              "--val-fraction", "0.02"])
        size = sum(f.stat().st_size for f in (root / "m").iterdir())
        print(f"build: {build_s:.1f} s, peak RSS {build_rss:.0f} MiB, manifest folder {size / 2**20:.1f} MiB", flush=True)
        probe_s, probe_rss, out = run_measured([py, "-c", PROBE, str(root / "m")])
        probe = json.loads(out.strip().splitlines()[-1])
        print("task data start-up: " + ", ".join(f"{k} {v:.2f}" for k, v in probe.items() if isinstance(v, float)),
              flush=True)
        result = {"rows": args.rows, "classes": args.classes, "setup_s": setup_s,
                  "build": {"wall_s": build_s, "peak_rss_mb": build_rss, "manifest_mb": size / 2**20, "verify": False},
                  "startup": {**probe, "process_wall_s": probe_s, "process_peak_rss_mb": probe_rss},
                  "loadavg": {"before": list(load0), "after": list(os.getloadavg())}}
        print(f"load average {load0[0]:.1f} → {os.getloadavg()[0]:.1f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
