"""Published training rates of GPU kinds, for a plan made on a machine without the config's GPU.

A plan bills GPU-hours as images / (images/s of one GPU). Measured on the planning machine's CPU,
that rate is a CPU's, and moves 100x with the machine's load; so a plan for GPU workers made
where there is no GPU takes one of these figures instead (or a ``--plan-throughput`` file), and
says which.

Every figure is ResNet-50 v1.5 (torchvision's ResNet-50) training at 224 px on one GPU, as its
source measured it. A config with another backbone, width, depth or image size is scaled from its
GPU's figure by FLOPs or activation bytes per image, whichever says less (:func:`reference_train_rate`
says so): a derived figure, not a measured one.
"""

from __future__ import annotations

from dataclasses import dataclass

from supersub.config import ConfigError
from supersub.resnet import BACKBONES, ModelConfig

DLE_RESNET50 = ("https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/ConvNets/"
                "resnet50v1.5#training-performance-results")
MLPERF_TRAINING_V30 = ("https://mlcommons.org/benchmarks/training/ (v3.0, closed division; the pair tabulated at "
                       "https://silvertonconsulting.com/2023/07/12/mlperf-results-show-h100-v-a100-and-v-habana-gaudi2-gpus/)")
# MLPerf Training v3.0 ResNet-50: Dell's 16x H100-SXM5-80GB in 7.8 min against its 16x A100-SXM-80GB
# in 14.4 min, same CPUs: the H100's speed over the A100's on this network.
H100_OVER_A100 = 14.4 / 7.8


@dataclass(frozen=True)
class ReferenceRate:
    """One GPU's training rate for a backbone, image size and precision, with where it comes from."""

    gpu: str
    backbone: str
    image_size: int
    precision: str  # "amp" (mixed precision: fp16/bf16 autocast) or "fp32" (TF32 on A100/H100)
    images_per_s: float
    source: str  # the public page the figure is on, or is derived from
    what: str  # what the figure is there
    derived: str = ""  # how it was computed, when the source does not state it


TABLE: tuple[ReferenceRate, ...] = (
    ReferenceRate("A100", "resnet50", 224, "amp", 2470.0, DLE_RESNET50,
                  "NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch, 'Training performance: NVIDIA DGX A100 "
                  "(8x A100 80GB)', 1 GPU, mixed precision, batch 256, NGC pytorch-21.03"),
    ReferenceRate("A100", "resnet50", 224, "fp32", 938.0, DLE_RESNET50,
                  "NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch, 'Training performance: NVIDIA DGX A100 "
                  "(8x A100 80GB)', 1 GPU, TF32, NGC pytorch-21.03"),
    ReferenceRate("V100", "resnet50", 224, "amp", 1200.0, DLE_RESNET50,
                  "NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch, 'Training performance: NVIDIA DGX-1 16GB "
                  "(8x V100 16GB)', 1 GPU, mixed precision (fp16; a V100 has no bf16 tensor cores, so the config's "
                  "bf16 autocast runs slower there than this)"),
    ReferenceRate("V100", "resnet50", 224, "fp32", 367.0, DLE_RESNET50,
                  "NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch, 'Training performance: NVIDIA DGX-1 16GB "
                  "(8x V100 16GB)', 1 GPU, FP32"),
    ReferenceRate("H100", "resnet50", 224, "amp", round(2470.0 * H100_OVER_A100), MLPERF_TRAINING_V30,
                  "the A100's mixed-precision figure (NVIDIA DeepLearningExamples) times the H100's speed-up over the "
                  "A100 in MLPerf Training v3.0 ResNet-50",
                  derived="2,470 x 14.4 / 7.8 (16x A100-SXM-80GB: 14.4 min, 16x H100-SXM5-80GB: 7.8 min, Dell)"),
    ReferenceRate("H100", "resnet50", 224, "fp32", round(938.0 * H100_OVER_A100), MLPERF_TRAINING_V30,
                  "the A100's TF32 figure (NVIDIA DeepLearningExamples) times the H100's mixed-precision speed-up over "
                  "the A100 in MLPerf Training v3.0 ResNet-50 (no public TF32 figure for the H100 here)",
                  derived="938 x 14.4 / 7.8"),
)

