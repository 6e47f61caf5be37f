"""ImageNet's WordNet as a tree, and superclasses built from chosen WordNet nodes.

ImageNet ships the WordNet noun graph as two files: ``wordnet.is_a.txt`` (one ``parent child``
edge a line) and ``words.txt`` (``wnid<TAB>synonym, synonym, ...``). WordNet is a DAG: some
synsets have several hypernyms. To get disjoint superclasses we turn it into a tree with the rule
of MadryLab's ``robustness`` library (``tools/imagenet_helpers.py``): each node keeps ONE parent,
the one on the LAST ``is_a`` line that names it as the child. The paper's superclass counts
(dog 116, bird 52, ...) are those of this tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from supersub.hierarchy.core import Hierarchy, HierarchyError, Subclass, Superclass

IS_A_FILE = "wordnet.is_a.txt"
WORDS_FILE = "words.txt"

# A WordNet path is at most ~20 edges long; this bound only guards against cycles in bad files.
_MAX_DEPTH = 100


def parse_is_a(lines: Iterable[str], source: str = IS_A_FILE) -> dict[str, str]:
    """``child -> parent`` from ``parent child`` lines; a child named again keeps the LAST parent."""
    parents: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise HierarchyError(f"{source}:{lineno}: expected 'parent child', got {line.strip()!r}")
        parent, child = parts
        parents[child] = parent  # later lines overwrite earlier ones: the single-parent rule
    return parents


def parse_words(lines: Iterable[str], source: str = WORDS_FILE) -> dict[str, str]:
    """``wnid -> first synonym`` from ``wnid<TAB>synonyms`` lines (e.g. ``"dog"`` for n02084071)."""
    names: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        wnid, sep, synonyms = line.partition("\t")
        if not sep:
            raise HierarchyError(f"{source}:{lineno}: expected 'wnid<TAB>synonyms', got {line!r}")
        names[wnid.strip()] = synonyms.split(",")[0].strip() or wnid.strip()
    return names


class WordNet:
    """The single-parent WordNet tree with readable names.

    ``parents`` maps a node to its one parent; ``names`` maps a node to its first synonym.
    """

    def __init__(self, parents: Mapping[str, str], names: Mapping[str, str] | None = None) -> None:
        self.parents: dict[str, str] = dict(parents)
        self.names: dict[str, str] = dict(names or {})

    @classmethod
    def load(cls, meta_dir: str | Path) -> WordNet:
        """Reads ``wordnet.is_a.txt`` and ``words.txt`` from an ImageNet metadata folder."""
        meta_dir = Path(meta_dir)
        files = [meta_dir / IS_A_FILE, meta_dir / WORDS_FILE]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HierarchyError(f"WordNet file(s) not found: {', '.join(missing)}")
        with files[0].open() as f:
            parents = parse_is_a(f, str(files[0]))
        with files[1].open() as f:
            names = parse_words(f, str(files[1]))
        return cls(parents, names)

    def name(self, wnid: str) -> str:
        return self.names.get(wnid, wnid)

    def ancestors(self, wnid: str) -> list[str]:
        """The parent, grandparent, ... up to the root (the node itself is not included)."""
        out: list[str] = []
        node = wnid
        while node in self.parents:
            node = self.parents[node]
            if node == wnid or len(out) >= _MAX_DEPTH:
                raise HierarchyError(f"WordNet has a cycle through {wnid}")
            out.append(node)
        return out

    def depth(self, wnid: str) -> int:
        """Edges from the root down to ``wnid`` (0 for a root)."""
        return len(self.ancestors(wnid))

    def is_under(self, wnid: str, node: str) -> bool:
        """Whether ``wnid`` is ``node`` or one of its descendants."""
        return wnid == node or node in self.ancestors(wnid)

    def descendants_among(self, node: str, leaves: Iterable[str]) -> list[str]:
        """The leaves (e.g. the ILSVRC classes) that are ``node`` or lie below it, sorted."""
        return sorted(leaf for leaf in set(leaves) if self.is_under(leaf, node))

    def covers(self, leaves: Iterable[str]) -> dict[str, list[str]]:
        """``node -> sorted leaves under it`` for every node above (or equal to) some leaf.

        One upward walk per leaf, cheaper than ``descendants_among`` for every node."""
        out: dict[str, list[str]] = {}
        for leaf in sorted(set(leaves)):
            for node in [leaf, *self.ancestors(leaf)]:
                out.setdefault(node, []).append(leaf)
        return out

    def path_edges(self, leaf: str, top: str) -> dict[str, str]:
        """The is-a edges ``child -> parent`` from ``leaf`` up to ``top`` (which must be above it)."""
        edges: dict[str, str] = {}
        node = leaf
        while node != top:
            parent = self.parents[node]
            edges[node] = parent
            node = parent
        return edges


def build_from_wordnet(
    wordnet: WordNet,
    superclass_wnids: Sequence[str],
    leaf_wnids: Iterable[str],
    name: str,
    superclass_names: Mapping[str, str] | None = None,
) -> Hierarchy:
    """A hierarchy whose superclass ``s`` holds the leaves under WordNet node ``s``.

    Superclasses keep the given order; subclasses are in sorted wnid order (the standard ILSVRC
    order). Leaves under none of the nodes are left out. ``parents`` holds the is-a edges from each
    subclass up to its superclass node, so mistake severity (LCA height) follows WordNet.
    """
    leaves = sorted(set(leaf_wnids))
    superclass_names = dict(superclass_names or {})
    if len(set(superclass_wnids)) != len(superclass_wnids):
        raise HierarchyError(f"hierarchy {name!r}: a superclass node is listed twice")
    owner: dict[str, str] = {}
    members: dict[str, list[str]] = {s: [] for s in superclass_wnids}
    chosen = set(superclass_wnids)
    for leaf in leaves:
        above = [n for n in [leaf, *wordnet.ancestors(leaf)] if n in chosen]
        if len(above) > 1:
            names = " and ".join(f"{n} ({wordnet.name(n)})" for n in above)
            raise HierarchyError(
                f"hierarchy {name!r}: class {leaf} ({wordnet.name(leaf)}) lies under both {names}; "
                "superclass nodes must not contain one another"
            )
        if above:
            owner[leaf] = above[0]
            members[above[0]].append(leaf)
    sups = []
    parents: dict[str, str] = {}
    for node in superclass_wnids:
        if not members[node]:
            raise HierarchyError(
                f"hierarchy {name!r}: superclass node {node} ({wordnet.name(node)}) covers none of the "
                f"{len(leaves)} classes"
            )
        subs = tuple(Subclass(leaf, wordnet.name(leaf)) for leaf in members[node])
        sups.append(Superclass(node, superclass_names.get(node, wordnet.name(node)), subs))
        for leaf in members[node]:
            parents.update(wordnet.path_edges(leaf, node))
    return Hierarchy(name, tuple(sups), parents)
