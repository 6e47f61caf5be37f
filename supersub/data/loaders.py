"""Batches for the training loop: what a stage asks for (:class:`LoaderSpec`) and two ways to
serve it.

* ``tensors`` — the split decoded once into a uint8 tensor ``[N, 3, S, S]`` (on the GPU when
  training there) and augmented on the device (random crop with padding, flip). For small images
  (Tiny-ImageNet, CIFAR, synthetic) this removes JPEG decoding from every epoch: 75,000 images at
  64 px are 0.9 GB.
* ``dataset`` — a ``torch.utils.data.DataLoader`` over :class:`supersub.data.ManifestDataset`
  with worker processes: any image size, any dataset size.

The Ray layer adds a third (Ray Data) behind the same :class:`LoaderSpec`.

Targets: ``fine`` (subclass index), ``coarse`` (superclass index), ``specialist`` (local index
inside ``spec.superclass``; images of other superclasses, sampled at ``negatives`` per positive
and fresh every epoch, get the extra "other" label ``n_sub``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from supersub.cache import LRU
from supersub.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ManifestDataset,
    TensorTrainTransform,
    build_transforms,
    decode_split,
    eval_draft_size,
    normalise_uint8,
)


@dataclass(frozen=True)
class LoaderSpec:
    split: str
    target: Literal["fine", "coarse", "specialist"]
    train: bool
    batch_size: int
    superclass: int | None = None
    negatives: float = 0.0
    seed: int = 0


def select(fine: np.ndarray, coarse: np.ndarray, spec: LoaderSpec, n_sub: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into the split and their targets for one epoch of ``spec``."""
    rows = np.arange(fine.size)
    if spec.target == "fine":
        return rows, fine
    if spec.target == "coarse":
        return rows, coarse
    if spec.superclass is None:
        raise ValueError("a specialist loader needs a superclass")
    pos = rows[coarse == spec.superclass]
    first = int(fine[pos].min()) if pos.size else 0
    targets = fine[pos] - first
    if spec.negatives > 0:
        pool = rows[coarse != spec.superclass]
        rng = np.random.default_rng([spec.seed, spec.superclass, epoch])
        m = min(pool.size, int(round(spec.negatives * pos.size)))
        neg = np.sort(rng.choice(pool, m, replace=False))
        return np.concatenate([pos, neg]), np.concatenate([targets, np.full(m, n_sub)])
    return pos, targets


