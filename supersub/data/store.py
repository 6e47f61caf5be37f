"""Image stores: read a manifest's image references (``uri``) back as RGB PIL images.

``open_image_store(meta).read(uri)`` works the same for every source kind:

=============  ==========================================  ======================================
kind           uri                                         read by
=============  ==========================================  ======================================
``folder``     path relative to ``root`` (``train/n01/x.JPEG``)  opening the file
``parquet``    ``<absolute shard path>#<row>``             the row group's ``image.bytes``, cached
``cifar100``   ``cifar100:<root>#<split>:<index>``          torchvision's arrays, loaded once
``synthetic``  ``<index>``                                 regenerating it from ``params``
=============  ==========================================  ======================================

Stores are picklable and cheap to pickle: caches and file handles are per process and rebuilt
after a fork or unpickling, so a store inside a ``DataLoader`` dataset works in its workers.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from supersub.cache import LRU
from supersub.data.images import Decoded, DecodedTensor, decode_image, decode_tensor, pil_to_uint8
from supersub.data.synthetic import SyntheticSpec, render
from supersub.errors import DataError

# Per-worker memory for decoded Parquet row groups (encoded bytes, not pixels).
PARQUET_CACHE_ENV = "SUPERSUB_PARQUET_CACHE_MB"
_DEFAULT_PARQUET_CACHE_MB = 512


class ImageStore:
    """Base: :meth:`read` (RGB image or DataError) and :meth:`decode` (bad-data events, for builds)."""

    kind = "base"

    def read_bytes(self, uri: str) -> tuple[bytes | None, str | None]:
        """Encoded bytes and the file name they came under (for format checks)."""
        raise NotImplementedError

    def decode(self, uri: str, draft_size: int | None = None) -> Decoded:
        data, name = self.read_bytes(uri)
        return decode_image(data, name, draft_size=draft_size)

    def read(self, uri: str, draft_size: int | None = None) -> Image.Image:
        """The image at ``uri`` in mode RGB; a :class:`DataError` names the uri when it is bad."""
        decoded = self.decode(uri, draft_size)
        if decoded.image is None:
            raise DataError(f"image {uri}: {decoded.events[-1].replace('_', ' ')} (build with verify to skip bad images)")
        return decoded.image

    def decode_tensor(self, uri: str) -> DecodedTensor:
        data, name = self.read_bytes(uri)
        return decode_tensor(data, name)

    def read_tensor(self, uri: str):
        """The image at ``uri`` as uint8 ``[3, H, W]`` (clean JPEGs by torchvision's decoder);
        a :class:`DataError` names the uri when it is bad."""
        decoded = self.decode_tensor(uri)
        if decoded.tensor is None:
            raise DataError(f"image {uri}: {decoded.events[-1].replace('_', ' ')} (build with verify to skip bad images)")
        return decoded.tensor


class FolderStore(ImageStore):
    kind = "folder"

    def __init__(self, root: str) -> None:
        self.root = root

    def read_bytes(self, uri: str) -> tuple[bytes | None, str | None]:
        path = os.path.join(self.root, uri)
        try:
            with open(path, "rb") as f:
                return f.read(), uri
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None


class ParquetStore(ImageStore):
    """Reads ``<file>#<row>`` by row group, keeping recently used row groups' bytes (LRU, bounded).

    A shuffled loader over a source larger than the cache reads a whole row group per image; for
    such sources decode once (:func:`supersub.data.dataset.decode_split`) or sample shard-aware.
    """

    kind = "parquet"

    def __init__(self, cache_mb: float | None = None) -> None:
        self.cache_bytes = int((cache_mb if cache_mb is not None else _cache_mb_from_env()) * 2**20)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._files: dict[str, tuple[Any, np.ndarray, bool]] = {}  # path → (ParquetFile, row starts, has path)
        # (path, row group) → (image bytes column, paths); bounded by the bytes it holds.
        self._cache: LRU[tuple[Any, list[str | None] | None]] = LRU(self.cache_bytes, size=lambda v: v[0].nbytes, min_items=1)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cache_bytes = state["cache_bytes"]
        self._reset()

    def _file(self, path: str) -> tuple[Any, np.ndarray, bool]:
        import pyarrow.parquet as pq

        if path not in self._files:
            try:
                pf = pq.ParquetFile(path)
            except FileNotFoundError:
                raise DataError(f"Parquet shard not found: {path}") from None
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            has_path = "image.path" in {pf.schema.column(i).path for i in range(len(pf.schema))}
            self._files[path] = (pf, starts, has_path)
        return self._files[path]

    def _row_group(self, path: str, rg: int) -> tuple[Any, list[str | None] | None]:
        key = (path, rg)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        pf, _, has_path = self._file(path)
        cols = ["image.bytes", "image.path"] if has_path else ["image.bytes"]
        image = pf.read_row_group(rg, columns=cols).column("image").combine_chunks()
        # flatten(), not field(): a null image struct must read as null bytes, not as its child's slot.
        children = dict(zip((f.name for f in image.type), image.flatten()))
        data = children["bytes"]
        names = children["path"].to_pylist() if has_path else None
        return self._cache.put(key, (data, names))

    def read_bytes(self, uri: str) -> tuple[bytes | None, str | None]:
        if os.getpid() != self._pid:  # forked: ParquetFile handles must not be shared
            self._reset()
        path, sep, row_text = uri.rpartition("#")
        if not sep or not row_text.isdigit():
            raise DataError(f"not a Parquet image reference (<file>#<row>): {uri!r}")
        row = int(row_text)
        with self._lock:  # one DataLoader worker is one process, but threads may share a store
            _, starts, _ = self._file(path)
            if row >= starts[-1]:
                raise DataError(f"{uri}: row {row} is past the end of the shard ({starts[-1]} rows)")
            rg = int(np.searchsorted(starts, row, side="right") - 1)
            data, names = self._row_group(path, rg)
        i = row - int(starts[rg])
        value = data[i].as_py()
        return value, (names[i] if names else None)


def _cache_mb_from_env() -> float:
    raw = os.environ.get(PARQUET_CACHE_ENV)
    try:
        return float(raw) if raw else _DEFAULT_PARQUET_CACHE_MB
    except ValueError:
        raise DataError(f"{PARQUET_CACHE_ENV}={raw!r} is not a number of megabytes") from None


# ---------------------------------------------------------------- CIFAR-100
_CIFAR_CACHE: dict[tuple[str, str], tuple[np.ndarray, list[int], list[str]]] = {}


def load_cifar100(root: str, split: str, download: bool = False) -> tuple[np.ndarray, list[int], list[str]]:
    """torchvision's CIFAR-100 arrays: uint8 images ``[N, 32, 32, 3]``, fine targets, fine class names."""
    key = (str(root), split)
    if key not in _CIFAR_CACHE:
        from torchvision.datasets import CIFAR100

        try:
            ds = CIFAR100(str(root), train=split == "train", download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise DataError(f"CIFAR-100 at {root}: {e}") from e
        _CIFAR_CACHE[key] = (np.asarray(ds.data), list(ds.targets), list(ds.classes))
    return _CIFAR_CACHE[key]


class Cifar100Store(ImageStore):
    kind = "cifar100"

    def _array(self, uri: str) -> np.ndarray:
        try:
            body = uri.removeprefix("cifar100:")
            root, rest = body.rsplit("#", 1)
            split, idx = rest.split(":")
            return load_cifar100(root, split)[0][int(idx)]
        except (ValueError, IndexError):
            raise DataError(f"not a CIFAR-100 image reference (cifar100:<root>#<split>:<idx>): {uri!r}") from None

    def decode(self, uri: str, draft_size: int | None = None) -> Decoded:
        return Decoded(Image.fromarray(self._array(uri), "RGB"), ())

    def decode_tensor(self, uri: str) -> DecodedTensor:
        return DecodedTensor(pil_to_uint8(self.decode(uri).image), ())  # type: ignore[arg-type]


class SyntheticStore(ImageStore):
    kind = "synthetic"

    def __init__(self, params: dict[str, Any]) -> None:
        self.spec = SyntheticSpec.from_params(params)

    def render(self, uris: list[str]) -> np.ndarray:
        """uint8 ``[N, size, size, 3]`` for many URIs at once (vectorised, much faster than one by one)."""
        try:
            idx = np.array([int(u) for u in uris], dtype=np.int64)
        except ValueError:
            raise DataError(f"not a synthetic image reference (an integer index): {uris[:3]!r}") from None
        return render(self.spec, idx)

    def decode(self, uri: str, draft_size: int | None = None) -> Decoded:
        return Decoded(Image.fromarray(self.render([uri])[0], "RGB"), ())

    def decode_tensor(self, uri: str) -> DecodedTensor:
        import torch

        return DecodedTensor(torch.from_numpy(self.render([uri])[0]).permute(2, 0, 1), ())


_SHARED: dict[str, ImageStore] = {}


def shared_store(meta: dict[str, Any]) -> ImageStore:
    """One store per process and source (a pool worker reuses Parquet handles and row-group caches)."""
    import json

    key = json.dumps(meta.get("source", meta), sort_keys=True)
    if key not in _SHARED:
        _SHARED[key] = open_image_store(meta)
    return _SHARED[key]


def open_image_store(meta: dict[str, Any], *, root: str | Path | None = None) -> ImageStore:
    """The store for a manifest's ``source`` metadata (or the whole ``supersub`` metadata dict).

    ``root`` overrides the recorded root of a ``folder`` source (a moved dataset).
    """
    source = meta.get("source", meta)
    kind = source.get("kind")
    if kind == "folder":
        return FolderStore(str(root or source["root"]))
    if kind == "parquet":
        return ParquetStore()
    if kind == "cifar100":
        return Cifar100Store()
    if kind == "synthetic":
        return SyntheticStore(source.get("params", {}))
    raise DataError(f"unknown image source kind {kind!r} in manifest metadata")
