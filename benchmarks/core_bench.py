"""Core benchmark: what the two-stage predictor costs against one network, side by side in one run.

For one backbone and input size, with random deltas of the configured sparsity and bit width (the
script measures cost, not accuracy) and a batch whose images go to every superclass (the worst
case for routed groups), it prints and (``--json FILE``) writes:

* ``specialist_bytes_ratio`` — stored bytes of one specialist (the real safetensors file) / one network;
* ``latency_ratio_hard`` / ``latency_ratio_soft`` — two-stage hard and soft top-2 routing, deltas
  on every stage, against one vanilla forward on the same batch;
* ``latency_ratio_shared_trunk`` — hard routing with deltas on ``layer4`` only: stem..layer3 run
  once for both stages;
* ``flops_ratio_hard`` / ``flops_ratio_soft`` / ``flops_ratio_shared_trunk`` — FLOPs of those
  predictions (``torch.utils.flop_counter.FlopCounterMode`` over the whole batch) / one forward;
* ``peak_memory_ratio`` — memory of a shared-trunk hard prediction / one forward, **counted by
  the engine** with its serving defaults: what :meth:`TwoStagePredictor.resident_bytes` reports
  (resident weights, the deltas as held, decoded deltas kept, one routed group's decode working
  set) + the largest activation set (:func:`supersub.cost.activation_peak_bytes`) — the same on
  every run; beside it
  ``rss_peak_ratio``, the process's peak resident-set increase (each in a fresh process,
  ``--memory-probe``; on CUDA ``torch.cuda.max_memory_allocated``), which a busy allocator moves;
* ``resident_bytes_ratio`` — what the predictor keeps (network + packed deltas) / one network;
* ``latency_cost_of_decoding`` — the shared-trunk hard prediction with its serving defaults
  (each routed group's delta decoded just before the group) against the same with every decoded
  delta kept;
* ``latency_ratio_trunk_router`` / ``flops_ratio_trunk_router`` — hard routing with the trunk
  router (``generalist.kind=trunk_router``): stage one is stem..layer3 + the router head, then
  only the routed specialist's ``layer4`` (deltas on ``layer4``).

**Timings that hold on a busy machine.** Every model is timed once per round, interleaved
(A B C A B C ...), for ``--rounds`` rounds; a ratio is the median of the per-round ratios, with
its spread (interquartile range / median, in ``latency``), and the load average is recorded. A
ratio the work rules out — a two-stage model faster than one forward (its stage one *is* one
forward), or the control (the same network timed twice, ``latency_ratio_control``) far from 1 —
is written as ``null`` with ``latency[key].why``, and printed as unreliable, never as a result.

To add a model: a callable in ``models`` (in :func:`main`) and a :class:`Pair` in ``PAIRS``
(its key, what it is measured against, what it contains); the FLOPs column reads ``flops``.

    python benchmarks/core_bench.py --backbone resnet10 --width 0.5 --image-size 32 --batch 64 \\
        --superclasses 11 --subclasses 18 --json OUT.json
    python benchmarks/core_bench.py --backbone resnet18 --image-size 64 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from supersub.cost import (
    Ratio,
    activation_peak_bytes,
    count_flops,
    interleaved,
    load_average,
    median_ms,
    ratio,
)
from supersub.delta import DeltaConfig, PackedDelta, add_delta, export_delta
from supersub.hierarchy import Hierarchy, Subclass, Superclass
from supersub.predictor import TwoStagePredictor
from supersub.resnet import ModelConfig, build_model, state_bytes
from supersub.routing import HARD, Routing
from supersub.trunk_router import router_spec


def setup(args) -> tuple[Hierarchy, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    h = Hierarchy("bench", tuple(
        Superclass(f"s{i}", f"s{i}", tuple(Subclass(f"s{i}c{j}", f"c{j}") for j in range(args.subclasses)))
        for i in range(args.superclasses)
    ))
    base = build_model(ModelConfig(backbone=args.backbone, width=args.width), h.num_subclasses, args.image_size).eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    spread_routes(base, x)
    return h, base, x


def make_deltas(base, hierarchy, cfg: DeltaConfig) -> dict[int, PackedDelta]:
    deltas = {}
    for s, sup in enumerate(hierarchy.superclasses):
        spec = copy.deepcopy(base).cpu()
        layers = add_delta(spec, cfg, torch.nn.Linear(spec.num_features, len(sup.subclasses) + 1))
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


@dataclass(frozen=True)
class Pair:
    """One reported latency ratio: ``model`` against ``base`` (both keys of ``models``).

    ``contains``: a timed model whose work ``model`` includes (its stage one), so ``model /
    contains`` below 1 is a measurement error; ``at_least`` / ``near``: what the work allows for
    ``model / base`` itself."""

    key: str
    model: str
    label: str
    base: str = "one_network"
    contains: str | None = None
    at_least: float | None = None
    near: float | None = None


PAIRS = [
    # A two-stage prediction runs one whole vanilla forward (stage one) and then the specialists.
    Pair("latency_ratio_hard", "two_stage_hard", "two-stage, hard", contains="stage_one", at_least=1.0),
    Pair("latency_ratio_soft", "two_stage_soft2", "two-stage, soft top-2", contains="stage_one", at_least=1.0),
    Pair("latency_ratio_shared_trunk", "shared_trunk_hard", "two-stage, hard, shared trunk", contains="stage_one",
         at_least=1.0),
    # The trunk router: stage one is the trunk (stem..layer3) + a small head, then only the routed
    # specialist's layer4: every conv of one forward, plus the router's, plus the delta scatters.
    Pair("latency_ratio_trunk_router", "trunk_router_hard", "two-stage, hard, trunk router",
         contains="trunk_router_stage_one", at_least=1.0),
    # The control: a copy of the same network. Far from 1, nothing this run timed can be trusted.
    Pair("latency_ratio_control", "one_network_copy", "control: the same network again", near=1.0),
    # Decoding each routed group's delta just before the group, against keeping them all decoded.
    Pair("latency_cost_of_decoding", "shared_trunk_hard", "shared trunk, decoded per group", base="shared_trunk_kept"),
]


def latency_ratios(times: dict[str, list[float]], pairs: list[Pair] = PAIRS) -> dict[str, Ratio]:
    """Every pair's :class:`Ratio`, each checked against the work (``contains``, ``at_least``,
    ``near``) and all of them against the control."""
    out = {}
    for p in pairs:
        if p.model not in times or p.base not in times:
            continue
        r = ratio(times, p.model, p.base, at_least=p.at_least, near=p.near, why=f"{p.model} vs {p.base}")
        if r.reliable and p.contains:
            part = ratio(times, p.model, p.contains, at_least=1.0, max_spread=float("inf"),
                         why=f"{p.model} includes {p.contains}")
            if not part.reliable:
                r.reliable, r.why = False, part.why
        out[p.key] = r
    control = out.get("latency_ratio_control")
    if control is not None and not control.reliable:
        for key, r in out.items():
            if key != "latency_ratio_control" and r.reliable:
                r.reliable, r.why = False, f"the control failed: {control.why}"
    return out


@torch.no_grad()
def time_breakdown(pred: TwoStagePredictor, x: torch.Tensor, device, repeats: int) -> dict[str, float]:
    """Where a hard prediction's time goes: stage one, the routed groups, one group's forward, its
    delta's decode and its add-and-restore, and the delta stages on the whole batch at once (what
    the groups would cost with no per-group overhead)."""
    from supersub.resnet import STAGES
    from supersub.routing import plan

    trunk, sup, _ = pred.stage1(x)
    p = plan(sup, HARD)
    s, (b, _) = max(p.calls.items(), key=lambda kv: kv[1][0].numel())
    d = pred.deltas[s].decode()
    buf = pred.layout.buffer

    def patch() -> None:
        orig = buf.index_select(0, d.positions)
        buf.scatter_(0, d.positions, orig + d.values)
        buf.scatter_(0, d.positions, orig)

    def group() -> None:
        pred.base.forward_head(pred.base.forward_stages_with(trunk[b], pred.first_stage, len(STAGES), {}, d.bn), d.head)

    times = interleaved({
        "stage one": lambda: pred.stage1(x),
        f"{len(p.calls)} routed groups": lambda: pred.specialists(trunk, p),
        f"one group of {b.numel()}: forward": group,
        "one group: decode its delta": pred.deltas[s].decode,
        "one group: add and restore its delta": patch,
        "delta stages on the whole batch":
            lambda: pred.base.forward_head(pred.base.forward_stages(trunk, pred.first_stage, len(STAGES))),
    }, rounds=repeats, device=device)
    return {k: median_ms(v) for k, v in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_increase(fn, device) -> int:
    """Peak memory ``fn()`` adds: CUDA allocator bytes, or the process's resident set (sampled
    every millisecond) over what it held before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    stop.set()
    t.join()
    return max(peak[0], _rss()) - before


