"""PyTorch side of the data layer: ``ManifestDataset``, transforms, and ``decode_split``.

Two ways to feed a model:

* :class:`ManifestDataset` + :func:`build_transforms`: images decoded on the fly in
  ``DataLoader`` workers, with augmentation; any size of source;
* :func:`decode_split`: a whole split decoded once into a uint8 tensor ``[N, 3, S, S]`` (optionally
  cached on disk): the fast path for small images, where decoding, not the model, would be the
  bottleneck (e.g. training on a GPU at 32–64 px). Augment on the device afterwards.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from supersub.data.manifest import Manifest, load_manifest
from supersub.data.parallel import Progress, parallel_map
from supersub.data.store import ImageStore, SyntheticStore, shared_store
from supersub.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE = 64  # at or below this side, CIFAR-style augmentation (pad + crop) instead of resized crops
Target = Literal["fine", "coarse", "local"]


def eval_geometry(img: Image.Image, size: int) -> Image.Image:
    """The one evaluation geometry, shared by evaluation loaders, :func:`decode_split` and serving
    so that a served image reaches the network exactly as evaluated: at most 64 px, fit (shorter
    side to ``size``, centre crop); larger, shorter side to ``1.14 · size`` then a centre crop
    (the usual 256 → 224)."""
    if size <= SMALL_IMAGE:
        return img if img.size == (size, size) else ImageOps.fit(img, (size, size), Image.BILINEAR)
    short = int(round(size * 1.14))
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def eval_draft_size(size: int) -> int:
    """The JPEG draft size (DCT-scaled decoding) that :func:`eval_geometry` needs."""
    return size if size <= SMALL_IMAGE else int(round(size * 1.14))


def build_transforms(image_size: int, train: bool) -> Any:
    """Transforms from an RGB PIL image to a normalised float tensor ``[3, S, S]``.

    * ``image_size <= 64`` (CIFAR / Tiny-ImageNet / synthetic): train = fit to ``S×S``, random
      crop with ``S/8`` zero padding, horizontal flip; eval = fit to ``S×S``;
    * larger (ImageNet): train = RandomResizedCrop(S) + flip; eval = Resize(1.14·S) + CenterCrop(S)
      (the usual 256 → 224 ratio).

    "Fit" is a resize of the shorter side to ``S`` and a centre crop (a no-op for square inputs).
    Evaluation is :func:`eval_geometry`. Normalisation uses :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.
    """
    from torchvision import transforms as T  # lazy: torchvision takes seconds to import

    if image_size < 8:
        raise DataError(f"image_size must be at least 8 pixels, got {image_size}")
    s = image_size
    if not train:
        steps: list[Any] = [T.Lambda(functools.partial(eval_geometry, size=s))]
    elif s <= SMALL_IMAGE:
        steps = [T.Resize(s), T.CenterCrop(s), T.RandomCrop(s, padding=max(1, s // 8)), T.RandomHorizontalFlip()]
    else:
        steps = [T.RandomResizedCrop(s), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TensorTrainTransform:
    """The training augmentation of :func:`build_transforms` on uint8 tensors: ``[3, H, W]`` →
    ``[3, S, S]`` uint8, not normalised (the loader normalises whole batches on the device).

    ``> 64`` px: the crop is drawn by ``RandomResizedCrop.get_params`` on the full geometry (the
    same function, scale and ratio ranges and global RNG as the PIL path), then cropped and
    resized (bilinear, antialiased) on uint8 pixels — the pixels of ``transforms.v2``'s
    ``resized_crop`` — and flipped with probability ½. ``<= 64`` px: fit, padded random crop, flip, as for PIL images. Why: on a
    full-size ImageNet JPEG this and the JPEG fast path take ~2/3 the CPU time of PIL's decode +
    crop + float conversion (``benchmarks/data_throughput.py``), and a uint8 batch is a quarter of
    the bytes a DataLoader worker hands over.
    """

    scale = (0.08, 1.0)
    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, image_size: int) -> None:
        if image_size < 8:
            raise DataError(f"image_size must be at least 8 pixels, got {image_size}")
        self.size = image_size
        self._small = None
        if image_size <= SMALL_IMAGE:
            from torchvision.transforms import v2

            s = image_size
            self._small = v2.Compose([v2.Resize(s, antialias=True), v2.CenterCrop(s),
                                      v2.RandomCrop(s, padding=max(1, s // 8)), v2.RandomHorizontalFlip()])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._small is not None:
            return self._small(x)
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(x, list(self.scale), list(self.ratio))
        # torch's uint8 antialiased resize has a vectorised kernel for channels-last input; the
        # decoder's [3, H, W] is already a view of HWC pixels, so the crop is copied channels-last
        # and resized there: the same pixels as transforms.v2's resized_crop (tested), in ~2/3 of
        # its time (benchmarks/data_throughput.py). The result stays a channels-last view.
        crop = x[None, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        x = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
        if torch.rand(1) < 0.5:
            x = x.flip(-1)
        return x


def normalise_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` (any device) → float32, normalised by the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


def _targets(manifest: Manifest, rows: np.ndarray, target: Target) -> np.ndarray:
    fine = manifest.subclass[rows].astype(np.int64)
    coarse = manifest.superclass[rows].astype(np.int64)
    if target == "fine":
        return fine
    if target == "coarse":
        return coarse
    first = np.array([group[0] for group in manifest.hierarchy.coarse_to_fine], dtype=np.int64)
    return fine - first[coarse]


class ManifestDataset(Dataset):
    """Images of one split of a manifest as ``(image tensor [3, S, S], label)`` pairs.

    Args:
        manifest: a :class:`Manifest` or the path of a manifest folder.
        split: ``train``, ``val`` or ``test``.
        transform: PIL image → tensor (e.g. :func:`build_transforms`); default ``ToTensor()``
            (float ``[3, H, W]`` in ``[0, 1]``).
        target: ``fine`` (subclass index), ``coarse`` (superclass index) or ``local`` (index of
            the subclass within its superclass: a specialist's label).
        superclasses: keep only images of these superclass indices (one specialist's data).
        draft_size: decode JPEGs at reduced scale, at least this many pixels a side (speed for
            large photos and small models; leave ``None`` for random-resized-crop training).
        decoder: ``pil`` (``transform`` takes an RGB PIL image) or ``tensor`` (``transform``
            takes uint8 ``[3, H, W]`` from :func:`supersub.data.images.decode_tensor`: clean
            JPEGs by torchvision's decoder, the rest by PIL with the same conversions; e.g.
            :class:`TensorTrainTransform`). ``draft_size`` applies to ``pil`` only.
    """

    def __init__(
        self,
        manifest: Manifest | str | Path,
        split: str,
        transform: Any = None,
        target: Target = "fine",
        superclasses: Sequence[int] | None = None,
        draft_size: int | None = None,
        decoder: Literal["pil", "tensor"] = "pil",
    ) -> None:
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(manifest)
        if target not in ("fine", "coarse", "local"):
            raise DataError(f"target must be 'fine', 'coarse' or 'local', got {target!r}")
        rows = manifest.indices(split)
        if superclasses is not None:
            wanted = np.asarray(list(superclasses), dtype=np.int64)
            bad = [int(s) for s in wanted if not 0 <= s < manifest.hierarchy.num_superclasses]
            if bad:
                raise DataError(f"superclass index(es) {bad} out of range 0..{manifest.hierarchy.num_superclasses - 1}")
            rows = rows[np.isin(manifest.superclass[rows], wanted)]
        self.hierarchy = manifest.hierarchy
        if decoder not in ("pil", "tensor"):
            raise DataError(f"decoder must be 'pil' or 'tensor', got {decoder!r}")
        self.split, self.target_kind, self.draft_size, self.decoder = split, target, draft_size, decoder
        self.uris = manifest.uri_array(rows)  # no Python string per image (workers share it)
        self.targets = _targets(manifest, rows, target)
        self.fine = manifest.subclass[rows].astype(np.int64)
        self.coarse = manifest.superclass[rows].astype(np.int64)
        if transform is None:
            from torchvision.transforms import ToTensor

            transform = ToTensor()
        self.transform = transform
        self.store: ImageStore = manifest.store()

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def num_classes(self) -> int:
        """Size of the label space of ``target`` (for ``local``: the largest superclass)."""
        h = self.hierarchy
        if self.target_kind == "fine":
            return h.num_subclasses
        if self.target_kind == "coarse":
            return h.num_superclasses
        return max(len(s.subclasses) for s in h.superclasses)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.decoder == "tensor":
            return self.transform(self.store.read_tensor(self.uris[i])), int(self.targets[i])
        img = self.store.read(self.uris[i], draft_size=self.draft_size)
        return self.transform(img), int(self.targets[i])


# ---------------------------------------------------------------- whole-split decoding
def _fit(img: Image.Image, size: int) -> np.ndarray:
    """:func:`eval_geometry` as uint8 ``[size, size, 3]``."""
    return np.asarray(eval_geometry(img, size), dtype=np.uint8)


def _decode_chunk(task: tuple[dict[str, Any], list[str], int]) -> np.ndarray:
    meta, uris, size = task
    store = shared_store(meta)
    if isinstance(store, SyntheticStore):  # vectorised generation, then resize if needed
        arr = store.render(uris)
        if arr.shape[1] == size:
            return arr
        return np.stack([_fit(Image.fromarray(a), size) for a in arr])
    return np.stack([_fit(store.read(u, draft_size=eval_draft_size(size)), size) for u in uris]) if uris else np.zeros((0, size, size, 3), np.uint8)


def decode_split(
    manifest: Manifest | str | Path,
    split: str,
    image_size: int,
    num_workers: int = 0,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decodes a whole split once, resized (shorter side + centre crop) to ``image_size``, no augmentation.

    Args:
        manifest: a :class:`Manifest` or a manifest folder.
        split: ``train``, ``val`` or ``test``.
        image_size: output side ``S`` in pixels.
        num_workers: decoding processes (0 or 1: in this process).
        cache_dir: if given, the images are stored there as ``<manifest sha256[:16]>-<split>-<S>.npy``
            and read back on the next call (a changed manifest gets a new file).

    Returns:
        ``(images uint8 [N, 3, S, S], fine labels int64 [N], coarse labels int64 [N])`` in
        manifest order.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    rows = manifest.indices(split)
    fine = torch.from_numpy(manifest.subclass[rows].astype(np.int64))
    coarse = torch.from_numpy(manifest.superclass[rows].astype(np.int64))
    cache = Path(cache_dir) / f"{manifest.fingerprint[:16]}-{split}-{image_size}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        arr = np.load(cache)
        if arr.shape == (len(rows), 3, image_size, image_size) and arr.dtype == np.uint8:
            return torch.from_numpy(arr), fine, coarse
    uris = [manifest.uris[i] for i in rows]
    chunks = [(manifest.meta, uris[i : i + 256], image_size) for i in range(0, len(uris), 256)]
    bar = Progress(len(uris), f"decode {split}", enabled=progress)
    out = np.empty((len(uris), 3, image_size, image_size), dtype=np.uint8)
    pos = 0
    for arr in parallel_map(_decode_chunk, chunks, workers=num_workers, sizes=lambda c, _: len(c[1]), progress=bar):
        out[pos : pos + len(arr)] = arr.transpose(0, 3, 1, 2)
        pos += len(arr)
    bar.close()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    return torch.from_numpy(out), fine, coarse
