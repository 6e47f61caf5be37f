"""Training input throughput: the PIL path against the uint8 tensor path.

On full-size ImageNet JPEGs (``../shared/data/imagenet-sample-200``: 200 validation images, as
Parquet), one training sample = encoded bytes → RandomResizedCrop(224) + flip:

* ``pil`` — the reference: PIL decode (:func:`supersub.data.images.decode_image` with
  ``fast=False``) → ``build_transforms(224, train=True)`` (PIL crop/resize, flip, ``ToTensor``,
  ``Normalize``): a normalised float ``[3, 224, 224]``;
* ``tensor`` — what the ``dataset`` and Ray Data loaders run in their workers:
  :func:`supersub.data.images.decode_tensor` (torchvision's JPEG decoder, PIL for the rest) →
  :class:`supersub.data.dataset.TensorTrainTransform`: uint8 ``[3, 224, 224]``, normalised later
  per batch on the training device;
* ``tensor_norm`` — ``tensor`` plus a per-image float conversion and normalisation in the worker
  (like for like with ``pil``'s output; what CPU training pays when the batch is normalised on
  the CPU instead);
* ``gpu`` (with CUDA) — :func:`supersub.data.gpu.decode_augment` on batches of 256 encoded images:
  nvJPEG decode + crop/resize/flip/normalise on the GPU, images/s of the whole device.

Each CPU path runs in 1 and in 2 processes at once (one thread each) for ``--repeats`` passes over
the 200 images per process; a round runs every (processes, path) pair, alternating the order of
the paths from round to round (A B, B A, ...), and ``--rounds`` rounds give a median and the
spread (min–max). The per-core rate is images per CPU-second of the worker processes (their
``time.process_time``): on a shared machine a process waiting for a core is not charged for the
wait, where wall-clock rates (also printed) move with everything else running. ``/proc/loadavg``
is read before and after every round. Then the Ray Data input path (``jobs.ray_data.decode_batch``, as
``data.loader=ray_data`` builds it) on a local Ray with 1 and with 2 CPUs.

    .venv/bin/python benchmarks/data_throughput.py                   # table
    .venv/bin/python benchmarks/data_throughput.py --json OUT.json   # and the figures as JSON
    .venv/bin/python benchmarks/data_throughput.py --json -          # JSON on stdout only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample-200"
SIZE = 224


def load_sample(folder: Path) -> tuple[list[bytes], list[str], str]:
    import pyarrow.parquet as pq

    shards = sorted(folder.glob("*.parquet"))
    if not shards:
        sys.exit(f"no Parquet shard in {folder} (expected full-size ImageNet JPEGs as Parquet)")
    table = pq.read_table(shards[0], columns=["image"])
    rows = table.column("image").to_pylist()
    return [r["bytes"] for r in rows], [r["path"] for r in rows], str(shards[0])


def make_path(name: str):
    """A function encoded bytes (+ name) → one training sample, for path ``name``."""
    from supersub.data.dataset import TensorTrainTransform, build_transforms, normalise_uint8
    from supersub.data.images import decode_image, decode_tensor

    if name == "pil":
        transform = build_transforms(SIZE, train=True)
        return lambda data, fname: transform(decode_image(data, fname, fast=False).image)
    augment = TensorTrainTransform(SIZE)
    if name == "tensor":
        return lambda data, fname: augment(decode_tensor(data, fname).tensor)
    if name == "tensor_norm":
        return lambda data, fname: normalise_uint8(augment(decode_tensor(data, fname).tensor)[None])[0]
    raise ValueError(name)


def _worker(name: str, datas: list[bytes], names: list[str], repeats: int, seed: int, out) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    fn = make_path(name)
    for d, n in zip(datas[:10], names[:10]):  # warm-up: lazy imports, first allocations
        fn(d, n)
    t0, c0 = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(repeats):
        for d, n in zip(datas, names):
            fn(d, n)
            count += 1
    out.put((count, t0, time.perf_counter(), time.process_time() - c0))


def run_cpu(name: str, procs: int, datas, names, repeats: int, seed: int) -> tuple[float, float]:
    """``(images per CPU-second, wall-clock images/s)`` of ``procs`` processes together (one
    thread each). Per CPU-second is the per-core rate that other work on the machine disturbs
    least: a process that waits for a core is not charged for the wait."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(name, datas, names, repeats, seed + i, q)) for i in range(procs)]
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    for p in ps:
        p.join()
    n = sum(r[0] for r in results)
    return n / sum(r[3] for r in results), n / (max(r[2] for r in results) - min(r[1] for r in results))


