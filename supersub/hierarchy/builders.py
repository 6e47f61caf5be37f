"""Ready-made and derived hierarchies, and :func:`load_hierarchy`, which turns a spec into one.

Specs (see docs/architecture.md, "Hierarchy specs"):

* ``paper10``: the paper's 10 ImageNet superclasses (277 ILSVRC-2012 classes), shipped as JSON;
* ``cifar100``: CIFAR-100's own 20 coarse × 5 fine classes, shipped as JSON;
* ``auto:K``: K disjoint WordNet nodes chosen greedily over the given ImageNet classes;
* a path to a hierarchy JSON file, or to a custom ``.json`` / ``.csv`` mapping file.

``learned:K`` hierarchies are built by the pipeline (:func:`supersub.hierarchy.learned.learn_hierarchy`)
and loaded afterwards from the JSON file it writes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from supersub.hierarchy.core import Hierarchy, HierarchyError, Subclass, Superclass
from supersub.hierarchy.wordnet import WordNet, build_from_wordnet

DATA_DIR = Path(__file__).parent / "data"
IMAGENET_META_ENV = "SUPERSUB_IMAGENET_META"
ILSVRC_WNIDS_FILE = "ilsvrc2012_wnids.txt"

# The paper's superclasses (Wen et al. 2022), in the paper's order, with its short names.
PAPER10_NODES: dict[str, str] = {
    "n02084071": "dog",
    "n01503061": "bird",
    "n02159955": "insect",
    "n03405725": "furniture",
    "n02512053": "fish",
    "n02484322": "monkey",
    "n02958343": "car",
    "n02120997": "feline",
    "n04490091": "truck",
    "n13134947": "fruit",
}

Leftover = Literal["drop", "other"]


# ---------------------------------------------------------------- shipped hierarchies
def paper10() -> Hierarchy:
    """The paper's 10 superclasses over the 1000 ILSVRC-2012 classes (277 classes in all)."""
    return Hierarchy.load(DATA_DIR / "paper10.json")


def derive_paper10(imagenet_meta_dir: str | Path) -> Hierarchy:
    """Rebuilds :func:`paper10` from ImageNet's WordNet files (how ``data/paper10.json`` was made)."""
    meta = Path(imagenet_meta_dir)
    wnids_file = meta / ILSVRC_WNIDS_FILE
    if not wnids_file.is_file():
        raise HierarchyError(f"{wnids_file} not found (the 1000 ILSVRC-2012 wnids, one a line)")
    leaves = read_class_list(wnids_file)
    return build_from_wordnet(WordNet.load(meta), list(PAPER10_NODES), leaves, "paper10", PAPER10_NODES)


def cifar100() -> Hierarchy:
    """CIFAR-100's 20 coarse classes (official label order) × 5 fine classes (alphabetical)."""
    return Hierarchy.load(DATA_DIR / "cifar100.json")


# ---------------------------------------------------------------- auto:K
def auto_partition(
    wordnet: WordNet,
    leaf_wnids: Iterable[str],
    k: int,
    *,
    min_size: int = 2,
    max_size: int | None = None,
    leftover: Leftover = "drop",
) -> Hierarchy:
    """K disjoint WordNet nodes over the given classes, chosen greedily; deterministic.

    Candidates are the nodes of the single-parent tree that cover between ``min_size`` and
    ``max_size`` classes (default ``ceil(2.5 * n / k)``, so no superclass dwarfs the rest, and at
    most ``n - (k - 1) * min_size``, so one node cannot leave too little for the others). Of
    nodes covering exactly the same classes only the deepest (their lowest common ancestor, the
    most specific name) is kept. Then, largest cover first (ties: smaller wnid), a node is taken
    when it shares no class with the nodes taken before, until K are taken. Classes under none of
    them are dropped, or gathered in one extra superclass ``other`` when ``leftover="other"``.
    """
    leaves = sorted(set(leaf_wnids))
    if k < 1:
        raise HierarchyError(f"auto:K needs K >= 1, got {k}")
    if leftover not in ("drop", "other"):
        raise HierarchyError(f"leftover must be 'drop' or 'other', got {leftover!r}")
    unknown = [w for w in leaves if w not in wordnet.parents and w not in wordnet.names]
    if unknown:
        raise HierarchyError(f"{len(unknown)} class(es) not in WordNet: {', '.join(unknown[:8])}")
    if max_size is None:
        # A node bigger than n - (K-1)*min_size would leave too little for the other K-1.
        max_size = min(math.ceil(2.5 * len(leaves) / k), len(leaves) - (k - 1) * min_size)

    deepest: dict[tuple[str, ...], str] = {}
    for node, cover in wordnet.covers(leaves).items():
        if not min_size <= len(cover) <= max_size:
            continue
        key = tuple(cover)
        best = deepest.get(key)
        if best is None or (wordnet.depth(node), best) > (wordnet.depth(best), node):
            deepest[key] = node
    ranked = sorted(deepest.items(), key=lambda kv: (-len(kv[0]), kv[1]))

    chosen: list[str] = []
    covered: set[str] = set()
    for cover, node in ranked:
        if len(chosen) == k:
            break
        # In a tree two covers are nested or disjoint, so "disjoint" = "not above/below a pick".
        if covered.isdisjoint(cover):
            chosen.append(node)
            covered.update(cover)
    if len(chosen) < k:
        raise HierarchyError(
            f"auto:{k}: only {len(chosen)} disjoint WordNet nodes cover {min_size}..{max_size} of the "
            f"{len(leaves)} classes; use a smaller K"
        )
    hierarchy = build_from_wordnet(wordnet, chosen, leaves, f"auto:{k}")
    rest = [w for w in leaves if w not in covered]
    if leftover == "other" and rest:
        other = Superclass("other", "other", tuple(Subclass(w, wordnet.name(w)) for w in rest))
        hierarchy = Hierarchy(hierarchy.name, (*hierarchy.superclasses, other), hierarchy.parents)
    return hierarchy


