"""Image sources behind one interface, and the source spec parser :func:`open_source`.

A source (:class:`supersub.data.source_base.ImageSource`) lists its images as references
(``uri``) that the matching image store (:mod:`supersub.data.store`) reads back, with a class id
and the source's own split. Sources and their splits:

============================  ==========================================  ===================
spec                          layout                                      manifest split
============================  ==========================================  ===================
``synthetic[:k=v,...]``       generated (:mod:`supersub.data.synthetic`)  train (+ test when
                                                                          ``test_per_class``)
``DIR`` (ImageNet folder)     ``DIR/train/<id>/**/*.jpg|png|...``         ``train/`` → train
                              ``DIR/val/<id>/**/*``                       ``val/``  → test
``DIR``, ``FILE``, ``GLOB``   Parquet shards ``image{bytes,path}``,       ``train-*`` → train
(Parquet)                     ``label``, ``wnid``                         ``val-*``, ``validation-*``,
                                                                          ``test-*`` → test
``cifar100:DIR``              torchvision's ``cifar-100-python``           train → train, test → test
============================  ==========================================  ===================

The source's own eval split (ImageNet's ``val``) becomes the manifest's ``test``: it is the
split that headline numbers are reported on, and the build holds a fresh ``val`` out of train.
Parquet rows without a label (``label`` null or -1, as in public ImageNet ``test-`` shards) are
skipped and counted in ``ImageList.unlabelled``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow.parquet as pq

from supersub.data.images import IMAGE_EXTENSIONS
from supersub.data.source_base import ImageList, ImageSource
from supersub.data.store import load_cifar100
from supersub.data.synthetic import SyntheticSource, SyntheticSpec
from supersub.errors import DataError

SOURCE_SPECS_HELP = (
    "synthetic[:key=value,...], cifar100:DIR, a folder of Parquet shards, a glob like DIR/*.parquet, "
    "or an ImageNet-style folder with train/<class>/ (and val/<class>/)"
)
# File-name prefix (or parent folder name) of a Parquet shard → manifest split.
_PARQUET_SPLITS = {"train": "train", "val": "test", "validation": "test", "test": "test"}


class FolderSource(ImageSource):
    """ImageNet-style folder: ``root/train/<class>/...`` and optionally ``root/val/<class>/...``."""

    kind = "folder"

    def __init__(self, root: str | Path) -> None:
        super().__init__(str(Path(root).resolve()))
        self._listing: ImageList | None = None

    def list_images(self) -> ImageList:
        if self._listing is not None:
            return self._listing
        root = Path(self.root)
        out = ImageList()
        for sub, split in (("train", "train"), ("val", "test")):
            split_dir = root / sub
            if not split_dir.is_dir():
                continue
            class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
            if not class_dirs:
                raise DataError(
                    f"{split_dir} has no class folders; expected {sub}/<class id>/<images> "
                    "(a flat ImageNet val/ must first be sorted into class folders)"
                )
            for cdir in class_dirs:
                # os.walk + sort: nested layouts (Tiny-ImageNet's <class>/images/) and a fixed order.
                for dirpath, dirnames, filenames in os.walk(cdir):
                    dirnames.sort()
                    for name in sorted(filenames):
                        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                            rel = os.path.relpath(os.path.join(dirpath, name), root)
                            out.append(rel, cdir.name, split, rel)
        if not len(out):
            raise DataError(f"no images found under {root}/train/<class>/ (extensions: {sorted(IMAGE_EXTENSIONS)})")
        self._listing = out
        return out


class ParquetSource(ImageSource):
    """Parquet shards with ``image: struct<bytes, path>``, ``label: int64``, ``wnid: string``.

    Only the small columns (``wnid``/``label``/``image.path``) are read to list images, one row
    group at a time, so listing ImageNet's 150 GB of shards reads a few MB.
    """

    kind = "parquet"

    def __init__(self, files: list[str | Path], imagenet_meta: str | Path | None = None) -> None:
        if not files:
            raise DataError("no Parquet files given")
        self.files = [str(Path(f).resolve()) for f in files]
        super().__init__(os.path.commonpath([os.path.dirname(f) for f in self.files]))
        self.imagenet_meta = imagenet_meta
        self._listing: ImageList | None = None

    def _split_of(self, path: str) -> str:
        name = os.path.basename(path).lower()
        for prefix, split in _PARQUET_SPLITS.items():
            if name.startswith(prefix + "-") or name.startswith(prefix + "_"):
                return split
        parent = os.path.basename(os.path.dirname(path)).lower()
        if parent in _PARQUET_SPLITS:
            return _PARQUET_SPLITS[parent]
        raise DataError(
            f"cannot tell the split of {path}: name shards train-*.parquet, val-*.parquet or test-*.parquet "
            "(or put them in folders train/, val/, test/)"
        )

    def _label_names(self, path: str) -> list[str] | None:
        """Class ids for shards without a ``wnid`` column: ``wnids.txt`` beside them, else ILSVRC's list."""
        for candidate in (
            Path(path).parent / "wnids.txt",
            Path(self.imagenet_meta) / "ilsvrc2012_wnids.txt" if self.imagenet_meta else None,
        ):
            if candidate is not None and candidate.is_file():
                return [w.strip() for w in candidate.read_text().split() if w.strip()]
        return None

    def list_images(self) -> ImageList:
        if self._listing is not None:
            return self._listing
        out = ImageList()
        for path in self.files:
            split = self._split_of(path)
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise DataError(f"{path}: not a readable Parquet file ({e})") from e
            names = set(pf.schema_arrow.names)
            if "image" not in names:
                raise DataError(f"{path}: no 'image' column (expected image: struct<bytes, path>, label, wnid)")
            has_path = "image.path" in {pf.schema.column(i).path for i in range(len(pf.schema))}
            columns = [c for c in ("wnid", "label") if c in names] + (["image.path"] if has_path else [])
            if "wnid" not in names and "label" not in names:
                raise DataError(f"{path}: neither a 'wnid' nor a 'label' column")
            label_names = None if "wnid" in names else self._label_names(path)
            row = 0
            for rg in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(rg, columns=columns).to_pydict()
                n = pf.metadata.row_group(rg).num_rows
                wnids = t.get("wnid") or [None] * n
                labels = t.get("label") or [None] * n
                paths = [p.get("path") if p else None for p in t["image"]] if has_path else [None] * n
                for i in range(n):
                    label = wnids[i]
                    if label is None and labels[i] is not None and labels[i] >= 0:
                        lab = int(labels[i])
                        label = label_names[lab] if label_names and lab < len(label_names) else str(lab)
                    if label is None:
                        out.unlabelled += 1
                    else:
                        uri = f"{path}#{row + i}"
                        out.append(uri, label, split, paths[i] or uri)
                row += n
        if not len(out):
            raise DataError(f"no labelled rows in {len(self.files)} Parquet file(s) under {self.root}")
        self._listing = out
        return out

    def describe(self) -> str:
        return f"parquet source: {len(self.files)} shard(s) under {self.root}"


