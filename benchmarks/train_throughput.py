"""Training throughput: fp32 vs bf16 autocast, contiguous vs channels_last, a network and a
specialist (resident + delta), side by side in one run; and (``--accuracy-epochs N``) whether
bf16 changes accuracy: the same network trained both ways on the synthetic default data.

Measures images/s of ``supersub.epoch.train_one_epoch`` on synthetic tensors already on the
device (so the figure is the model's, not the loader's), and prints what ``amp=auto`` and
``channels_last=auto`` choose on this machine (bf16 only where the hardware has it natively:
CUDA, or a CPU with AVX-512 BF16 / AMX)::

    python benchmarks/train_throughput.py --backbone resnet10 --width 0.5 --image-size 32 --batch 128
    python benchmarks/train_throughput.py --backbone resnet18 --image-size 64 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from supersub.delta import DeltaConfig, PruningSchedule, add_delta, set_train_mode
from supersub.epoch import (
    OptimConfig,
    amp_dtype,
    build_optimizer,
    build_scheduler,
    native_bf16,
    train_one_epoch,
)
from supersub.resnet import ModelConfig, build_model


def batches(n: int, batch: int, size: int, classes: int, device: torch.device):
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return [(x, y)] * n


def throughput(model: nn.Module, cfg: OptimConfig, device: torch.device, data, hook=None, mode=None) -> float:
    if cfg.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(data))
    loss = nn.CrossEntropyLoss()
    (mode or (lambda m: m.train()))(model)
    train_one_epoch(model, data[:3], opt, sched, loss, device, cfg, step_hook=hook)  # warm-up
    (mode or (lambda m: m.train()))(model)
    return train_one_epoch(model, data, opt, sched, loss, device, cfg, step_hook=hook)["images_per_s"]


def accuracy(epochs: int, amp: str, device: torch.device) -> float:
    """Val top-1 of the default config's vanilla network after ``epochs`` epochs, with ``amp``."""
    from supersub.config import load_config
    from supersub.pipeline import data_options, network_task, prepare_data
    from supersub.pipeline_config import PipelineConfig
    from supersub.tasks import TaskContext

    cfg = load_config(PipelineConfig, "jobs/configs/default.yaml", [f"train.epochs={epochs}", f"train.amp={amp}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = data_options(cfg, prepare_data(cfg, Path(tmp), log=lambda s: None))
        task = network_task("vanilla", "fine", cfg, data, Path(tmp) / "tasks")
        return task.run(TaskContext(device=device, log=lambda s: None))["val_acc"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train the default config's network this long "
                   "in fp32 and in bf16 and print both val accuracies")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, width=args.width), args.classes, args.image_size).to(device)
    data = batches(args.steps, args.batch, args.image_size, args.classes, device)
    sdata = batches(args.steps, args.batch, args.image_size, 20, device)
    dcfg = DeltaConfig(keep=0.05, bits=4)
    rows = {}
    for amp in ("none", "bf16"):
        for cl in ("off", "on"):
            cfg = OptimConfig(batch_size=args.batch, epochs=1, amp=amp, channels_last=cl)
            net = throughput(copy.deepcopy(model), cfg, device, data)
            spec = copy.deepcopy(model)
            deltas = add_delta(spec, dcfg, nn.Linear(spec.num_features, 20).to(device))
            schedule = PruningSchedule(deltas, dcfg, args.steps + 3)
            special = throughput(spec.to(device), cfg, device, sdata, hook=schedule, mode=lambda m: set_train_mode(m, dcfg))
            rows[f"{'fp32' if amp == 'none' else 'bf16'} {'channels_last' if cl == 'on' else 'contiguous'}"] = (net, special)
    auto = OptimConfig()
    chosen = f"{'bf16' if amp_dtype(auto, device) else 'fp32'} channels_last"
    fig = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "native_bf16": native_bf16(device), "auto_chooses": chosen,
        "backbone": args.backbone, "width": args.width, "image_size": args.image_size, "batch": args.batch,
        "images_per_s": {k: {"network": n, "specialist": s} for k, (n, s) in rows.items()},
    }
    print(f"{fig['device']} ({fig['threads']} threads, native bf16: {fig['native_bf16']}): {args.backbone} x{args.width} "
          f"@ {args.image_size}px, batch {args.batch}; images/s")
    print(f"  {'':26}{'network':>10}{'specialist':>12}")
    for k, (n, s) in rows.items():
        print(f"  {k:26}{n:>10.0f}{s:>12.0f}" + ("   <- amp=auto, channels_last=auto" if k == chosen else ""))
    if args.accuracy_epochs:
        accs = {amp: accuracy(args.accuracy_epochs, amp, device) for amp in ("none", "bf16")}
        fig["accuracy"] = {"epochs": args.accuracy_epochs, "fp32_val_top1": accs["none"], "bf16_val_top1": accs["bf16"]}
        print(f"  default config, {args.accuracy_epochs} epochs: val top-1 fp32 {accs['none']:.2f} %, bf16 {accs['bf16']:.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return fig


if __name__ == "__main__":
    main()
