"""Learning the hierarchy from the trained vanilla network (``data.hierarchy=learned:K``).

HD-CNN (Yan et al. 2015, https://arxiv.org/abs/1410.0736) builds its coarse categories from the
confusions of a trained flat network; here the similarity of classes ``i`` and ``j`` is the mean
probability the vanilla network gives class ``j`` on held-out (``val``) images of class ``i``, and
:func:`supersub.hierarchy.learn_hierarchy` clusters it spectrally into K superclasses (at least
``min_size`` classes each). Classes the network confuses end up together, so more of its errors
stay inside a superclass — which is what the two-stage model needs.

The output is a new manifest (same images and splits, the learned hierarchy's indices) in
``out_dir/data``. Networks trained on the first manifest are used on it by loading them in the
new class order (:func:`supersub.networks.load_network` permutes their heads, exactly).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from supersub import atomic
from supersub.data import load_manifest
from supersub.data.loaders import LoaderSpec, make_loader
from supersub.data.manifest import write_manifest
from supersub.epoch import predict_logits
from supersub.hierarchy import Hierarchy, learn_hierarchy
from supersub.networks import load_network
from supersub.tasks.base import DataOptions, Task, register


def class_similarity(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """``[C, C]``: row ``i`` = mean predicted distribution over images of class ``i``."""
    sums = torch.zeros(num_classes, probs.shape[1]).index_add_(0, labels.long(), probs.float())
    counts = torch.bincount(labels.long(), minlength=num_classes).clamp_min(1)
    return (sums / counts[:, None]).numpy()


def relabel_manifest(src_dir: str | Path, hierarchy: Hierarchy, out_dir: str | Path) -> Path:
    """The manifest at ``src_dir`` with the indices of ``hierarchy`` (which holds the same classes)."""
    src = load_manifest(src_dir)
    wnids = src.table.column("wnid").to_pylist()
    hierarchy.check_known(set(wnids))
    fine = np.array([hierarchy.fine_index(w) for w in wnids], dtype=np.int32)
    coarse = np.array(hierarchy.fine_to_coarse, dtype=np.int32)[fine]
    columns = {
        "uri": src.table.column("uri"),
        "wnid": src.table.column("wnid"),
        "subclass": fine,
        "superclass": coarse,
        "split": src.table.column("split"),
    }
    # The source manifest by fingerprint, not path: a moved output folder stays the same data.
    meta = {**src.meta, "hierarchy": hierarchy.name, "relabelled_from": src.fingerprint}
    return write_manifest(out_dir, columns, hierarchy, meta)


@register
@dataclass
class LearnedHierarchyTask(Task):
    kind: ClassVar[str] = "learned_hierarchy"

    k: int
    vanilla_dir: str
    data: DataOptions  # the manifest the vanilla network was trained on
    out_dir: str
    seed: int = 0  # of the clustering
    min_size: int = 1  # fewest classes per learned superclass
    inputs: dict[str, str | None] = field(default_factory=dict)  # {"vanilla": sha256}

    @property
    def name(self) -> str:
        return f"learned_{self.k}"

    @property
    def manifest_dir(self) -> Path:
        return Path(self.out_dir) / "data"

    def identity(self) -> dict[str, Any]:
        return {"k": self.k, "seed": self.seed, "min_size": self.min_size, "data": self.data.identity(),
                "inputs": dict(sorted(self.inputs.items()))}

    def run(self, ctx) -> dict[str, Any]:
        manifest = load_manifest(self.data.manifest_dir)
        old = manifest.hierarchy
        vanilla, _, _ = load_network(self.vanilla_dir, old.subclass_ids)
        loader = make_loader(manifest, LoaderSpec("val", "fine", False, 256), image_size=self.data.image_size,
                             mode=self.data.loader, device=ctx.device, num_workers=self.data.num_workers,
                             cache_dir=self.data.cache_dir)
        logits, labels = predict_logits(vanilla.to(ctx.device), loader, ctx.device)
        sim = class_similarity(torch.softmax(logits, 1), labels, old.num_subclasses)
        learned = learn_hierarchy(sim, old.subclass_ids, [s.name for s in old.subclasses], self.k, seed=self.seed,
                                  min_size=self.min_size)
        ctx.log("learned hierarchy: " + ", ".join(f"{s.name} ({len(s.subclasses)})" for s in learned.superclasses))
        relabel_manifest(self.data.manifest_dir, learned, self.manifest_dir)
        atomic.write_text(Path(self.out_dir) / "similarity.json",
                          json.dumps({"class_ids": old.subclass_ids, "similarity": sim.tolist()}))
        result = {"name": self.name, "sizes": [len(s.subclasses) for s in learned.superclasses]}
        self.write_result(result, ["similarity.json", "data"])
        return result