class Cifar100Source(ImageSource):
    """CIFAR-100 in torchvision's on-disk format (``root/cifar-100-python``); class ids = fine label names."""

    kind = "cifar100"
    needs_verify = False  # uint8 arrays: nothing to decode

    def __init__(self, root: str | Path, download: bool = False) -> None:
        super().__init__(str(Path(root).resolve()))
        self.download = download

    @property
    def has_eval_split(self) -> bool:
        return True

    def list_images(self) -> ImageList:
        out = ImageList()
        for split in ("train", "test"):
            _, targets, classes = load_cifar100(self.root, split, download=self.download)
            for i, t in enumerate(targets):
                uri = f"cifar100:{self.root}#{split}:{i}"
                out.append(uri, classes[t], split, f"{split}:{i}")
        return out


def _parse_params(text: str, where: str) -> dict[str, str]:
    params = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise DataError(f"{where}: parameter {item!r} is not key=value")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def check_source(spec: str, *, download: bool = False) -> str:
    """Checks a source spec without reading the source (what can fail before a job starts):
    synthetic parameters parse, paths and globs exist. Returns the spec, stripped."""
    spec = str(spec).strip()
    if not spec:
        raise DataError(f"empty source spec; expected {SOURCE_SPECS_HELP}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        SyntheticSpec.from_params(_parse_params(spec[len("synthetic:") :], "synthetic"))
        return spec
    if spec.startswith("cifar100:"):
        root = Path(spec.split(":", 1)[1])
        if not download and not (root / "cifar-100-python").is_dir():
            raise DataError(f"CIFAR-100 not found at {root}/cifar-100-python (pass download to fetch it)")
        return spec
    path = spec.split(":", 1)[1] if spec.startswith(("parquet:", "folder:")) else spec
    if any(ch in path for ch in "*?["):
        if not any(f.endswith(".parquet") for f in glob.iglob(path, recursive=True)):
            raise DataError(f"no Parquet files match {path!r}")
    elif not Path(path).exists():
        raise DataError(f"source not found: {path} (expected {SOURCE_SPECS_HELP})")
    return spec


def open_source(spec: str | ImageSource, *, download: bool = False, imagenet_meta: str | Path | None = None) -> ImageSource:
    """Opens a source from its spec (see the module docstring); the folder kind is auto-detected.

    Args:
        spec: ``synthetic[:k=v,...]``, ``cifar100:DIR``, ``parquet:PATH``, ``folder:DIR``, or a
            path/glob whose kind is detected.
        download: CIFAR-100 only: download into ``DIR`` when it is missing there.
        imagenet_meta: folder with ``ilsvrc2012_wnids.txt``, to name classes of Parquet shards
            that carry only an integer ``label``.
    """
    if isinstance(spec, ImageSource):
        return spec
    spec = check_source(spec, download=download)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return SyntheticSource(SyntheticSpec.from_params(_parse_params(spec[len("synthetic:") :], "synthetic")))
    if spec.startswith("cifar100:"):
        root = Path(spec.split(":", 1)[1])
        if not download and not (root / "cifar-100-python").is_dir():
            raise DataError(f"CIFAR-100 not found at {root}/cifar-100-python (pass download to fetch it)")
        return Cifar100Source(root, download=download)
    kind = None
    if spec.startswith(("parquet:", "folder:")):
        kind, spec = spec.split(":", 1)
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        files = [f for f in files if f.endswith(".parquet")]
        if not files:
            raise DataError(f"no Parquet files match {spec!r}")
        return ParquetSource(files, imagenet_meta)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"source not found: {path} (expected {SOURCE_SPECS_HELP})")
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"{path} is a file but not a .parquet shard")
        return ParquetSource([path], imagenet_meta)
    if kind == "folder" or (kind is None and ((path / "train").is_dir() or (path / "val").is_dir())):
        return FolderSource(path)
    shards = sorted(str(p) for p in path.rglob("*.parquet"))
    if shards:
        return ParquetSource(shards, imagenet_meta)
    if kind is None and (path / "cifar-100-python").is_dir():
        return Cifar100Source(path)
    raise DataError(f"cannot tell what kind of image source {path} is; expected {SOURCE_SPECS_HELP}")
