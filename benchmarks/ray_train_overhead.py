"""What Ray costs the training stages, measured in one run on one device.

1. Throughput: the generalist stage (a ``NetworkTask`` of target ``coarse``) in
   plain PyTorch in this process (``LocalRunner``), then the same task as a Ray Train run (``jobs.runner.RayRunner``,
   one worker holding the same CPUs/GPU), alternating for ``--rounds``. Images/s is the stage's
   own per-epoch figure (the training loop only: no Ray start-up) over epochs 2..E; the median,
   and the best epoch (the one least disturbed on a shared machine). Target: Ray/plain >= 0.95.
2. Fan-out: N specialists as concurrent Ray Train runs, then each alone, same resources per run.
   Wall time includes each run's start-up. Target: concurrent / slowest single <= 1.2 when the
   machine holds N runs at once ("enough resources": N x cpus_per_specialist <= CPUs, or
   fractional GPUs that fit), which on a 2-core machine means N=2 with 1 CPU each.

    python benchmarks/ray_train_overhead.py                      # Ray on all CPUs, generalist on 1, N=2
    python benchmarks/ray_train_overhead.py --cpus 8 --train-cpus 4 --specialists 4 --specialist-cpus 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    p.add_argument("--train-cpus", type=int, default=1,
                   help="CPUs (= torch threads) of the generalist, in both loops; 1 is robust on a shared machine, "
                        "where OpenMP threads waiting for each other distort timings")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="plain / Ray rounds of the throughput comparison")
    p.add_argument("--per-class", type=int, default=150, help="synthetic images per class (4 x 5 classes)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--specialists", type=int, default=2, help="N concurrent specialists (<= superclasses)")
    p.add_argument("--specialist-cpus", type=float, default=1.0)
    p.add_argument("--specialist-epochs", type=int, default=3)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    # The same intra-op threads for both loops: Ray sets OMP_NUM_THREADS to a worker's CPUs.
    os.environ["OMP_NUM_THREADS"] = str(args.train_cpus)

    import ray
    import torch

    from jobs.runner import RayRunner
    from supersub.config import load_config
    from supersub.pipeline import (
        PipelineConfig,
        data_options,
        network_task,
        prepare_data,
        train_base_networks,
    )
    from supersub.runner import LocalRunner
    from supersub.stages import specialist_tasks

    torch.set_num_threads(args.train_cpus)
    work = Path(args.out or tempfile.mkdtemp(prefix="ray-overhead-"))
    cuda = torch.cuda.is_available()
    cfg = load_config(PipelineConfig, None, [
        f"data.source=synthetic:superclasses=4,subclasses=5,per_class={args.per_class},size={args.image_size}",
        f"data.image_size={args.image_size}", "data.num_workers=1", "generalist.kind=own",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        f"specialist.optim={{epochs: {args.specialist_epochs}, batch_size: {args.batch_size}, lr: 0.02, "
        "warmup_epochs: 0.0, weight_decay: 0.0}",
        f"resources.cpus_per_worker={args.train_cpus}", f"resources.gpus_per_worker={1 if cuda else 0}",
        f"resources.specialist_cpus={args.specialist_cpus}",
        f"resources.specialist_gpus={1 / args.specialists if cuda else 0}", "tracking.enabled=false",
    ])
    plain_runner = LocalRunner("auto", log=lambda s: None)
    print(f"device: {plain_runner.device}; Ray {args.cpus} CPUs; generalist {args.train_cpus} CPU(s) = torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; work folder {work}", flush=True)
    data = data_options(cfg, prepare_data(cfg, work, log=lambda s: None))

    def rates(result) -> list[float]:
        per_epoch = [row["images_per_s"] for row in result["history"]]
        return per_epoch[1:] or per_epoch  # epoch 1 warms up caches and allocators

    # 1. the generalist stage, alternating plain PyTorch and Ray Train (each round in a fresh folder,
    # so nothing resumes): drift in the machine's load then hits both alike.
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    runner = RayRunner(cfg.resources, work, log=lambda s: None)
    plain, on_ray = [], []
    for r in range(args.rounds):
        plain += rates(plain_runner.run([network_task("generalist", "coarse", cfg, data, work / f"plain{r}")])[0])
        on_ray += rates(runner.run([network_task("generalist", "coarse", cfg, data, work / f"ray{r}")])[0])
    med_p, med_r = statistics.median(plain), statistics.median(on_ray)
    print(f"generalist stage, plain PyTorch: median {med_p:6.0f}, best {max(plain):6.0f} images/s "
          f"(epochs 2-{args.epochs} of {args.rounds} rounds)")
    print(f"generalist stage, Ray Train:     median {med_r:6.0f}, best {max(on_ray):6.0f} images/s")
    print(f"ratio Ray Train / plain:         median {med_r / med_p:6.3f}, best {max(on_ray) / max(plain):6.3f}"
          "   (target >= 0.95)", flush=True)

    # 2. N specialists at once, then each alone (fresh output folders: nothing is skipped)
    base = train_base_networks(cfg, work / "base", runner, log=lambda s: None)

    def specialists(folder: str, which: list[int]) -> float:
        tasks = [t for t in specialist_tasks(cfg, base, work / folder) if t.superclass in which]
        t0 = time.perf_counter()
        runner.run(tasks)
        return time.perf_counter() - t0

    n = args.specialists
    together = specialists("together", list(range(n)))
    alone = [specialists(f"alone{s}", [s]) for s in range(n)]
    print(f"specialists: {n} concurrent ({args.specialist_cpus:g} CPU each): {together:6.1f} s wall; "
          f"alone: {', '.join(f'{a:.1f}' for a in alone)} s")
    print(f"ratio concurrent / slowest single: {together / max(alone):6.3f}   (target <= 1.2)")
    print(f"ratio concurrent / one after another: {together / sum(alone):6.3f}   (1/N = perfect overlap)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
