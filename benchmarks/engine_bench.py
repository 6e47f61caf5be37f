"""The serving engine at a model's real shape: what it holds, by component, and what routing
costs against one forward.

By default the paper's shape: ResNet-50 × 1.0 at 224 px, paper10's 10 superclasses (277
classes), the paper's own generalist resident, deltas at ``jobs/configs/imagenet_paper10.yaml``'s
stages (every stage), keep, bits and BatchNorm setting, each specialist with its "other" output
when the config trains with negatives — random values in the real stored format (the script
measures cost, not accuracy) — and a batch of 32 whose images route to every superclass. The
engine runs with its serving defaults (:class:`supersub.predictor.TwoStagePredictor`'s
``cache_bytes``: each routed group's delta decoded on the device just before the group).

It prints and (``--json FILE``) writes:

* **memory counted by the engine** — :meth:`TwoStagePredictor.resident_bytes` by component
  (network, deltas as held, decoded deltas kept, one group's decode working set) + the largest
  activation set of a hard prediction (:func:`supersub.cost.activation_peak_bytes`), against one
  forward's network + largest activation set; the deltas as held against their stored bytes;
* **latency**, every model timed once a round, interleaved (A B C ...), for ``--rounds``
  rounds: one forward, the same network again (the control), hard routing, hard routing with
  every decoded delta kept (what decoding per group costs), soft top-2 routing, and one delta's
  decode and add-and-restore; each ratio the median of its per-round ratios with its spread
  (interquartile range / median), the load average before and after; a ratio the work rules out
  (a two-stage prediction faster than one forward, the control far from 1) is printed as
  unreliable, never as a result;
* with ``--device cuda``, ``torch.cuda.max_memory_allocated`` beside the count: what building
  the model allocated plus the peak a prediction added over that, for one forward and the engine.

    OMP_NUM_THREADS=2 python benchmarks/engine_bench.py --device cpu --json OUT.json # the paper's shape, CPU
    python benchmarks/engine_bench.py --device cuda --json OUT.json                  # the same on a GPU
    python benchmarks/engine_bench.py --hierarchy synthetic:11x18 --backbone resnet10 --width 0.5 \\
        --stem auto --image-size 32 --batch 64 --stages layer4 --resident vanilla   # core_bench's CPU shape
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_bench import make_deltas, spread_routes  # noqa: E402  (the sibling script's helpers)

from supersub.config import load_config  # noqa: E402
from supersub.cost import activation_peak_bytes, interleaved, load_average, median_ms, ratio  # noqa: E402
from supersub.delta import DeltaConfig  # noqa: E402
from supersub.hierarchy import Hierarchy, Subclass, Superclass, load_hierarchy  # noqa: E402
from supersub.pipeline_config import PipelineConfig  # noqa: E402
from supersub.predictor import TwoStagePredictor  # noqa: E402
from supersub.resnet import ModelConfig, build_model, state_bytes  # noqa: E402
from supersub.routing import HARD, Routing  # noqa: E402


def hierarchy(spec: str) -> Hierarchy:
    """``synthetic:SxC`` (S superclasses of C classes) or any name :func:`load_hierarchy` knows."""
    if spec.startswith("synthetic:"):
        s, c = (int(v) for v in spec.split(":", 1)[1].split("x"))
        return Hierarchy("bench", tuple(
            Superclass(f"s{i}", f"s{i}", tuple(Subclass(f"s{i}c{j}", f"c{j}") for j in range(c))) for i in range(s)))
    return load_hierarchy(spec)


def cuda_cost(build, run, device) -> tuple[int, int, object]:
    """``(bytes build() left allocated, peak bytes run(obj) added over them, obj)``, by the CUDA
    allocator; ``run`` once untimed first, so cuDNN's workspaces are the steady state's."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    obj = build()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - before
    run(obj)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    run(obj)
    torch.cuda.synchronize(device)
    return held, torch.cuda.max_memory_allocated(device) - start, obj


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/imagenet_paper10.yaml",
                   help="the pipeline config whose delta (stages, keep, bits, bn), specialist negatives and "
                        "image size the engine gets")
    p.add_argument("--hierarchy", default=None, help="default: the config's (paper10); or synthetic:SxC")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--stem", default=None, help="imagenet, small or auto; default: the config's")
    p.add_argument("--image-size", type=int, default=None, help="default: the config's")
    p.add_argument("--stages", nargs="+", default=None, help="delta stages; default: the config's")
    p.add_argument("--keep", type=float, default=None, help="default: the config's")
    p.add_argument("--bits", type=int, default=None, help="default: the config's")
    p.add_argument("--resident", choices=["generalist", "vanilla"], default=None,
                   help="default: generalist for generalist.kind=own, else vanilla")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--soft-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds: every model timed once a round")
    p.add_argument("--device", default="auto", help="cpu, cuda, ...; auto: cuda when there is one")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config)
    h = hierarchy(args.hierarchy or cfg.data.hierarchy)
    size = args.image_size or cfg.data.image_size
    delta_cfg = DeltaConfig(**{**{k: getattr(cfg.delta, k) for k in ("method", "stages", "keep", "bits", "bn", "mask")},
                               **{k: v for k, v in (("stages", args.stages), ("keep", args.keep), ("bits", args.bits))
                                  if v is not None}})
    resident = args.resident or cfg.generalist.resident
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    cuda = device.type == "cuda"

    t0 = time.perf_counter()
    torch.manual_seed(0)
    outputs = h.num_superclasses if resident == "generalist" else h.num_subclasses
    model_cfg = ModelConfig(backbone=args.backbone, width=args.width, stem=args.stem or cfg.model.stem)
    base = build_model(model_cfg, outputs, size).eval()
    x_cpu = torch.randn(args.batch, 3, size, size)
    spread_routes(base, x_cpu)
    deltas = make_deltas(base, h, delta_cfg)  # heads of n_sub + 1: the "other" output (specialist.negatives)
    stored = [d.nbytes for d in deltas.values()]
    net_bytes = state_bytes(base)
    x = x_cpu.to(device)
    setup_s = time.perf_counter() - t0

    def forward_of(net):
        def run(_=None):
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                net(x)
        return run

    def engine(**kw):
        return TwoStagePredictor(copy.deepcopy(base), h, deltas, resident, device, amp=amp, **kw)

    measured: dict[str, int] = {}
    if cuda:
        held, peak, net = cuda_cost(lambda: copy.deepcopy(base).to(device), lambda n: forward_of(n)(), device)
        measured.update(one_network_held=held, one_network_peak=peak)
        held, peak, pred = cuda_cost(engine, lambda e: e.predict(x, HARD), device)
        measured.update(engine_held=held, engine_peak=peak)
    else:
        net, pred = copy.deepcopy(base).to(device), engine()
    control = copy.deepcopy(net)
    kept = engine(cache_bytes=1 << 40)  # every decoded delta kept: prices the decoding
    soft = Routing("soft", min(args.soft_k, h.num_superclasses))
    s0 = max(pred.deltas, key=lambda s: pred.deltas[s].nnz)
    buf = pred.layout.buffer

    def add_and_restore():
        d = pred.deltas[s0].decode()
        orig = buf.index_select(0, d.positions)
        buf.scatter_(0, d.positions, d.values.add_(orig))
        buf.scatter_(0, d.positions, orig)

    models = {
        "one_network": forward_of(net),
        "one_network_copy": forward_of(control),
        "hard": lambda: pred.predict(x, HARD),
        "hard_kept": lambda: kept.predict(x, HARD),
        "soft": lambda: pred.predict(x, soft),
        "decode_one_delta": pred.deltas[s0].decode,
        "decode_add_restore_one_delta": add_and_restore,
    }
    load_before = load_average()
    times = interleaved(models, rounds=args.rounds, warmup=1, device=device)
    load_after = load_average()
    routed = int(pred.run(x_cpu, 1).routes.unique().numel())
    ratios = {
        "latency_ratio_control": ratio(times, "one_network_copy", "one_network", near=1.0, why="the same network"),
        "latency_ratio_hard": ratio(times, "hard", "one_network", at_least=1.0),
        "latency_ratio_soft": ratio(times, "soft", "one_network", at_least=1.0),
        "latency_cost_of_decoding": ratio(times, "hard", "hard_kept", why="decoded per group vs kept"),
    }
    if not ratios["latency_ratio_control"].reliable:
        for key, r in ratios.items():
            if key != "latency_ratio_control" and r.reliable:
                r.reliable, r.why = False, f"the control failed: {ratios['latency_ratio_control'].why}"

    held = pred.resident_bytes()
    engine_count = {**held, "largest_activation_set": activation_peak_bytes(pred.base, lambda: pred.predict(x, HARD))}
    one_count = net_bytes + activation_peak_bytes(net, forward_of(net))
    fig = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "config": args.config, "hierarchy": h.name, "superclasses": h.num_superclasses,
        "subclasses": h.num_subclasses, "backbone": args.backbone, "width": args.width, "image_size": size,
        "batch": args.batch, "resident": resident, "delta": {"stages": delta_cfg.stages, "keep": delta_cfg.keep,
                                                             "bits": delta_cfg.bits, "bn": delta_cfg.bn},
        "setup_s": setup_s, "network_bytes": net_bytes, "stored_bytes_per_specialist": statistics.mean(stored),
        "stored_deltas_bytes": sum(stored), "held_deltas_bytes": held["deltas"],
        "engine_bytes": engine_count, "engine_bytes_one_network": one_count,
        "engine_memory_ratio": sum(engine_count.values()) / one_count,
        "load_average": [load_before, load_after], "rounds": args.rounds, "specialists_per_batch": routed,
        **{f"{name}_ms": median_ms(t) for name, t in times.items()},
        **{key: r.value for key, r in ratios.items()},
        "latency": {key: r.to_dict() for key, r in ratios.items()},
    }
    if cuda:
        fig["cuda_allocated"] = measured
        fig["cuda_memory_ratio"] = ((measured["engine_held"] + measured["engine_peak"])
                                    / (measured["one_network_held"] + measured["one_network_peak"]))

    mib = 2**20
    print(f"device {fig['device']} ({fig['threads']} threads)  {args.backbone} x{args.width} @ {size}px  batch "
          f"{args.batch}, {h.name}: {h.num_superclasses} specialists ({routed} in the batch), {resident} resident, "
          f"deltas on {','.join(delta_cfg.stages)} at keep {delta_cfg.keep}, {delta_cfg.bits} bits, bn {delta_cfg.bn} "
          f"(setup {setup_s:.0f} s)")
    print(f"  memory counted by the engine: {sum(engine_count.values()) / mib:.1f} MiB vs {one_count / mib:.1f} MiB "
          f"for one forward = {fig['engine_memory_ratio']:.3f}x")
    print("    " + ", ".join(f"{k} {v / mib:.2f}" for k, v in engine_count.items()) + " MiB")
    print(f"    one forward: network {net_bytes / mib:.2f} + largest activation set {(one_count - net_bytes) / mib:.2f} MiB")
    print(f"    deltas held {held['deltas'] / mib:.2f} MiB vs stored {sum(stored) / mib:.2f} MiB "
          f"({statistics.mean(stored) / net_bytes:.4f} of one network per specialist)")
    if cuda:
        print(f"  CUDA allocator: one forward {measured['one_network_held'] / mib:.1f} held + "
              f"{measured['one_network_peak'] / mib:.1f} peak; engine {measured['engine_held'] / mib:.1f} held + "
              f"{measured['engine_peak'] / mib:.1f} peak = {fig['cuda_memory_ratio']:.3f}x")
    print(f"  latency: median of {args.rounds} interleaved rounds; load average {load_before:.2f} -> {load_after:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"  {'one forward':<40}{median_ms(times['one_network']):>10.2f} ms")
    labels = {"latency_ratio_control": ("control: the same network again", "one_network_copy"),
              "latency_ratio_hard": ("hard (serving default)", "hard"),
              "latency_ratio_soft": (f"soft top-{soft.k} (serving default)", "soft"),
              "latency_cost_of_decoding": ("hard / hard with every delta kept", "hard")}
    for key, (label, model) in labels.items():
        r = ratios[key]
        shown = f"{r.measured:.3f}x" if r.reliable else f"unreliable ({r.measured:.3f}x: {r.why})"
        print(f"  {label:<40}{median_ms(times[model]):>10.2f} ms  {shown}  spread {100 * r.spread:.0f}%")
    print(f"  {'hard, every decoded delta kept':<40}{median_ms(times['hard_kept']):>10.2f} ms")
    print(f"  one delta ({pred.deltas[s0].nnz:,} entries): decode {median_ms(times['decode_one_delta']):.2f} ms, "
          f"decode + add + restore {median_ms(times['decode_add_restore_one_delta']):.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return fig


if __name__ == "__main__":
    main()
