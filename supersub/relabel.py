"""The learned hierarchy stage: superclasses from the trained vanilla network's class similarity.

HD-CNN (Yan et al. 2015, https://arxiv.org/abs/1410.0736) builds its coarse categories from the
confusions of a trained flat network; here the similarity of classes ``i`` and ``j`` is the mean
probability the vanilla network gives class ``j`` on held-out (``val``) images of class ``i``, and
:func:`supersub.hierarchy.learn_hierarchy` clusters it spectrally into K superclasses. Classes
that the network confuses end up together, so more of its errors stay inside a superclass —
which is what the two-stage model needs.

The result is a new manifest (same images and splits, new indices) and a new stage folder in
which the vanilla networks' heads are permuted to the new fine order (exact: a row permutation).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supersub.data import load_manifest
from supersub.data.manifest import write_manifest
from supersub.hierarchy import Hierarchy, learn_hierarchy
from supersub.loaders import LoaderSpec, make_loader
from supersub.predictor import permute_head
from supersub.stages import DataOptions, load_network, save_network
from supersub.train import pick_device, predict_logits


def class_similarity(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """``[C, C]``: row ``i`` = mean predicted distribution over images of class ``i``."""
    sums = torch.zeros(num_classes, probs.shape[1]).index_add_(0, labels.long(), probs.float())
    counts = torch.bincount(labels.long(), minlength=num_classes).clamp_min(1)
    return (sums / counts[:, None]).numpy()


def relabel_manifest(src_dir: Path, hierarchy: Hierarchy, out_dir: Path) -> Path:
    """The manifest at ``src_dir`` with indices of ``hierarchy`` (which must hold the same classes)."""
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
    meta = {**src.meta, "hierarchy": hierarchy.name, "relabelled_from": str(src_dir)}
    return write_manifest(out_dir, columns, hierarchy, meta)


def learn_and_relabel(cfg: Any, out: Path, stages: Path, data: DataOptions, log=print) -> tuple[Path, Path]:
    """Learns ``cfg.data.hierarchy`` (``learned:K``) from ``stages/vanilla`` and returns the new
    manifest folder and stage folder (reused when they exist)."""
    k = int(cfg.data.hierarchy.split(":", 1)[1])
    new_data, new_stages = out / "data_learned", out / "stages_learned"
    if (new_data / "manifest.parquet").is_file() and (new_stages / "vanilla" / "metrics.json").is_file():
        log(f"learned hierarchy: reusing {new_data}")
        return new_data, new_stages
    manifest = load_manifest(data.manifest_dir)
    old = manifest.hierarchy
    device = pick_device(cfg.device)
    vanilla, _, class_ids = load_network(stages / "vanilla")
    loader = make_loader(manifest, LoaderSpec("val", "fine", False, 256), image_size=data.image_size,
                         mode=data.loader, device=device, num_workers=data.num_workers, cache_dir=data.cache_dir)
    logits, labels = predict_logits(vanilla.to(device), loader, device)
    sim = class_similarity(torch.softmax(logits, 1), labels, old.num_subclasses)
    names = [s.name for s in old.subclasses]
    learned = learn_hierarchy(sim, old.subclass_ids, names, k, seed=cfg.seed)
    log("learned hierarchy: " + ", ".join(f"{s.name} ({len(s.subclasses)})" for s in learned.superclasses))

    relabel_manifest(Path(data.manifest_dir), learned, new_data)
    for name in ("vanilla", "vanilla_scaled"):
        if not (stages / name / "metrics.json").is_file():
            continue
        model, spec, ids = load_network(stages / name)
        permute_head(model.fc, ids, learned.subclass_ids)
        save_network(model, spec, new_stages / name, learned.subclass_ids)
        shutil.copy(stages / name / "metrics.json", new_stages / name / "metrics.json")
    (new_stages / "similarity.json").write_text(json.dumps({"class_ids": old.subclass_ids, "similarity": sim.tolist()}))
    return new_data, new_stages