def memory_probe(args) -> None:
    """In a fresh process: the peak memory of loading and running one model (``--memory-probe``)."""
    device = torch.device(args.device)
    h, base, x = setup(args)
    x = x.to(device)
    folder = Path(args.deltas)
    base.load_state_dict(torch.load(folder / "base.pt", weights_only=True))

    def one() -> None:
        net = copy.deepcopy(base).to(device)
        with torch.no_grad():
            net(x)

    def two() -> None:  # the packed deltas read are the predictor's alone: it keeps its own form of them
        TwoStagePredictor(copy.deepcopy(base), h, {int(p.stem): PackedDelta.from_bytes(p.read_bytes())
                                                   for p in folder.glob("*.safetensors")}, "vanilla", device).predict(x, HARD)

    one()  # allocator and kernels warmed with the same shapes in both probes
    print(json.dumps({"peak": peak_increase(one if args.memory_probe == "one" else two, device)}))


def probe(args, which: str, folder: Path) -> int:
    cmd = [sys.executable, __file__, "--memory-probe", which, "--deltas", str(folder), "--device", args.device,
           "--backbone", args.backbone, "--width", str(args.width), "--image-size", str(args.image_size),
           "--batch", str(args.batch), "--superclasses", str(args.superclasses), "--subclasses", str(args.subclasses)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--superclasses", type=int, default=10)
    p.add_argument("--subclasses", type=int, default=20, help="subclasses per superclass")
    p.add_argument("--keep", type=float, default=0.05)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--router-width", type=float, default=0.5, help="the trunk router's conv, x the trunk's channels")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", "--repeats", dest="repeats", type=int, default=15,
                   help="interleaved rounds: every model timed once a round")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--memory-probe", choices=["one", "two"], help=argparse.SUPPRESS)
    p.add_argument("--deltas", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory_probe:
        memory_probe(args)
        return {}
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    h, base, x = setup(args)
    net_bytes = state_bytes(base)
    full = make_deltas(base, h, DeltaConfig(keep=args.keep, bits=args.bits))
    late = make_deltas(base, h, DeltaConfig(keep=args.keep, bits=args.bits, stages=["layer4"]))
    bytes_full = statistics.mean(d.nbytes for d in full.values())
    x = x.to(device)
    vanilla = copy.deepcopy(base).to(device)

    def one_network():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            vanilla(x)

    # The serving defaults (deltas held packed, each decoded just before its routed group), and
    # the same shared-trunk engine with every decoded delta kept, which prices the decoding.
    pred = TwoStagePredictor(copy.deepcopy(base), h, full, "vanilla", device, amp=amp)
    pred_late = TwoStagePredictor(copy.deepcopy(base), h, late, "vanilla", device, amp=amp)
    pred_kept = TwoStagePredictor(copy.deepcopy(base), h, late, "vanilla", device, amp=amp, cache_bytes=1 << 34)
    # generalist.kind=trunk_router: the router head on the layer3 trunk, the same layer4 deltas.
    router = router_spec(base, 4, args.image_size, args.router_width, h.num_superclasses).build()
    pred_router = TwoStagePredictor(copy.deepcopy(base), h, late, "vanilla", device, amp=amp, router=router)
    soft2 = Routing("soft", 2)
    copy_net = copy.deepcopy(vanilla)

    def one_network_copy():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            copy_net(x)

    # Every timed model; PAIRS says which ratios are reported and what the work allows.
    models = {
        "one_network": one_network,
        "one_network_copy": one_network_copy,
        "stage_one": lambda: pred_late.stage1(x),
        "two_stage_hard": lambda: pred.predict(x, HARD),
        "two_stage_soft2": lambda: pred.predict(x, soft2),
        "shared_trunk_hard": lambda: pred_late.predict(x, HARD),
        "shared_trunk_kept": lambda: pred_kept.predict(x, HARD),
        "trunk_router_stage_one": lambda: pred_router.stage1(x),
        "trunk_router_hard": lambda: pred_router.predict(x, HARD),
    }
    load_before = load_average()
    times = interleaved(models, rounds=args.repeats, warmup=2, device=device)
    load_after = load_average()
    ratios = latency_ratios(times)
    routed = int(pred.run(x, 1).routes.unique().numel())
    breakdown = time_breakdown(pred_late, x, device, args.repeats)
    flops = {name: count_flops(fn) for name, fn in models.items()}
    # Memory counted by the engine (serving defaults): what it holds, and its largest activation set.
    engine_one = net_bytes + activation_peak_bytes(vanilla, one_network)
    engine_two = {**pred_late.resident_bytes(),
                  "largest_activation_set": activation_peak_bytes(pred_late.base, lambda: pred_late.predict(x, HARD))}
    with tempfile.TemporaryDirectory(prefix="core-bench-") as tmp:
        torch.save(base.state_dict(), Path(tmp) / "base.pt")
        for s, d in late.items():
            (Path(tmp) / f"{s}.safetensors").write_bytes(d.to_bytes())
        m_one, m_two = probe(args, "one", Path(tmp)), probe(args, "two", Path(tmp))

    fig = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "backbone": args.backbone, "width": args.width, "image_size": args.image_size, "batch": args.batch,
        "superclasses": args.superclasses, "subclasses": args.subclasses, "keep": args.keep, "bits": args.bits,
        "network_bytes": net_bytes, "specialist_bytes": bytes_full,
        "specialist_bytes_ratio": bytes_full / net_bytes,
        "specialist_bytes_ratio_layer4": statistics.mean(d.nbytes for d in late.values()) / net_bytes,
        "resident_bytes_ratio": (net_bytes + sum(d.nbytes for d in late.values())) / net_bytes,
        "load_average": [load_before, load_after], "rounds": args.repeats,
        **{f"{name}_ms": median_ms(t) for name, t in times.items()},
        # A ratio is null when unreliable; latency[key] has the measured value, spread and why.
        **{key: r.value for key, r in ratios.items()},
        "latency": {key: r.to_dict() for key, r in ratios.items()},
        **{f"flops_{p.key[len('latency_'):]}": flops[p.model] / flops[p.base] for p in PAIRS
           if p.key.startswith("latency_ratio")},
        "specialists_per_batch": routed,
        "breakdown_ms_shared_trunk": breakdown,
        "engine_bytes_one_network": engine_one, "engine_bytes_shared_trunk": engine_two,
        "peak_memory_ratio": sum(engine_two.values()) / engine_one,
        "rss_peak_one_network_mb": m_one / 2**20, "rss_peak_shared_trunk_mb": m_two / 2**20,
        "rss_peak_ratio": m_two / m_one,
    }
    print(f"device {fig['device']} ({fig['threads']} threads)  {args.backbone} x{args.width} @ {args.image_size}px  "
          f"batch {args.batch}, {args.superclasses} specialists of {args.subclasses} classes ({routed} in the batch), "
          f"keep {args.keep}, {args.bits} bits")
    print(f"  stored bytes / specialist      {bytes_full:>12,.0f}  = {fig['specialist_bytes_ratio']:.4f} of one network "
          f"({net_bytes:,} B)   [layer4 only: {fig['specialist_bytes_ratio_layer4']:.4f}]")
    print(f"  latency: median of {args.repeats} interleaved rounds; load average {load_before:.2f} -> {load_after:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"  {'':33}{'ms':>9}{'latency':>11}{'spread':>8}{'FLOPs':>8}   (x one vanilla forward)")
    print(f"  {'one vanilla forward':<33}{median_ms(times['one_network']):>9.2f}{1:>10.2f}x{'':>8}{1:>7.2f}x")
    for p in PAIRS:
        r = ratios[p.key]
        shown = f"{r.measured:>10.2f}x" if r.reliable else f"{'unreliable':>11}"
        against = "" if p.base == "one_network" else f"   (x {p.base}, {median_ms(times[p.base]):.2f} ms)"
        print(f"  {p.label:<33}{median_ms(times[p.model]):>9.2f}{shown}{100 * r.spread:>7.0f}%"
              f"{flops[p.model] / flops[p.base]:>7.2f}x" + against + (f"   ({r.why})" if not r.reliable else ""))
    print("  shared trunk, where the time goes (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))
    print(f"  memory (shared trunk, hard), counted by the engine: {sum(engine_two.values()) / 2**20:.2f} MiB vs "
          f"{engine_one / 2**20:.2f} MiB for one forward = {fig['peak_memory_ratio']:.3f}x "
          f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in engine_two.items())} MiB)")
    print(f"  peak {'CUDA allocator' if device.type == 'cuda' else 'RSS'} increase: {fig['rss_peak_shared_trunk_mb']:.1f} MiB "
          f"vs {fig['rss_peak_one_network_mb']:.1f} MiB = {fig['rss_peak_ratio']:.3f}x (moves with the allocator and the load)")
    print(f"  resident (network + packed layer4 deltas) = {fig['resident_bytes_ratio']:.3f} networks")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return fig


if __name__ == "__main__":
    main()
