"""``build_manifest``: source + hierarchy → a manifest folder with deterministic splits.

Steps: list the source's images → keep the requested classes → resolve the hierarchy → handle
source classes outside it (``leftover``) → decode every image once and convert-or-skip bad
ones (``verify``) → split → write ``manifest.parquet`` + ``hierarchy.json`` atomically → print a
table per superclass and the bad-data report.

Classes outside the hierarchy. Whatever the hierarchy spec (``paper10``, ``auto:K``, a user's
file), a source class the hierarchy does not contain is not an error: a hierarchy file that
lists a subset of a source's classes is the natural way to select those classes. With
``leftover="drop"`` (default) their images are left out, and the build says how many classes
and images that was; with ``leftover="other"`` they are gathered in one extra superclass
``other`` so that every image is kept. The opposite case, a hierarchy class without a single
(usable) image, is a :class:`DataError`: a model head for a class it never sees is a bug.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supersub.data.images import SKIP_EVENTS, BadDataReport
from supersub.data.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT_VERSION,
    SPLITS,
    summary_table,
    write_manifest,
)
from supersub.data.parallel import Progress, default_workers, parallel_map
from supersub.data.source_base import ImageSource
from supersub.data.sources import open_source
from supersub.data.store import shared_store
from supersub.errors import DataError
from supersub.hierarchy.core import Hierarchy, Subclass, Superclass

# Verification decodes JPEGs at reduced size (DCT scaling): truncation and corruption are still
# found, at a fraction of the cost of full-size decoding of large photos.
VERIFY_DRAFT_SIZE = 64
_CHUNK = 512  # images per worker task (Parquet: about one row group)


@dataclass
class ManifestInfo:
    """What a build wrote: the folder, the hierarchy, counts per split and the bad-data report."""

    out_dir: Path
    hierarchy: Hierarchy
    images: dict[str, int]  # per split
    counts: dict[str, int]  # bad-data events (see supersub.data.images.EVENTS)
    dropped_classes: list[str] = field(default_factory=list)  # source classes outside the hierarchy
    dropped_images: int = 0
    seconds: float = 0.0

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_FILE

    @property
    def num_images(self) -> int:
        return sum(self.images.values())


def split_hash(seed: int, key: str) -> int:
    """A 64-bit hash of ``(seed, key)``: the per-image sort key of the stratified split."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "little")