def epoch_images(spec: LoaderSpec, fine: np.ndarray, coarse: np.ndarray, n_sub: int, world_size: int = 1) -> int:
    """Images a training epoch of ``spec`` uses (every loader drops the last partial batch), all
    workers together: what the equal-compute controls count."""
    rows = select(fine, coarse, spec, n_sub, 0)[0].size // world_size
    bs = spec.batch_size
    return ((rows // bs) * bs if rows >= bs else rows) * world_size


class TensorLoader:
    """Yields normalised float batches ``[B, 3, S, S]`` and targets ``[B]`` on ``device``."""

    def __init__(
        self,
        images: torch.Tensor,
        fine: np.ndarray,
        coarse: np.ndarray,
        spec: LoaderSpec,
        n_sub: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.fine, self.coarse, self.spec = images, fine, coarse, spec
        self.n_sub, self.device, self.rank, self.world = n_sub, device, rank, world_size
        self.epoch = 0
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        rows, targets = select(self.fine, self.coarse, self.spec, self.n_sub, self.epoch)
        if self.spec.train:
            perm = np.random.default_rng([self.spec.seed, self.epoch, 7]).permutation(rows.size)
            rows, targets = rows[perm], targets[perm]
        # Every rank gets the same number of rows (DDP needs equal step counts).
        per_rank = rows.size // self.world if self.spec.train else math.ceil(rows.size / self.world)
        sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return rows[sl], targets[sl]

    def _usable(self, n: int) -> int:
        """Rows used in an epoch: training drops the last partial batch (BatchNorm dislikes tiny
        batches), unless the whole split is smaller than one batch."""
        bs = self.spec.batch_size
        return (n // bs) * bs if self.spec.train and n >= bs else n

    def __len__(self) -> int:
        return math.ceil(self._usable(self._rows()[0].size) / self.spec.batch_size)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        B, _, S, _ = x.shape
        p = max(1, S // 8)
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (B,), generator=gen, device="cpu").to(x.device)
        dx = torch.randint(0, 2 * p + 1, (B,), generator=gen, device="cpu").to(x.device)
        ar = torch.arange(S, device=x.device)
        rows = (dy[:, None] + ar)[:, None, :, None].expand(B, 3, S, S + 2 * p)
        xp = xp.gather(2, rows)
        cols = (dx[:, None] + ar)[:, None, None, :].expand(B, 3, S, S)
        xp = xp.gather(3, cols)
        flip = (torch.rand(B, generator=gen) < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], xp.flip(3), xp)

    def __iter__(self):
        rows, targets = self._rows()
        bs = self.spec.batch_size
        n = self._usable(rows.size)
        gen = torch.Generator().manual_seed(hash((self.spec.seed, self.epoch, self.rank)) % 2**31)
        for i in range(0, n, bs):
            idx = torch.from_numpy(rows[i : i + bs]).to(self.images.device)
            x = self.images.index_select(0, idx).to(self.device, non_blocking=True).float()
            if self.spec.train:
                x = self._augment(x, gen)
            x = (x - self.mean) / self.std
            yield x, torch.from_numpy(targets[i : i + bs]).to(self.device)


class _Rows(torch.utils.data.Dataset):
    """A view of a dataset's rows with new targets."""

    def __init__(self, base: ManifestDataset, rows: np.ndarray, targets: np.ndarray) -> None:
        self.base, self.rows, self.targets = base, rows, targets

    def __len__(self) -> int:
        return self.rows.size

    def __getitem__(self, i: int):
        image, _ = self.base[int(self.rows[i])]
        return image, int(self.targets[i])


class DatasetLoader:
    """A DataLoader over the manifest's images, rebuilt per epoch (negatives are resampled).

    Training batches are decoded and augmented as uint8 tensors in the workers
    (:class:`TensorTrainTransform`: a quarter of the bytes to hand over, and the JPEG fast path)
    and normalised here, on ``device``; evaluation batches keep the one evaluation geometry
    (:func:`supersub.data.dataset.eval_geometry`, shared with ``decode_split`` and serving).
    """

    def __init__(self, manifest, spec: LoaderSpec, n_sub: int, image_size: int, num_workers: int, rank=0, world_size=1,
                 device: torch.device | None = None, decode: Literal["cpu", "cuda"] = "cpu"):
        self.spec, self.n_sub, self.num_workers = spec, n_sub, num_workers
        self.rank, self.world, self.epoch = rank, world_size, 0
        self.device, self.image_size = device, image_size
        # decode=cuda: workers read bytes, the batch is decoded and augmented on the device (training only).
        self.on_device = decode == "cuda" and spec.train
        if spec.train:
            self.dataset = ManifestDataset(manifest, spec.split, TensorTrainTransform(image_size), target="fine",
                                           decoder="tensor")
        else:
            draft = eval_draft_size(image_size)  # decode as decode_split and serving do
            self.dataset = ManifestDataset(
                manifest, spec.split, build_transforms(image_size, False), target="fine", draft_size=draft
            )
        self.fine, self.coarse = self.dataset.fine, self.dataset.coarse

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _loader(self) -> torch.utils.data.DataLoader:
        rows, targets = select(self.fine, self.coarse, self.spec, self.n_sub, self.epoch)
        collate = None
        if self.on_device:
            from supersub.data.gpu import BytesRows, collate_items

            ds: torch.utils.data.Dataset = BytesRows(self.dataset, rows, targets)
            collate = collate_items
        else:
            ds = _Rows(self.dataset, rows, targets)
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.DistributedSampler(
                ds, self.world, self.rank, shuffle=self.spec.train, seed=self.spec.seed, drop_last=self.spec.train
            )
            sampler.set_epoch(self.epoch)
        gen = torch.Generator().manual_seed(self.spec.seed * 1000 + self.epoch)
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.spec.batch_size,
            shuffle=self.spec.train and sampler is None,
            sampler=sampler,
            generator=gen,
            num_workers=self.num_workers,
            drop_last=self.spec.train and len(ds) >= self.spec.batch_size,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available() and not self.on_device,
            collate_fn=collate,
        )

    def __len__(self) -> int:
        return len(self._loader())

    def __iter__(self):
        if self.on_device:
            from supersub.data.gpu import augment_batch, decode_on_device

            device = self.device or torch.device("cpu")
            for items, y in self._loader():
                yield augment_batch(decode_on_device(items, device), self.image_size, True), y.to(device)
            return
        for x, y in self._loader():
            if x.dtype == torch.uint8:
                if self.device is not None:
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                x = normalise_uint8(x)
            yield x, y


# Decoded splits, shared by the tasks of one process (a study's specialists read the same split);
# bounded so that a long-lived process (a study over several manifests) does not keep them all.
_SPLITS: LRU[tuple[torch.Tensor, np.ndarray, np.ndarray]] = LRU(
    max_bytes=float(os.environ.get("SUPERSUB_SPLIT_CACHE_MB", 4096)) * 2**20, size=lambda v: v[0].nbytes
)


def split_tensors(manifest, split: str, image_size: int, device: torch.device, num_workers: int, cache_dir=None):
    """The decoded split, kept once per process and device (specialists of one process share it)."""

    def make():
        images, fine, coarse = decode_split(manifest, split, image_size, num_workers=num_workers, cache_dir=cache_dir)
        return images.to(device), fine.numpy(), coarse.numpy()

    return _SPLITS.get_or_make((manifest.fingerprint, split, image_size, str(device)), make)


def make_loader(
    manifest,
    spec: LoaderSpec,
    *,
    image_size: int,
    mode: Literal["auto", "tensors", "dataset"],
    device: torch.device,
    num_workers: int = 2,
    cache_dir: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    decode: Literal["auto", "cpu", "cuda"] = "auto",
):
    """The loader for ``spec``; ``auto`` holds images of at most 64 px in memory. ``decode``
    (dataset loader, training): ``cuda`` decodes and augments on the device, ``auto`` does so when
    ``device`` is a GPU and the images are files or Parquet bytes."""
    n_sub = len(manifest.hierarchy.superclasses[spec.superclass].subclasses) if spec.superclass is not None else 0
    if mode == "tensors" or (mode == "auto" and image_size <= 64):
        images, fine, coarse = split_tensors(manifest, spec.split, image_size, device, num_workers, cache_dir)
        return TensorLoader(images, fine, coarse, spec, n_sub, device, rank, world_size)
    encoded = manifest.meta.get("source", {}).get("kind") in ("folder", "parquet")  # bytes to hand over
    if decode == "cuda" and not encoded:
        raise ValueError(f"data.decode=cuda needs encoded images (a folder or Parquet source), not "
                         f"{manifest.meta.get('source', {}).get('kind')!r}")
    resolved = "cuda" if decode == "cuda" or (decode == "auto" and device.type == "cuda" and encoded) else "cpu"
    return DatasetLoader(manifest, spec, n_sub, image_size, num_workers, rank, world_size, device=device, decode=resolved)
