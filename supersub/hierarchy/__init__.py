"""Two-level class hierarchies: the :class:`Hierarchy` type and the builders that make one.

``load_hierarchy(spec)`` turns a spec (``paper10``, ``cifar100``, ``auto:K``, a file) into a
:class:`Hierarchy`; ``learn_hierarchy`` builds ``learned:K`` from a trained network's confusions.
Pure Python + numpy: no torch, Ray or MLflow here.
"""

from supersub.hierarchy.builders import (
    IMAGENET_META_ENV,
    PAPER10_NODES,
    auto_partition,
    check_spec,
    cifar100,
    derive_paper10,
    from_mapping_file,
    load_hierarchy,
    paper10,
    read_class_list,
    resolve_imagenet_meta,
)
from supersub.hierarchy.core import FORMAT_VERSION, Hierarchy, HierarchyError, Subclass, Superclass
from supersub.hierarchy.learned import learn_hierarchy
from supersub.hierarchy.wordnet import WordNet, build_from_wordnet

__all__ = [
    "FORMAT_VERSION",
    "IMAGENET_META_ENV",
    "PAPER10_NODES",
    "Hierarchy",
    "HierarchyError",
    "Subclass",
    "Superclass",
    "WordNet",
    "auto_partition",
    "build_from_wordnet",
    "check_spec",
    "cifar100",
    "derive_paper10",
    "from_mapping_file",
    "learn_hierarchy",
    "load_hierarchy",
    "paper10",
    "read_class_list",
    "resolve_imagenet_meta",
]
