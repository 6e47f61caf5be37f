"""The Ray Data input path (``data.loader=ray_data``): images read, decoded, resized and augmented
in parallel Ray tasks, streamed to each Train worker through ``get_dataset_shard``.

* Driver (:func:`build_datasets`): one dataset per split a stage reads — rows of the manifest
  (``row``: index within the split, ``uri``) in blocks, then ``map_batches`` decodes each block
  through the core's image store and applies the core's transforms before normalisation (the
  ``dataset`` loader's: :class:`supersub.data.dataset.TensorTrainTransform` on uint8 tensors for
  training, :func:`supersub.data.build_transforms`' evaluation geometry otherwise), giving uint8
  ``[B, S, S, 3]``. The datasets go to the ``TorchTrainer``, which splits them
  among its workers. Blocks keep manifest order (a Parquet source is read row group by row
  group); training order comes from block-order randomisation and a local shuffle buffer.
* Worker (:class:`RayDataLoader`): yields ``(x float [B, 3, S, S] normalised, y [B])`` on the
  worker's device like :mod:`supersub.data.loaders`, with targets from :func:`supersub.data.loaders.select`
  (fine, coarse, or a specialist's local labels plus "other"-labelled negatives resampled every
  epoch). A specialist's dataset holds its superclass's images plus every negative that any of
  its epochs draws; each epoch keeps that epoch's draw.

Not bit-reproducible (Ray's scheduling orders blocks); the ``tensors``/``dataset`` loaders are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from supersub.data import IMAGENET_MEAN, IMAGENET_STD, load_manifest
from supersub.data.loaders import LoaderSpec, select

DECODE_CPUS = 0.25  # per decode task: fractional, so decoding fits beside training workers on small machines
BLOCK_ROWS = 256  # rows per input block: the unit of parallel decoding


def _labels(manifest, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = manifest.indices(split)
    return rows, manifest.subclass[rows].astype(np.int64), manifest.superclass[rows].astype(np.int64)


def _n_sub(manifest, spec: LoaderSpec) -> int:
    return len(manifest.hierarchy.superclasses[spec.superclass].subclasses) if spec.superclass is not None else 0


def needed_rows(fine: np.ndarray, coarse: np.ndarray, spec: LoaderSpec, n_sub: int, epochs: int) -> np.ndarray:
    """Rows (indices within the split) that some epoch of ``spec`` uses."""
    if spec.target != "specialist" or spec.negatives <= 0:
        return select(fine, coarse, spec, n_sub, 0)[0]
    return np.unique(np.concatenate([select(fine, coarse, spec, n_sub, e)[0] for e in range(max(1, epochs))]))


def decode_batch(batch: dict[str, np.ndarray], meta: dict[str, Any], size: int, train: bool) -> dict[str, np.ndarray]:
    """``{"row", "uri"}`` → ``{"row", "image": uint8 [B, S, S, 3]}`` (runs in Ray Data tasks).

    Training images take the core's uint8 tensor path (clean JPEGs by torchvision's decoder, the
    rest by PIL; :class:`supersub.data.dataset.TensorTrainTransform`), evaluation images the one
    evaluation geometry, as in the ``dataset`` loader."""
    from torchvision import transforms as T

    from supersub.data import build_transforms
    from supersub.data.dataset import TensorTrainTransform
    from supersub.data.store import shared_store

    store = shared_store(meta)  # one per process: reuses Parquet handles and row-group caches
    images = []
    if train:
        augment = TensorTrainTransform(size)
        for uri in batch["uri"]:
            images.append(augment(store.read_tensor(str(uri))).permute(1, 2, 0).numpy())
    else:
        steps = [t for t in build_transforms(size, train).transforms if not isinstance(t, (T.ToTensor, T.Normalize))]
        for uri in batch["uri"]:
            img = store.read(str(uri))
            for step in steps:
                img = step(img)
            images.append(np.asarray(img, dtype=np.uint8))
    return {"row": batch["row"], "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)}


def build_datasets(task) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The stage's datasets (``{"train", "val"}``) and their specs (for the worker's check)."""
    import pyarrow as pa
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = load_manifest(task.data.manifest_dir)
    datasets, specs = {}, {}
    for name, spec in task.loader_specs().items():
        split_rows, fine, coarse = _labels(manifest, spec.split)
        rows = needed_rows(fine, coarse, spec, _n_sub(manifest, spec), task.optim.epochs)
        table = pa.table({"row": rows.astype(np.int64), "uri": [manifest.uris[i] for i in split_rows[rows]]})
        blocks = [table.slice(i, BLOCK_ROWS) for i in range(0, max(1, table.num_rows), BLOCK_ROWS)]
        ds = ray.data.from_arrow(blocks)
        if spec.train:
            ds = ds.randomize_block_order()
        datasets[name] = ds.map_batches(
            decode_batch,
            fn_kwargs={"meta": manifest.meta, "size": task.data.image_size, "train": spec.train},
            batch_size=64,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        specs[name] = dataclasses.asdict(spec)
    return datasets, specs


class RayDataLoader:
    """A worker's loader over its dataset shard, with the interface of :mod:`supersub.data.loaders`."""

    def __init__(self, shard, spec: LoaderSpec, fine: np.ndarray, coarse: np.ndarray, n_sub: int,
                 device: torch.device, world_size: int = 1) -> None:
        self.shard, self.spec, self.fine, self.coarse, self.n_sub = shard, spec, fine, coarse, n_sub
        self.device, self.world, self.epoch = device, world_size, 0
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _lookup(self) -> tuple[int, np.ndarray]:
        """Number of rows this epoch uses, and the target of every split row (-1: not used)."""
        rows, targets = select(self.fine, self.coarse, self.spec, self.n_sub, self.epoch)
        lookup = np.full(self.fine.size, -1, dtype=np.int64)
        lookup[rows] = targets
        return rows.size, lookup

    def __len__(self) -> int:
        per_rank = self._lookup()[0] // self.world
        bs = self.spec.batch_size
        return per_rank // bs if self.spec.train else math.ceil(per_rank / bs)

    def _batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std, y.to(self.device)

    def __iter__(self):
        _, lookup = self._lookup()
        bs, train = self.spec.batch_size, self.spec.train
        # DDP needs the same number of steps on every rank: a training epoch yields exactly
        # len(self) batches (a short shard repeats its last batch, a long one is cut).
        steps = len(self) if train else None
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        held = emitted = 0
        last = None
        batches = self.shard.iter_torch_batches(
            batch_size=bs, local_shuffle_buffer_size=4 * bs if train else None, drop_last=False
        )
        for batch in batches:  # consumed to the end even when cut: the split's other shards wait on it
            y = torch.from_numpy(lookup[batch["row"].cpu().numpy()])
            keep = y >= 0
            xs.append(batch["image"][keep])
            ys.append(y[keep])
            held += int(keep.sum())
            while held >= bs and (steps is None or emitted < steps):
                x, yy = torch.cat(xs), torch.cat(ys)
                last = self._batch(x[:bs], yy[:bs])
                xs, ys, held = [x[bs:]], [yy[bs:]], held - bs
                emitted += 1
                yield last
        if not train and held:
            yield self._batch(torch.cat(xs), torch.cat(ys))
        while train and last is not None and emitted < steps:
            emitted += 1
            yield last


def worker_loader_factory(specs: dict[str, dict[str, Any]], task, device: torch.device, world: int):
    """``StageContext.make_loader`` for a Train worker: the shard of the dataset for ``spec.split``."""
    import ray.train

    manifest = load_manifest(task.data.manifest_dir)

    def make(spec: LoaderSpec) -> RayDataLoader:
        expected = LoaderSpec(**specs.get(spec.split, {"split": "?", "target": "?", "train": False, "batch_size": 0}))
        if spec != expected:
            raise RuntimeError(f"the task asked for {spec}, but its loader_specs() said {expected}")
        _, fine, coarse = _labels(manifest, spec.split)
        shard = ray.train.get_dataset_shard(spec.split)
        return RayDataLoader(shard, spec, fine, coarse, _n_sub(manifest, spec), device, world)

    return make
