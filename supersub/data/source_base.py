"""The image source interface: :class:`ImageSource` and the :class:`ImageList` it returns.

The concrete sources and the spec parser :func:`supersub.data.sources.open_source` live in
:mod:`supersub.data.sources`, the synthetic generator's source in :mod:`supersub.data.synthetic`;
both import this module, which imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supersub.hierarchy.core import Hierarchy


@dataclass
class ImageList:
    """The images of a source, as parallel lists (one entry per image)."""

    uris: list[str] = field(default_factory=list)  # references the image store resolves
    labels: list[str] = field(default_factory=list)  # class ids (wnids, CIFAR names, s0c3)
    splits: list[str] = field(default_factory=list)  # "train" or "test" (the source's own eval split)
    keys: list[str] = field(default_factory=list)  # stable names (e.g. "train/n014/x.JPEG") for the split hash
    unlabelled: int = 0  # rows skipped because they carry no label

    def __len__(self) -> int:
        return len(self.uris)

    def append(self, uri: str, label: str, split: str, key: str) -> None:
        self.uris.append(uri)
        self.labels.append(label)
        self.splits.append(split)
        self.keys.append(key)


class ImageSource:
    """Base class: ``kind``, ``root``, :meth:`list_images`, :meth:`store_meta`, :meth:`own_hierarchy`."""

    kind = "base"
    needs_verify = True  # encoded files that can be bad (False for generated or array data)

    def __init__(self, root: str | None) -> None:
        self.root = root

    def list_images(self) -> ImageList:
        raise NotImplementedError

    @property
    def has_eval_split(self) -> bool:
        """Whether the source has its own eval split (→ manifest ``test``)."""
        return "test" in set(self.list_images().splits)

    def store_meta(self) -> dict[str, Any]:
        """What :func:`supersub.data.store.open_image_store` needs to read this source's URIs."""
        return {"kind": self.kind, "root": self.root, "params": {}}

    def own_hierarchy(self) -> Hierarchy | None:
        """The source's built-in hierarchy (hierarchy spec ``synthetic``), if it has one."""
        return None

    def describe(self) -> str:
        return f"{self.kind} source at {self.root}"
