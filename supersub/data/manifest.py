"""The manifest folder: ``manifest.parquet`` (one row per usable image) + ``hierarchy.json``.

Columns: ``uri`` (string), ``wnid`` (string), ``subclass`` (int32, fine index), ``superclass``
(int32), ``split`` (``train``/``val``/``test``). The Parquet schema metadata key ``supersub``
holds JSON: ``format_version``, ``source`` (kind, root, params: what the image store needs),
``hierarchy`` (name), ``counts`` (the bad-data report), ``images`` (count per split) and
``build`` (the options of the build that wrote it).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from supersub.atomic import sha256_file
from supersub.data.store import ImageStore, open_image_store
from supersub.errors import DataError
from supersub.hierarchy.core import Hierarchy, HierarchyError

MANIFEST_FILE = "manifest.parquet"
HIERARCHY_FILE = "hierarchy.json"
META_KEY = b"supersub"
MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("wnid", pa.string()),
        ("subclass", pa.int32()),
        ("superclass", pa.int32()),
        ("split", pa.string()),
    ]
)


@dataclass
class Manifest:
    """A loaded manifest: the table, its hierarchy and its metadata (see the module docstring)."""

    path: Path  # the manifest folder
    table: pa.Table
    hierarchy: Hierarchy
    meta: dict[str, Any]

    def __len__(self) -> int:
        return self.table.num_rows

    @functools.cached_property
    def uris(self) -> list[str]:
        return self.table.column("uri").to_pylist()

    @functools.cached_property
    def subclass(self) -> np.ndarray:
        """Fine indices, int32 ``[N]``."""
        return self.table.column("subclass").to_numpy().astype(np.int32)

    @functools.cached_property
    def superclass(self) -> np.ndarray:
        """Superclass indices, int32 ``[N]``."""
        return self.table.column("superclass").to_numpy().astype(np.int32)

    @functools.cached_property
    def split(self) -> np.ndarray:
        """Split names, an object array ``[N]`` (a Python string per row: for reports; the
        loaders use :meth:`indices`, which holds one byte a row)."""
        return np.asarray(self.table.column("split").to_pylist(), dtype=object)

    @functools.cached_property
    def split_codes(self) -> np.ndarray:
        """int8 ``[N]``: each row's split as its index in :data:`SPLITS` (-1: none). At 1.28 M
        rows, 1.3 MB where :attr:`split` holds ~80 MB of Python strings."""
        import pyarrow.compute as pc

        column = self.table.column("split")
        codes = np.full(len(self), -1, dtype=np.int8)
        for k, name in enumerate(SPLITS):
            codes[pc.fill_null(pc.equal(column, name), False).to_numpy()] = k
        return codes

    def indices(self, split: str) -> np.ndarray:
        """Row indices (int64) of one split, in manifest order."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.split_codes == SPLITS.index(split))

    def counts(self) -> dict[str, int]:
        return {s: int((self.split_codes == k).sum()) for k, s in enumerate(SPLITS)}

    def uri_array(self, rows: np.ndarray) -> UriArray:
        """The URIs of ``rows`` without a Python string per row (:class:`UriArray`: a view of the
        table's column, no copy)."""
        return UriArray(self.table.column("uri"), np.asarray(rows, dtype=np.int64))

    def store(self) -> ImageStore:
        return open_image_store(self.meta)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of ``manifest.parquet`` (keys caches of decoded images); the file is read for it
        once a process, however many times it is opened (:func:`supersub.atomic.sha256_file`)."""
        return sha256_file(self.path / MANIFEST_FILE)


class UriArray:
    """Some rows of the manifest's ``uri`` column, read in place: 8 bytes a row (the row index)
    and no Python object per row, so DataLoader workers forked from the process share the
    column's pages instead of copying those that per-object reference counts touch (at 1.28 M
    rows a Python list of the URIs is ~120 MB in every process). ``uris[i]`` is a ``str``."""

    def __init__(self, column: pa.ChunkedArray, rows: np.ndarray) -> None:
        self.column, self.rows = column, rows

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, i: int) -> str:
        return self.column[int(self.rows[i])].as_py()

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _atomic_write(path: Path, write: Any) -> None:
    """Writes via ``write(tmp_path)`` to a temp file in the same folder, then renames over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_manifest(out_dir: str | Path, columns: dict[str, Any], hierarchy: Hierarchy, meta: dict[str, Any]) -> Path:
    """Writes ``hierarchy.json`` then ``manifest.parquet`` into ``out_dir``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns, schema=SCHEMA)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    _atomic_write(out / HIERARCHY_FILE, lambda tmp: Path(tmp).write_text(hierarchy.to_json() + "\n"))
    _atomic_write(out / MANIFEST_FILE, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return out


def _manifest_file(path: str | Path) -> Path:
    folder = Path(path)
    if folder.name == MANIFEST_FILE:
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"manifest folder not found: {folder}")
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise DataError(f"{folder} is not a manifest folder (no {MANIFEST_FILE}); make one with `supersub data build`")
    return file


def _parquet_error(file: Path, e: Exception) -> DataError:
    return DataError(f"{file}: not a readable Parquet file ({e})")


def _check_files(file: Path, schema: pa.Schema) -> tuple[dict[str, Any], Hierarchy]:
    """The manifest's metadata and hierarchy, given its Parquet schema: what every read checks."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DataError(f"{file} was not written by supersub (no 'supersub' schema metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise DataError(f"{file}: manifest format version {meta.get('format_version')} is not supported")
    missing = [c for c in SCHEMA.names if c not in schema.names]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(missing)}")
    folder = file.parent
    if not (folder / HIERARCHY_FILE).is_file():
        raise DataError(f"{folder}: {HIERARCHY_FILE} is missing next to {MANIFEST_FILE}")
    try:
        hierarchy = Hierarchy.load(folder / HIERARCHY_FILE)
    except HierarchyError as e:
        raise DataError(f"{folder / HIERARCHY_FILE}: {e}") from e
    return meta, hierarchy


