"""Metrics of hierarchical classification, from fine-class probabilities and labels.

All functions take ``probs [N, C]`` (fine classes in the hierarchy's order) and ``labels [N]``
(fine indices) and return plain Python numbers (percentages for accuracies), so the results go
straight into ``metrics.json`` and MLflow.
"""

from __future__ import annotations

import numpy as np
import torch

from supersub.hierarchy import Hierarchy


def _coarse(hierarchy: Hierarchy) -> torch.Tensor:
    return torch.tensor(hierarchy.fine_to_coarse)


def superclass_probs(fine_probs: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """``[N, S]``: the superclass probabilities a fine distribution ``[N, C]`` implies (the sum
    over each superclass's members), on the device of ``fine_probs``."""
    out = torch.zeros(fine_probs.shape[0], hierarchy.num_superclasses, device=fine_probs.device)
    return out.index_add_(1, _coarse(hierarchy).to(fine_probs.device), fine_probs.float())


def severity_matrix(hierarchy: Hierarchy) -> np.ndarray:
    """``[C, C]`` LCA heights: ``M[t, p]`` = steps from true class ``t`` up to its lowest common
    ancestor with prediction ``p`` (0 on the diagonal)."""
    ids = hierarchy.subclass_ids
    return np.array([[hierarchy.lca_height(t, p) for p in ids] for t in ids], dtype=np.int64)


def classification_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    hierarchy: Hierarchy,
    super_probs: torch.Tensor | None = None,
    severity: np.ndarray | None = None,
) -> dict[str, float]:
    """Fine top-1/top-5, superclass accuracy, share of errors that cross superclasses, mistake
    severity.

    ``super_probs`` (``[N, S]``), when given, is the model's own stage-one superclass
    distribution (a generalist); otherwise superclass accuracy is the one the fine prediction
    implies (its argmax's superclass)."""
    labels = labels.long()
    coarse = _coarse(hierarchy)
    pred = probs.argmax(1)
    correct = pred.eq(labels)
    k = min(5, probs.shape[1])
    top5 = probs.topk(k, 1).indices.eq(labels[:, None]).any(1)
    true_sup = coarse[labels]
    implied_sup = coarse[pred]
    errors = ~correct
    crossing = errors & implied_sup.ne(true_sup)
    n_err = int(errors.sum())
    sev = severity if severity is not None else severity_matrix(hierarchy)
    heights = torch.from_numpy(sev)[labels, pred].float()
    # The crossing share errors would have if they fell uniformly on the wrong classes: for an
    # image of a superclass with n of C classes, (C - n) of its C - 1 wrong answers cross.
    sizes = torch.bincount(coarse, minlength=hierarchy.num_superclasses).float()
    n_classes = probs.shape[1]
    chance = (n_classes - sizes[true_sup]) / max(1, n_classes - 1)
    out = {
        "top1": 100.0 * correct.float().mean().item(),
        "top5": 100.0 * top5.float().mean().item(),
        "superclass_acc": 100.0 * implied_sup.eq(true_sup).float().mean().item(),
        "crossing_error_share": 100.0 * int(crossing.sum()) / n_err if n_err else 0.0,
        "crossing_error_chance": 100.0 * chance[errors].mean().item() if n_err else 0.0,
        "mistake_severity": heights[errors].mean().item() if n_err else 0.0,
        "mean_lca_height": heights.mean().item(),
        "images": int(labels.numel()),
    }
    if super_probs is not None:
        out["stage1_superclass_acc"] = 100.0 * super_probs.argmax(1).eq(true_sup).float().mean().item()
    return out


def per_superclass_accuracy(probs: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy) -> list[float]:
    """Fine top-1 (%) over the images of each superclass."""
    coarse = _coarse(hierarchy)[labels.long()]
    correct = probs.argmax(1).eq(labels)
    return [
        100.0 * correct[coarse == s].float().mean().item() if (coarse == s).any() else float("nan")
        for s in range(hierarchy.num_superclasses)
    ]


def within_superclass_accuracy(probs: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy) -> list[float]:
    """Per superclass: top-1 (%) when the answer is restricted to the true superclass's members,
    i.e. what a network achieves with perfect routing."""
    out = []
    for s, members in enumerate(hierarchy.coarse_to_fine):
        rows = _coarse(hierarchy)[labels.long()] == s
        if not rows.any():
            out.append(float("nan"))
            continue
        local = probs[rows][:, members].argmax(1)
        out.append(100.0 * torch.tensor(members)[local].eq(labels[rows]).float().mean().item())
    return out


def confusion(pred: torch.Tensor, labels: torch.Tensor, n: int) -> np.ndarray:
    """``[n, n]`` counts: row = true class, column = predicted class."""
    idx = labels.long() * n + pred.long()
    return torch.bincount(idx, minlength=n * n).view(n, n).numpy()


def confusions(probs: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy) -> dict[str, np.ndarray]:
    """Superclass confusion ``[S, S]`` and the fine confusion ``[C, C]`` (whose diagonal blocks
    are the within-superclass confusions)."""
    pred = probs.argmax(1)
    coarse = _coarse(hierarchy)
    return {
        "superclass": confusion(coarse[pred], coarse[labels.long()], hierarchy.num_superclasses),
        "fine": confusion(pred, labels, hierarchy.num_subclasses),
    }


def most_confused_pairs(fine_confusion: np.ndarray, top: int = 20) -> list[tuple[int, int, int]]:
    """``(true, predicted, count)`` of the most frequent off-diagonal confusions."""
    c = fine_confusion.copy()
    np.fill_diagonal(c, 0)
    flat = np.argsort(-c, axis=None, kind="stable")[:top]
    n = c.shape[0]
    return [(int(i // n), int(i % n), int(c.flat[i])) for i in flat if c.flat[i] > 0]