# Decoding is CPU work, and the planning machine's CPUs are not the cluster's (and are shared):
# a plan made away from the cluster takes this project's recorded per-core rate.
REFERENCE_DECODE_PER_CPU = 565.0
REFERENCE_DECODE_SOURCE = ("reference: docs/benchmarks.md 'Decode + augment per core', benchmarks/data_throughput.py's "
                           "tensor path (torchvision decode + RandomResizedCrop(224) + flip), median images per "
                           "CPU-second over 200 ImageNet JPEGs, one thread")

DEFAULT_GPU = "A100"


def gpu_kinds() -> list[str]:
    return sorted({r.gpu for r in TABLE})


def check_gpu(gpu: str) -> str:
    """``gpu`` as the table spells it; a :class:`ConfigError` naming the kinds it has otherwise."""
    kind = gpu.strip().upper()
    if kind not in gpu_kinds():
        raise ConfigError(f"--plan-gpu {gpu}: no reference throughput for this GPU kind; the table has "
                          f"{', '.join(gpu_kinds())} (or give the cluster's own rate with --plan-throughput)")
    return kind


def _entry(gpu: str, backbone: str, precision: str) -> ReferenceRate:
    """The table's figure for ``gpu`` and ``precision``: the same backbone's where there is one."""
    rows = [r for r in TABLE if r.gpu == gpu and r.precision == precision]
    same = [r for r in rows if r.backbone == backbone]
    return (same or rows)[0]


def _is_entry_network(model: ModelConfig, image_size: int, entry: ReferenceRate) -> bool:
    """Whether the configured network is the one the figure was measured on (the head's size aside)."""
    stem = model.stem if model.stem != "auto" else ("small" if image_size < 96 else "imagenet")
    depths = tuple(model.depths) if model.depths is not None else BACKBONES[model.backbone][1]
    return (model.backbone == entry.backbone and model.width == 1.0 and depths == BACKBONES[entry.backbone][1]
            and stem == "imagenet" and image_size == entry.image_size)


def _network_costs(model: ModelConfig, num_classes: int, image_size: int) -> tuple[int, int]:
    """``(FLOPs, activation bytes)`` of one forward of one image."""
    from supersub.cost import activation_bytes, network_flops
    from supersub.resnet import build_model

    net = build_model(model, num_classes, image_size)
    return network_flops(net, image_size), activation_bytes(net, image_size)


def reference_train_rate(gpu: str, model: ModelConfig, image_size: int, precision: str,
                         num_classes: int) -> tuple[float, str]:
    """Training images/s of one ``gpu`` for the configured network, and a line saying where it
    comes from. A network other than the figure's is scaled by the smaller of two ratios, the
    figure's network over the configured one: FLOPs per image, and activation bytes per image
    (a thin network is bound by memory traffic, not arithmetic, and its FLOPs shrink with the
    square of its width while its activations shrink only linearly). A training step costs about
    three forwards on both sides, so forward ratios serve."""
    entry = _entry(check_gpu(gpu), model.backbone, precision)
    origin = entry.what + (f"; derived: {entry.derived}" if entry.derived else "") + f" ({entry.source})"
    kind = "mixed precision" if entry.precision == "amp" else "fp32/TF32"
    head = f"{entry.gpu}, {entry.backbone} @ {entry.image_size} px, {kind}: {entry.images_per_s:,.0f} images/s"
    if _is_entry_network(model, image_size, entry):
        return entry.images_per_s, f"{head}: {origin}"
    ref_flops, ref_bytes = _network_costs(ModelConfig(backbone=entry.backbone, stem="imagenet"), 1000, entry.image_size)
    flops, nbytes = _network_costs(model, num_classes, image_size)
    speedup = min(ref_flops / flops, ref_bytes / nbytes)
    return entry.images_per_s * speedup, (
        f"{head}, scaled to {model.backbone} x{model.width:g} @ {image_size} px by {speedup:.2f}x (derived: the "
        f"smaller of its FLOPs ratio {ref_flops / flops:.2f}x and activation-bytes ratio {ref_bytes / nbytes:.2f}x): "
        f"{origin}")
