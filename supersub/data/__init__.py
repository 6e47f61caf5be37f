"""The data layer: image sources, decoding with bad-data accounting, manifests, datasets.

``supersub data build`` (:func:`build_manifest`) turns an image source (ImageNet-style folder,
Parquet shards, CIFAR-100, or the synthetic generator) and a hierarchy into a manifest folder;
:func:`load_manifest`, :class:`ManifestDataset` and :func:`decode_split` feed it to a model.
Core layer: torch, torchvision, numpy, pyarrow, pillow; never Ray or MLflow. torch and
torchvision are imported only when a dataset symbol is first used (PEP 562 ``__getattr__``), so
``supersub data show`` and builds do not pay seconds of torchvision import time.
"""

from typing import Any

from supersub.data.build import ManifestInfo, assign_splits, build_manifest
from supersub.data.images import EVENTS, BadDataReport, BadImageError, Decoded, decode_image, read_rgb
from supersub.data.manifest import Manifest, load_manifest
from supersub.data.source_base import ImageList, ImageSource
from supersub.data.sources import Cifar100Source, FolderSource, ParquetSource, open_source
from supersub.data.store import ImageStore, open_image_store
from supersub.data.synthetic import SyntheticSource, SyntheticSpec, render, synthetic_hierarchy

__all__ = [
    "EVENTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadDataReport",
    "BadImageError",
    "Cifar100Source",
    "Decoded",
    "FolderSource",
    "ImageList",
    "ImageSource",
    "ImageStore",
    "Manifest",
    "ManifestDataset",
    "ManifestInfo",
    "ParquetSource",
    "SyntheticSource",
    "SyntheticSpec",
    "assign_splits",
    "build_manifest",
    "build_transforms",
    "decode_image",
    "decode_split",
    "load_manifest",
    "open_image_store",
    "open_source",
    "read_rgb",
    "render",
    "synthetic_hierarchy",
]

_LAZY = {"IMAGENET_MEAN", "IMAGENET_STD", "ManifestDataset", "build_transforms", "decode_split"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from supersub.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'supersub.data' has no attribute {name!r}")