# ---------------------------------------------------------------- custom mapping files
# One mapping row: (line number or None, subclass, superclass, subclass name, superclass name).
_Row = tuple[int | None, str, str, str | None, str | None]
_CSV_COLUMNS = ("subclass", "superclass", "subclass_name", "superclass_name")


def from_mapping_file(path: str | Path) -> Hierarchy:
    """A hierarchy from a custom file.

    * ``.json``: a hierarchy JSON (an object with ``superclasses``) or a flat
      ``{"subclass_id": "superclass_id", ...}`` object;
    * ``.csv``: header ``subclass,superclass`` and optionally ``subclass_name,superclass_name``.

    Superclasses are ordered by first appearance, subclasses by file order. A mapping file's
    hierarchy is named after the file's stem.
    """
    path = Path(path)
    if not path.is_file():
        raise HierarchyError(f"hierarchy file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HierarchyError(f"{path}: not valid JSON: {e}") from e
        if isinstance(data, dict) and "superclasses" in data:
            return Hierarchy.from_dict(data)
        if not isinstance(data, dict) or not data:
            raise HierarchyError(
                f"{path}: expected a hierarchy JSON (with 'superclasses') or a non-empty "
                "{subclass_id: superclass_id} object"
            )
        for sub, sup in data.items():
            if not sub or not isinstance(sup, str) or not sup:
                raise HierarchyError(
                    f"{path}: subclass {sub!r} must map to a non-empty superclass id, got {sup!r}"
                )
        return _from_rows(path.stem, [(None, sub, sup, None, None) for sub, sup in data.items()], path)
    if suffix == ".csv":
        return _from_rows(path.stem, _read_csv(path), path)
    raise HierarchyError(f"{path}: a mapping file must end in .json or .csv")


def _read_csv(path: Path) -> list[_Row]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if (
            header[:2] != ["subclass", "superclass"]
            or any(h not in _CSV_COLUMNS for h in header)
            or len(set(header)) != len(header)
        ):
            raise HierarchyError(
                f"{path}:1: header must be 'subclass,superclass' optionally followed by "
                f"subclass_name and/or superclass_name; got {','.join(header) or 'nothing'!r}"
            )
        rows: list[_Row] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines are harmless
            if len(row) != len(header):
                raise HierarchyError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}"
                )
            cells = dict(zip(header, (c.strip() for c in row)))
            if not cells["subclass"] or not cells["superclass"]:
                raise HierarchyError(f"{path}:{reader.line_num}: empty subclass or superclass")
            rows.append((reader.line_num, *(cells.get(c) for c in _CSV_COLUMNS)))  # type: ignore[arg-type]
    if not rows:
        raise HierarchyError(f"{path}: no rows after the header")
    return rows


def _from_rows(name: str, rows: Sequence[_Row], source: Path) -> Hierarchy:
    members: dict[str, list[Subclass]] = {}
    sup_names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for line, sub, sup, sub_name, sup_name in rows:
        where = f"{source}:{line}" if line is not None else str(source)
        if sub in owner:
            raise HierarchyError(f"{where}: subclass {sub} is listed twice (first under {owner[sub]})")
        owner[sub] = sup
        if sup_name:
            if sup_names.setdefault(sup, sup_name) != sup_name:
                raise HierarchyError(
                    f"{where}: superclass {sup} is named {sup_name!r} here but {sup_names[sup]!r} before"
                )
        members.setdefault(sup, []).append(Subclass(sub, sub_name or sub))
    return Hierarchy(
        name, tuple(Superclass(s, sup_names.get(s, s), tuple(subs)) for s, subs in members.items())
    )


