"""Core benchmark: storage, latency and memory of the two-stage predictor against one network.

Prints, side by side in one run, for one backbone and input size:

* stored bytes per specialist / bytes of one network (real safetensors file sizes);
* two-stage latency / one vanilla forward, for hard routing, soft top-2 routing and hard routing
  with a shared trunk (deltas on layer4 only, so stem..layer3 run once);
* peak device memory of the two-stage predictor / one network (CUDA only: max_memory_allocated);
* time to materialise, apply and restore one delta.

Deltas are random (the benchmark measures cost, not accuracy), with the configured sparsity and
bit width. Examples::

    python benchmarks/core_bench.py --backbone resnet18 --image-size 64 --batch 256 --device cuda
    python benchmarks/core_bench.py --backbone resnet10 --width 0.5 --image-size 32 --batch 64
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from supersub.delta import DeltaConfig, add_delta, applied, export_delta, materialize
from supersub.hierarchy import Hierarchy, Subclass, Superclass
from supersub.models import ModelConfig, build_model, state_bytes
from supersub.predictor import RoutingConfig, TwoStagePredictor


def make_deltas(base, hierarchy, cfg: DeltaConfig, other: bool = True):
    deltas = {}
    for s, sup in enumerate(hierarchy.superclasses):
        spec = copy.deepcopy(base).cpu()
        layers = add_delta(spec, cfg, torch.nn.Linear(spec.num_features, len(sup.subclasses) + int(other)))
        with torch.no_grad():
            for d in layers:
                d.delta.normal_(0, 1e-3)
        deltas[s] = export_delta(spec, cfg, s)
    return deltas


@torch.no_grad()
def spread_routes(base, x: torch.Tensor) -> None:
    """Re-fits the random network's head so that the images of one batch route to many
    superclasses (an untrained network sends every image to the same one, the best case):
    logits = 10 · standardised features @ random directions."""
    feats = torch.flatten(base.avgpool(base.forward_stages(x)), 1)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    w = torch.randn(base.fc.out_features, feats.shape[1]) * 10 / feats.shape[1] ** 0.5
    base.fc.weight.copy_(w / std)
    base.fc.bias.copy_(-(w / std) @ mean)


def timed(fn, device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--superclasses", type=int, default=10)
    p.add_argument("--subclasses", type=int, default=20, help="subclasses per superclass")
    p.add_argument("--keep", type=float, default=0.05)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--mask", default="magnitude", choices=["magnitude", "random"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)

    h = Hierarchy("bench", tuple(
        Superclass(f"s{i}", f"s{i}", tuple(Subclass(f"s{i}c{j}", f"c{j}") for j in range(args.subclasses)))
        for i in range(args.superclasses)
    ))
    mcfg = ModelConfig(backbone=args.backbone, width=args.width)
    base = build_model(mcfg, h.num_subclasses, args.image_size).eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    spread_routes(base, x)
    net_bytes = state_bytes(base)
    full = DeltaConfig(keep=args.keep, bits=args.bits, mask=args.mask)
    late = DeltaConfig(keep=args.keep, bits=args.bits, mask=args.mask, stages=["layer4"])
    deltas_full, deltas_late = make_deltas(base, h, full), make_deltas(base, h, late)
    bytes_full = statistics.mean(d.nbytes for d in deltas_full.values())
    bytes_late = statistics.mean(d.nbytes for d in deltas_late.values())

    x = x.to(device)
    vanilla = copy.deepcopy(base).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        vanilla = vanilla.to(memory_format=torch.channels_last)

    def one_network():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            vanilla(x)

    pred = TwoStagePredictor(copy.deepcopy(base), h, deltas_full, "vanilla", device, amp=amp)
    pred_late = TwoStagePredictor(copy.deepcopy(base), h, deltas_late, "vanilla", device, amp=amp)
    hard, soft2 = RoutingConfig(mode="hard"), RoutingConfig(mode="soft", k=2)

    t_one = timed(one_network, device, args.repeats)
    t_hard = timed(lambda: pred.predict(x, hard), device, args.repeats)
    t_soft = timed(lambda: pred.predict(x, soft2), device, args.repeats)
    t_trunk = timed(lambda: pred_late.predict(x, hard), device, args.repeats)
    # How many distinct specialists one batch needed (see spread_routes).
    routed = int(pred.run(x, 1).routes.unique().numel())

    def apply_restore():
        m = materialize(deltas_full[0], device)
        with applied(pred.base, m):
            pass

    t_apply = timed(apply_restore, device, args.repeats)
    m_one = peak_bytes(one_network, device)
    m_two = peak_bytes(lambda: pred.predict(x, hard), device)

    fig = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backbone": args.backbone, "width": args.width, "image_size": args.image_size, "batch": args.batch,
        "superclasses": args.superclasses, "keep": args.keep, "bits": args.bits, "mask": args.mask,
        "network_bytes": net_bytes,
        "specialist_bytes_all_stages": bytes_full, "ratio_all_stages": bytes_full / net_bytes,
        "specialist_bytes_layer4": bytes_late, "ratio_layer4": bytes_late / net_bytes,
        "one_network_ms": 1e3 * t_one,
        "two_stage_hard_ms": 1e3 * t_hard, "hard_over_one": t_hard / t_one,
        "two_stage_soft2_ms": 1e3 * t_soft, "soft2_over_one": t_soft / t_one,
        "shared_trunk_hard_ms": 1e3 * t_trunk, "shared_trunk_over_one": t_trunk / t_one,
        "specialists_per_batch": routed,
        "apply_restore_ms": 1e3 * t_apply,
        "peak_mem_one_mb": None if m_one is None else m_one / 2**20,
        "peak_mem_two_stage_mb": None if m_two is None else m_two / 2**20,
        "mem_ratio": None if m_one is None else m_two / m_one,
    }
    print(f"device {fig['device']}  {args.backbone} x{args.width} @ {args.image_size}px  batch {args.batch}  "
          f"{args.superclasses} specialists, keep {args.keep}, {args.bits} bits, {args.mask} mask")
    print(f"  stored bytes / specialist      {bytes_full:>12,.0f}  = {fig['ratio_all_stages']:.4f} of one network "
          f"({net_bytes:,} B)   [layer4 only: {fig['ratio_layer4']:.4f}]")
    print(f"  one vanilla forward            {fig['one_network_ms']:>10.2f} ms")
    print(f"  two-stage hard                 {fig['two_stage_hard_ms']:>10.2f} ms  = {fig['hard_over_one']:.2f}x"
          f"   ({routed} specialists in the batch)")
    print(f"  two-stage soft top-2           {fig['two_stage_soft2_ms']:>10.2f} ms  = {fig['soft2_over_one']:.2f}x")
    print(f"  two-stage hard, shared trunk   {fig['shared_trunk_hard_ms']:>10.2f} ms  = {fig['shared_trunk_over_one']:.2f}x")
    print(f"  materialise+apply+restore      {fig['apply_restore_ms']:>10.2f} ms per delta")
    if m_one is not None:
        print(f"  peak device memory             {fig['peak_mem_two_stage_mb']:.1f} MiB vs {fig['peak_mem_one_mb']:.1f} MiB"
              f"  = {fig['mem_ratio']:.3f}x")
    else:
        print("  peak device memory             n/a on CPU (CUDA max_memory_allocated only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return fig


if __name__ == "__main__":
    main()
