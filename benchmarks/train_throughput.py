"""Training throughput of one network and of one specialist (resident + delta), same loop.

Measures images/s of ``supersub.train.train_one_epoch`` on synthetic tensors already on the
device (so the figure is the model's, not the loader's), for a full network and for a specialist
with its parametrised sparse quantised delta — the cost QAT and masking add per step.

    python benchmarks/train_throughput.py --backbone resnet18 --image-size 64 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from supersub.delta import DeltaConfig, PruningSchedule, add_delta, set_train_mode
from supersub.models import ModelConfig, build_model
from supersub.train import OptimConfig, build_optimizer, build_scheduler, train_one_epoch, use_channels_last


def batches(n: int, batch: int, size: int, classes: int, device: torch.device):
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return [(x, y)] * n


def throughput(model: nn.Module, cfg: OptimConfig, device: torch.device, data, hook=None, mode=None) -> dict:
    if use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(data))
    loss = nn.CrossEntropyLoss()
    (mode or (lambda m: m.train()))(model)
    train_one_epoch(model, data[:3], opt, sched, loss, device, cfg, step_hook=hook)  # warm-up
    (mode or (lambda m: m.train()))(model)
    return train_one_epoch(model, data, opt, sched, loss, device, cfg, step_hook=hook)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    cfg = OptimConfig(batch_size=args.batch, epochs=1)
    model = build_model(ModelConfig(backbone=args.backbone, width=args.width), args.classes, args.image_size).to(device)
    data = batches(args.steps, args.batch, args.image_size, args.classes, device)
    full = throughput(copy.deepcopy(model), cfg, device, data)

    dcfg = DeltaConfig(keep=0.05, bits=4)
    spec = copy.deepcopy(model)
    deltas = add_delta(spec, dcfg, nn.Linear(spec.num_features, 20).to(device))
    spec = spec.to(device)
    schedule = PruningSchedule(deltas, dcfg, args.steps + 3)
    sdata = batches(args.steps, args.batch, args.image_size, 20, device)
    special = throughput(spec, cfg, device, sdata, hook=schedule, mode=lambda m: set_train_mode(m, dcfg))
    fig = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backbone": args.backbone, "width": args.width, "image_size": args.image_size, "batch": args.batch,
        "network_images_per_s": full["images_per_s"],
        "specialist_images_per_s": special["images_per_s"],
        "peak_mem_mb": max(full["peak_mem_mb"], special["peak_mem_mb"]),
    }
    print(f"{fig['device']}: {args.backbone} x{args.width} @ {args.image_size}px, batch {args.batch}: "
          f"network {fig['network_images_per_s']:.0f} img/s, specialist (delta keep 0.05, 4 bits, QAT) "
          f"{fig['specialist_images_per_s']:.0f} img/s, peak {fig['peak_mem_mb']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return fig


if __name__ == "__main__":
    main()