# ---------------------------------------------------------------- specs
SPECS_HELP = "paper10, cifar100, auto:K, or a path to a hierarchy .json or a mapping .json/.csv file"


def read_class_list(path: str | Path) -> list[str]:
    """Class ids from a text file, one a line (like ``wnids.txt``); blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise HierarchyError(f"class list not found: {path}")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise HierarchyError(f"class list {path} is empty")
    return ids


def resolve_imagenet_meta(imagenet_meta: str | Path | None = None) -> Path:
    """The folder with ``wordnet.is_a.txt`` and ``words.txt``: the argument, else ``$SUPERSUB_IMAGENET_META``."""
    chosen = imagenet_meta or os.environ.get(IMAGENET_META_ENV)
    if not chosen:
        raise HierarchyError(
            "this hierarchy needs ImageNet's WordNet files (wordnet.is_a.txt, words.txt): pass "
            f"--imagenet-meta DIR (imagenet_meta=...) or set {IMAGENET_META_ENV}"
        )
    meta = Path(chosen)
    if not meta.is_dir():
        raise HierarchyError(f"ImageNet metadata folder not found: {meta}")
    return meta


def spec_k(spec: str, kind: str) -> int | None:
    """K of a ``kind:K`` spec (``auto:K``, ``learned:K``), None for a spec of another kind; a K
    that is not a positive integer raises, in one message for every place that reads specs."""
    head, sep, k = str(spec).strip().partition(":")
    if not (sep and head == kind):
        return None
    if not k.isdigit() or int(k) < 1:
        raise HierarchyError(f"{spec!r}: K in {kind}:K must be a positive integer")
    return int(k)


def load_hierarchy(
    spec: str,
    *,
    classes: Sequence[str] | None = None,
    imagenet_meta: str | Path | None = None,
    leftover: Leftover = "drop",
) -> Hierarchy:
    """The hierarchy a spec names (see the module docstring).

    ``classes`` (the dataset's class ids) restricts ``paper10``, ``cifar100`` and files to the
    classes present, and is the set of classes that ``auto:K`` partitions (required there).
    """
    spec = spec.strip()
    if spec in ("paper10", "cifar100"):
        hierarchy = paper10() if spec == "paper10" else cifar100()
    elif (k := spec_k(spec, "auto")) is not None:
        if not classes:
            raise HierarchyError(f"{spec} needs the list of classes to partition (--classes FILE)")
        wordnet = WordNet.load(resolve_imagenet_meta(imagenet_meta))
        return auto_partition(wordnet, classes, k, leftover=leftover)
    elif spec_k(spec, "learned") is not None:
        raise HierarchyError(
            f"{spec} is built by the pipeline from a trained network; pass the hierarchy JSON file it wrote"
        )
    elif spec.lower().endswith((".json", ".csv")):
        hierarchy = from_mapping_file(spec)
    else:
        raise HierarchyError(f"unknown hierarchy {spec!r}; expected {SPECS_HELP}")
    if classes is None:
        return hierarchy
    present = set(classes)
    if present.isdisjoint(hierarchy.subclass_ids):
        raise HierarchyError(f"none of the {len(present)} given classes is in hierarchy {hierarchy.name!r}")
    return hierarchy.restrict([s for s in hierarchy.subclass_ids if s in present])


def check_spec(spec: str, *, imagenet_meta: str | Path | None = None) -> None:
    """Checks a hierarchy spec without a dataset (what can fail before a job starts): a known
    name, ``auto:K`` with a positive K and WordNet files at hand, a file that exists and parses.
    ``synthetic`` (the synthetic source's own hierarchy) is accepted as is."""
    spec = str(spec).strip()
    if spec in ("paper10", "cifar100", "synthetic"):
        return
    if spec_k(spec, "auto") is not None:
        meta = resolve_imagenet_meta(imagenet_meta)
        for name in ("wordnet.is_a.txt", "words.txt"):
            if not (meta / name).is_file():
                raise HierarchyError(f"{spec} needs {meta / name}, which does not exist")
        return
    if spec.lower().endswith((".json", ".csv")):
        if not Path(spec).is_file():
            raise HierarchyError(f"hierarchy file not found: {spec}")
        from_mapping_file(spec)
        return
    raise HierarchyError(f"unknown hierarchy {spec!r}; expected {SPECS_HELP}, learned:K or synthetic")