def check_manifest(path: str | Path) -> None:
    """Refuses a folder that is not a manifest, with one line — reading its files' footer and
    hierarchy, not its rows (a check before a job, which then reads the rows once)."""
    file = _manifest_file(path)
    try:
        schema = pq.read_schema(file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise _parquet_error(file, e) from e
    _check_files(file, schema)


def load_manifest(path: str | Path) -> Manifest:
    """Loads a manifest folder (or its ``manifest.parquet``) written by :func:`build_manifest`."""
    file = _manifest_file(path)
    try:
        table = pq.read_table(file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise _parquet_error(file, e) from e
    meta, hierarchy = _check_files(file, table.schema)
    folder = file.parent
    manifest = Manifest(folder, table.select(SCHEMA.names), hierarchy, meta)
    pa.default_memory_pool().release_unused()  # what the Parquet read left unused: ~60 MB at 1.28 M rows
    if len(manifest) and int(manifest.subclass.max()) >= hierarchy.num_subclasses:
        raise DataError(f"{folder}: subclass indices exceed the {hierarchy.num_subclasses} classes of {HIERARCHY_FILE}")
    return manifest


def summary_table(hierarchy: Hierarchy, subclass: np.ndarray, split: np.ndarray) -> str:
    """Per superclass: its subclasses and images per split, plus a total line (plain text)."""
    f2c = np.asarray(hierarchy.fine_to_coarse, dtype=np.int64)
    coarse = f2c[np.asarray(subclass, dtype=np.int64)] if len(subclass) else np.zeros(0, np.int64)
    name_w = max([len("superclass")] + [len(s.name[:32]) for s in hierarchy.superclasses])
    head = f"{'superclass':<{name_w}}  {'id':<12} {'classes':>7} " + " ".join(f"{s:>8}" for s in SPLITS)
    lines = [head, "-" * len(head)]
    for si, sup in enumerate(hierarchy.superclasses):
        in_sup = coarse == si
        cells = " ".join(f"{int((in_sup & (split == s)).sum()):>8}" for s in SPLITS)
        lines.append(f"{sup.name[:32]:<{name_w}}  {sup.id[:12]:<12} {len(sup.subclasses):>7} {cells}")
    cells = " ".join(f"{int((split == s).sum()):>8}" for s in SPLITS)
    lines += ["-" * len(head), f"{'total':<{name_w}}  {'':<12} {hierarchy.num_subclasses:>7} {cells}"]
    return "\n".join(lines)
