"""Decoding and augmentation on the training device (``data.decode=cuda``).

DataLoader workers only read bytes (:class:`BytesRows`): a clean JPEG travels as its encoded
bytes, anything else (grayscale, CMYK, PNG inside .JPEG, ...) is decoded by the worker through
the PIL path with its conversions (:func:`supersub.data.images.decode_tensor`). On the device,
:func:`decode_augment` decodes a batch's JPEGs in one ``torchvision.io.decode_jpeg(list,
device="cuda")`` call (nvJPEG) and :func:`augment_batch` crops, resizes, flips and normalises.

:func:`augment_batch` is plain PyTorch on any device (tests run it on the CPU): the crop of each
image is drawn by the same ``RandomResizedCrop.get_params`` on its full geometry as the CPU
paths, so the augmentation statistics are the same; pixels differ from the CPU paths by the
resize kernel (float bilinear with antialiasing instead of uint8 / PIL), as between any two
resize implementations. Evaluation geometry here is the same resize-shorter-side-and-centre-crop
as :func:`supersub.data.dataset.eval_geometry`, not bit-identical to PIL's: a network trained with
``decode=cuda`` is evaluated by the CPU path like every other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from supersub.data.dataset import IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE
from supersub.data.images import fast_jpeg_size


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """float ``[3, H, W]`` → ``[3, h, w]``: bilinear, antialiased when shrinking (as PIL)."""
    return F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def _eval_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`supersub.data.dataset.eval_geometry` on a float ``[3, H, W]`` tensor."""
    _, h, w = x.shape
    short = size if size <= SMALL_IMAGE else int(round(size * 1.14))
    scale = short / min(w, h)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = _resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size]


def augment_batch(images: list[torch.Tensor], size: int, train: bool, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[3, H_i, W_i]`` images (one device, any sizes) → normalised float ``[B, 3, S, S]``.

    Training (``S > 64``): ``RandomResizedCrop(S)`` (crop drawn on each image's full geometry by
    torchvision's ``get_params``, global RNG) + horizontal flip with probability ½ (``flips``:
    a bool ``[B]`` to fix them). ``S <= 64`` training: fit to ``S``, then a random crop with
    ``S/8`` zero padding and a flip. Evaluation: shorter side to ``1.14·S`` (or ``S``), centre crop.
    """
    from torchvision.transforms import RandomResizedCrop

    if not images:
        raise ValueError("augment_batch needs at least one image")
    device = images[0].device
    out = torch.empty(len(images), 3, size, size, device=device)
    if flips is None:
        flips = torch.rand(len(images)) < 0.5
    for k, img in enumerate(images):
        x = img.float()
        if not train:
            out[k] = _eval_crop(x, size)
            continue
        if size > SMALL_IMAGE:
            top, left, h, w = RandomResizedCrop.get_params(img, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0])
            x = _resize(x[:, top : top + h, left : left + w], size, size)
        else:
            pad = max(1, size // 8)
            x = F.pad(_eval_crop(x, size), (pad, pad, pad, pad))
            dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
            x = x[:, dy : dy + size, dx : dx + size]
        out[k] = x.flip(-1) if bool(flips[k]) else x
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return out.clamp_(0, 255).sub_(mean).div_(std)


def decode_on_device(items: list[tuple[str, torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """``("jpeg", encoded uint8 [N])`` / ``("pixels", uint8 [3, H, W])`` items → uint8 images on
    ``device``: every JPEG of the batch in one ``decode_jpeg`` call (nvJPEG's batched decode on
    CUDA; libjpeg-turbo one by one on a CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i, (kind, _) in enumerate(items) if kind == "jpeg"]
    out: list[Any] = [None] * len(items)
    if jpegs:
        data = [items[i][1] for i in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device if device.type == "cuda" else "cpu")
        except RuntimeError as e:  # nvJPEG refused the batch (a JPEG it does not support, no nvJPEG): the CPU decodes
            _warn_once(f"decode_jpeg on {device} failed ({str(e).splitlines()[0][:200]}); this batch decoded on the CPU")
            decoded = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
        for i, img in zip(jpegs, decoded):
            out[i] = img.to(device)
    for i, (kind, t) in enumerate(items):
        if kind != "jpeg":
            out[i] = t.to(device, non_blocking=True)
    return out


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def decode_augment(datas: list[bytes], size: int, train: bool, device: torch.device,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Encoded images → normalised float ``[B, 3, S, S]`` on ``device`` (benchmarks; the loader
    runs :func:`read_item` in its workers and the two halves here). ``gen`` draws the flips."""
    items = [read_item(d, None) for d in datas]
    flips = torch.rand(len(datas), generator=gen) < 0.5 if gen is not None else None
    return augment_batch(decode_on_device(items, device), size, train, flips)


def read_item(data: bytes | None, name: str | None) -> tuple[str, torch.Tensor]:
    """What a worker hands over for one image: a clean JPEG's bytes, else its decoded pixels
    (PIL path: conversions, and :class:`supersub.errors.DataError` for a bad image)."""
    from supersub.data.images import decode_tensor
    from supersub.errors import DataError

    if fast_jpeg_size(data, name) is not None:
        return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)  # type: ignore[arg-type]
    decoded = decode_tensor(data, name)
    if decoded.tensor is None:
        raise DataError(f"image {name or '?'}: {decoded.events[-1].replace('_', ' ')} "
                        "(build with verify to skip bad images)")
    return "pixels", decoded.tensor


class BytesRows(torch.utils.data.Dataset):
    """Rows of a :class:`supersub.data.ManifestDataset` as ``(item, target)`` where ``item`` is
    :func:`read_item`'s: the worker reads bytes and decodes only what is not a clean JPEG."""

    def __init__(self, base, rows, targets) -> None:
        self.base, self.rows, self.targets = base, rows, targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        uri = self.base.uris[int(self.rows[i])]
        data, name = self.base.store.read_bytes(uri)
        return read_item(data, name or uri), int(self.targets[i])


def collate_items(batch):
    """Keeps a batch's items as a list (their sizes differ); targets as a tensor."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch], dtype=torch.long)