def run_gpu(datas, repeats: int, batch: int = 256) -> float | None:
    if not torch.cuda.is_available():
        return None
    from supersub.data.gpu import decode_augment

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [datas[i : i + batch] for i in range(0, len(datas), batch)]
    decode_augment(batches[0], SIZE, True, device, gen)  # warm-up (nvJPEG handles, kernels)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(repeats):
        for b in batches:
            x = decode_augment(b, SIZE, True, device, gen)
            n += x.shape[0]
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def summary(values: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _timed_decode_batch(batch, **kwargs):
    """``jobs.ray_data.decode_batch`` plus the CPU time it took (column ``cpu_s``, per row)."""
    import numpy as np

    from jobs.ray_data import decode_batch

    c0 = time.process_time()
    out = decode_batch(batch, **kwargs)
    out["cpu_s"] = np.full(len(out["row"]), (time.process_time() - c0) / max(1, len(out["row"])))
    return out


def run_ray_data(shard: str, n_images: int, cpus: int, passes: int) -> dict:
    """Wall-clock images/s of the Ray Data training input path on a local Ray with ``cpus`` CPUs,
    and images per CPU-second spent inside its decode tasks."""
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    from jobs.ray_data import BLOCK_ROWS, DECODE_CPUS

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = np.arange(n_images * 4) % n_images  # 800 rows: every image 4 times
        table = pa.table({"row": np.arange(rows.size), "uri": [f"{shard}#{r}" for r in rows]})
        blocks = [table.slice(i, BLOCK_ROWS) for i in range(0, table.num_rows, BLOCK_ROWS)]
        meta = {"source": {"kind": "parquet"}}

        def dataset():
            return ray.data.from_arrow(blocks).map_batches(
                _timed_decode_batch, fn_kwargs={"meta": meta, "size": SIZE, "train": True},
                batch_size=64, batch_format="numpy", num_cpus=DECODE_CPUS,
            )

        def one_pass() -> tuple[float, float]:
            t0, n, cpu = time.perf_counter(), 0, 0.0
            for b in dataset().iter_batches(batch_size=256, batch_format="numpy"):
                n += len(b["row"])
                cpu += float(b["cpu_s"].sum())
            return n / (time.perf_counter() - t0), n / cpu

        one_pass()  # warm-up: worker processes, imports
        runs = [one_pass() for _ in range(passes)]
        return {**summary([r[0] for r in runs]), "per_decode_cpu_s": summary([r[1] for r in runs]),
                "decode_task_cpus": DECODE_CPUS, "rows_per_pass": int(rows.size)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=Path, default=SAMPLE, help="folder with the Parquet shard of full-size JPEGs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median and spread over them)")
    p.add_argument("--repeats", type=int, default=2, help="passes over the images per process and run")
    p.add_argument("--paths", default="pil,tensor,tensor_norm", help="CPU paths to compare, the first is the baseline")
    p.add_argument("--procs", default="1,2", help="process counts")
    p.add_argument("--ray-cpus", default="1,2", help="Ray Data CPU counts ('' to skip)")
    p.add_argument("--ray-passes", type=int, default=3)
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the figures as JSON (- or no value: stdout)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.ray_passes < 1:
        p.error("--rounds, --repeats and --ray-passes must be at least 1 (--ray-cpus '' skips Ray Data)")
    quiet = args.json == "-"
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if quiet else (lambda s: print(s, flush=True))

    datas, names, shard = load_sample(args.sample)
    paths = args.paths.split(",")
    procs = [int(v) for v in args.procs.split(",")]
    say(f"{len(datas)} JPEGs from {shard}; {os.cpu_count()} CPUs; load average {loadavg()}")
    make_path("pil"), make_path("tensor")  # import torchvision before forking
    rates: dict[tuple[str, int], list[float]] = {(n, k): [] for n in paths for k in procs}  # per CPU-second
    walls: dict[tuple[str, int], list[float]] = {(n, k): [] for n in paths for k in procs}  # wall-clock, all procs
    loads = []
    for r in range(args.rounds):
        before = loadavg()
        order = paths if r % 2 == 0 else paths[::-1]
        for k in procs:
            for name in order:
                per_cpu_s, wall = run_cpu(name, k, datas, names, args.repeats, seed=100 * r)
                rates[(name, k)].append(per_cpu_s)
                walls[(name, k)].append(wall)
        loads.append({"round": r, "before": before, "after": loadavg()})
        say(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n}×{k} {rates[(n, k)][-1]:.0f}" for k in procs for n in paths)
            + f" img per CPU-s; load {before[0]:.2f} → {loads[-1]['after'][0]:.2f}")
    base = paths[0]
    result: dict = {"images": len(datas), "image_size": SIZE, "cpus": os.cpu_count(), "rounds": args.rounds,
                    "repeats": args.repeats, "torch": torch.__version__, "loadavg": loads, "cpu": {}, "ratio": {},
                    "ratio_wall": {}}
    for k in procs:
        for n in paths:
            result["cpu"][f"{n}/{k}proc"] = {"per_core": summary(rates[(n, k)]),
                                             "wall_per_core": summary([v / k for v in walls[(n, k)]])}
        for n in paths[1:]:
            # Paired by round (the two ran back to back): the ratio's spread says how much load moved.
            result["ratio"][f"{n}/{base}/{k}proc"] = summary([a / b for a, b in zip(rates[(n, k)], rates[(base, k)])])
            result["ratio_wall"][f"{n}/{base}/{k}proc"] = summary(
                [a / b for a, b in zip(walls[(n, k)], walls[(base, k)])])
    gpu = run_gpu(datas, args.repeats * 5)
    result["gpu"] = None if gpu is None else {"images_per_s": gpu, "device": torch.cuda.get_device_name()}
    result["ray_data"] = {}
    for c in [int(v) for v in args.ray_cpus.split(",") if v]:
        before = loadavg()
        result["ray_data"][f"{c}cpu"] = {**run_ray_data(shard, len(datas), c, args.ray_passes),
                                         "loadavg": {"before": before, "after": loadavg()}}
    result["loadavg_end"] = loadavg()

    say(f"\n{'path':<14}{'procs':>6}{'img per CPU-s: median':>23}{'min–max':>14}{'× ' + base:>8}{' (min–max)':<13}"
        f"{'wall img/s a proc':>19}{'× ' + base:>8}")
    for k in procs:
        for n in paths:
            c, w = result["cpu"][f"{n}/{k}proc"]["per_core"], result["cpu"][f"{n}/{k}proc"]["wall_per_core"]
            ratio, rw = result["ratio"].get(f"{n}/{base}/{k}proc"), result["ratio_wall"].get(f"{n}/{base}/{k}proc")
            say(f"{n:<14}{k:>6}{c['median']:>23.0f}{c['min']:>8.0f}–{c['max']:<5.0f}"
                + (f"{ratio['median']:>8.2f} ({ratio['min']:.2f}–{ratio['max']:.2f})" if ratio else " " * 21)
                + f"{w['median']:>19.0f}" + (f"{rw['median']:>8.2f}" if rw else ""))
    if gpu is not None:
        say(f"gpu (nvJPEG + crop/flip/normalise on {result['gpu']['device']}): {gpu:.0f} img/s")
    for key, v in result["ray_data"].items():
        say(f"ray data, {key}: median {v['median']:.0f} img/s wall ({v['min']:.0f}–{v['max']:.0f}), "
            f"{v['per_decode_cpu_s']['median']:.0f} img per CPU-s inside its decode tasks; decode tasks of "
            f"{v['decode_task_cpus']} CPU; load {v['loadavg']['before'][0]:.1f} → {v['loadavg']['after'][0]:.1f}")
    say(f"load average at the end: {result['loadavg_end']}")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