def assign_splits(
    keys: Sequence[str], fine: np.ndarray, source_split: Sequence[str], *, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Manifest splits for images: the source's ``test`` stays ``test``; its ``train`` is split.

    Within each class, train images are ranked by :func:`split_hash` of their stable key, so the
    result depends neither on file order nor on other classes; the first
    ``round(n·val_fraction)`` become ``val``, the next ``round(n·test_fraction)`` ``test``. Every
    class keeps at least one train image.

    Returns:
        object array ``[N]`` of ``train``/``val``/``test``.
    """
    fine = np.asarray(fine)
    out = np.asarray(source_split, dtype=object).copy()
    train = np.flatnonzero(out == "train")
    if not len(train) or (val_fraction <= 0 and test_fraction <= 0):
        return out
    h = np.fromiter((split_hash(seed, keys[i]) for i in train), dtype=np.uint64, count=len(train))
    order = train[np.lexsort((h, fine[train]))]  # by class, then hash
    cls = fine[order]
    starts = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    for start, size in zip(starts, sizes):
        n_val = int(np.floor(size * val_fraction + 0.5))
        n_test = int(np.floor(size * test_fraction + 0.5))
        n_test = max(0, min(n_test, size - 1))
        n_val = max(0, min(n_val, size - 1 - n_test))
        out[order[start : start + n_val]] = "val"
        out[order[start + n_val : start + n_val + n_test]] = "test"
    return out


def _verify_chunk(task: tuple[dict[str, Any], list[str]]) -> list[tuple[str, ...]]:
    """Worker: decode each uri of a chunk once; returns its bad-data events (``()`` = clean)."""
    meta, uris = task
    store = shared_store(meta)
    return [store.decode(u, draft_size=VERIFY_DRAFT_SIZE).events for u in uris]


def verify_images(
    meta: dict[str, Any], uris: Sequence[str], *, workers: int, progress: bool = True
) -> tuple[np.ndarray, BadDataReport]:
    """Decodes every image once; returns a keep mask ``bool [N]`` and the bad-data report."""
    chunks = [(meta, list(uris[i : i + _CHUNK])) for i in range(0, len(uris), _CHUNK)]
    bar = Progress(len(uris), "verify", enabled=progress)
    report = BadDataReport()
    keep = np.ones(len(uris), dtype=bool)
    pos = 0
    for events_list in parallel_map(_verify_chunk, chunks, workers=workers, sizes=lambda c, _: len(c[1]), progress=bar):
        for events in events_list:
            if events:
                report.add(events, uris[pos])
                if SKIP_EVENTS.intersection(events):
                    keep[pos] = False
            pos += 1
    bar.close()
    return keep, report


def _read_classes(classes: Sequence[str] | str | Path | None) -> list[str] | None:
    if classes is None or isinstance(classes, (list, tuple)):
        return None if classes is None else [str(c) for c in classes]
    path = Path(classes)
    if not path.is_file():
        raise DataError(f"class list not found: {path}")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [i for i in ids if i]


def _resolve_hierarchy(
    spec: str | Hierarchy, source: ImageSource, classes: list[str], wanted: list[str] | None, imagenet_meta: Any, leftover: str
) -> Hierarchy:
    if isinstance(spec, Hierarchy):
        # Like load_hierarchy with classes=: keep the hierarchy's classes that were asked for.
        return spec if wanted is None else spec.restrict([c for c in spec.subclass_ids if c in set(wanted)])
    if str(spec) == "synthetic":
        own = source.own_hierarchy()
        if own is None:
            raise DataError(f"hierarchy 'synthetic' means the source's own hierarchy, and {source.describe()} has none")
        return own
    from supersub.hierarchy import load_hierarchy

    return load_hierarchy(str(spec), classes=classes, imagenet_meta=imagenet_meta, leftover=leftover)


def _with_other(hierarchy: Hierarchy, outside: list[str], imagenet_meta: Any) -> Hierarchy:
    """``hierarchy`` plus one superclass ``other`` holding the ``outside`` classes (WordNet names if known)."""
    names = {c: c for c in outside}
    try:
        from supersub.hierarchy import WordNet, resolve_imagenet_meta

        wordnet = WordNet.load(resolve_imagenet_meta(imagenet_meta))
        names = {c: wordnet.name(c) or c for c in outside}
    except Exception:  # noqa: BLE001 - no WordNet files, or ids that are not wnids: keep the ids
        pass
    sup_id = "other" if "other" not in hierarchy.superclass_ids else "other_leftover"
    extra = Superclass(sup_id, sup_id, tuple(Subclass(c, names[c]) for c in outside))
    return Hierarchy(hierarchy.name, (*hierarchy.superclasses, extra), hierarchy.parents)


def build_manifest(
    source_spec: str | ImageSource,
    hierarchy_spec_or_obj: str | Hierarchy,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    seed: int = 0,
    classes: Sequence[str] | str | Path | None = None,
    imagenet_meta: str | Path | None = None,
    verify: bool = True,
    num_workers: int | None = None,
    progress: bool = True,
    leftover: str = "drop",
    download: bool = False,
) -> ManifestInfo:
    """Builds a manifest folder (see the module docstring and ``docs/architecture.md``).

    Args:
        source_spec: see :func:`supersub.data.sources.open_source`, or an open source.
        hierarchy_spec_or_obj: a spec for ``load_hierarchy``, ``"synthetic"`` (the source's own
            hierarchy), or a :class:`Hierarchy`.
        val_fraction / test_fraction: shares of each class's train images held out as
            ``val`` / ``test``; ``test_fraction`` defaults to ``val_fraction`` when the source has
            no eval split, else to 0 (its eval split is ``test``).
        classes: class ids (or a file of them, one a line) to keep from the source.
        verify: decode every image once; skip and count bad ones (else the manifest lists all).
        num_workers: processes for verification (default: all cores; 0 or 1: in this process).
        progress: print the progress bar (stderr), the table and the report (stdout).
        leftover: ``drop`` or ``other``: what happens to source classes outside the hierarchy.
        download: CIFAR-100 only: download it into its root when missing.
    """
    start = time.monotonic()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise DataError(f"--out {out_dir} is a file, not a folder")
    if leftover not in ("drop", "other"):
        raise DataError(f"leftover must be 'drop' or 'other', got {leftover!r}")
    source = open_source(source_spec, download=download, imagenet_meta=imagenet_meta)
    if test_fraction is None:
        test_fraction = 0.0 if source.has_eval_split else val_fraction
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 with a sum below 1")
    say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    listing = source.list_images()
    present = sorted(set(listing.labels))
    say(f"source: {source.describe()}: {len(listing)} images, {len(present)} classes")
    wanted = _read_classes(classes)
    if wanted is not None:
        missing = sorted(set(wanted) - set(present))
        if missing:
            raise DataError(f"{len(missing)} requested class(es) not in the source: {', '.join(missing[:8])}")
        present = sorted(set(wanted))

    hierarchy = _resolve_hierarchy(hierarchy_spec_or_obj, source, present, wanted, imagenet_meta, leftover)
    known = set(hierarchy.subclass_ids)
    outside = [c for c in present if c not in known]
    if outside and leftover == "other":
        hierarchy, outside = _with_other(hierarchy, outside, imagenet_meta), []
    outside_set = set(outside)
    dropped_images = sum(1 for lab in listing.labels if lab in outside_set)
    if outside:
        say(
            f"hierarchy {hierarchy.name!r} leaves out {len(outside)} of the source's classes "
            f"({dropped_images} images), e.g. {', '.join(outside[:5])}"
        )
    # Rows: images of classes that are both wanted and in the hierarchy, minus bad images.
    present_set = set(present)
    fine_of = {c: i for i, c in enumerate(hierarchy.subclass_ids) if c in present_set}
    rows = np.flatnonzero(np.fromiter((lab in fine_of for lab in listing.labels), dtype=bool, count=len(listing)))
    report = BadDataReport()
    verified = bool(verify and source.needs_verify)
    if verified and len(rows):
        workers = default_workers() if num_workers is None else num_workers
        keep, report = verify_images(source.store_meta(), [listing.uris[i] for i in rows], workers=workers, progress=progress)
        rows = rows[keep]
    fine = np.fromiter((fine_of[listing.labels[i]] for i in rows), dtype=np.int32, count=len(rows))
    empty = np.flatnonzero(np.bincount(fine, minlength=hierarchy.num_subclasses) == 0)
    if len(empty):
        ids = ", ".join(hierarchy.subclass_ids[i] for i in empty[:8])
        raise DataError(f"{len(empty)} class(es) of hierarchy {hierarchy.name!r} have no usable images in {source.describe()}: {ids}")

    keys, src_split = [listing.keys[i] for i in rows], [listing.splits[i] for i in rows]
    split = assign_splits(keys, fine, src_split, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    images = {s: int((split == s).sum()) for s in SPLITS}
    build_opts = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, verify=verify, verified=verified)
    build_opts.update(leftover=leftover, dropped_classes=len(outside), dropped_images=dropped_images)
    meta = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "source": source.store_meta(),
        "hierarchy": hierarchy.name,
        "counts": report.as_dict(),
        "images": images,
        "build": {**build_opts, "unlabelled": listing.unlabelled},
    }
    columns = {
        "uri": [listing.uris[i] for i in rows],
        "wnid": [listing.labels[i] for i in rows],
        "subclass": fine,
        "superclass": np.asarray(hierarchy.fine_to_coarse, dtype=np.int32)[fine],
        "split": split.tolist(),
    }
    out = Path(write_manifest(out_dir, columns, hierarchy, meta))
    seconds = time.monotonic() - start
    say(summary_table(hierarchy, fine, split))
    if verified:
        say(report.format())
    if listing.unlabelled:
        say(f"unlabelled rows skipped: {listing.unlabelled}")
    say(f"wrote {out / MANIFEST_FILE}: {len(rows)} images in {seconds:.1f} s")
    return ManifestInfo(out, hierarchy, images, report.as_dict(), outside, dropped_images, seconds)
