"""Superclasses learned from a trained network's confusions (``learned:K``).

Like HD-CNN's coarse categories: classes the network confuses with each other belong together.
The input is a class-similarity matrix, e.g. row ``i`` = the mean softmax over held-out images of
class ``i``. It is symmetrised, and spectral clustering (normalised Laplacian, Ng-Jordan-Weiss
row normalisation, k-means) splits the classes into K superclasses. Pure numpy, deterministic
for a given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from supersub.hierarchy.core import Hierarchy, HierarchyError, Subclass, Superclass

_RESTARTS = 10
_MAX_ITER = 100


def learn_hierarchy(
    similarity: np.ndarray,
    class_ids: Sequence[str],
    class_names: Sequence[str],
    k: int,
    *,
    name: str | None = None,
    min_size: int = 1,
    seed: int = 0,
) -> Hierarchy:
    """K superclasses from a ``[C, C]`` class similarity (larger = more alike).

    Superclass ids are ``learned_0``, ``learned_1``, ... ordered by size (largest first), then by
    their smallest class index; subclasses keep the input order. A superclass's name is the names
    of its two most central members (highest similarity to the rest of the cluster).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    c = len(class_ids)
    if sim.shape != (c, c) or len(class_names) != c:
        raise HierarchyError(
            f"similarity must be [C, C] with C = {c} class ids and names; got {sim.shape} and {len(class_names)} names"
        )
    if not np.all(np.isfinite(sim)):
        raise HierarchyError("similarity has NaN or infinite entries")
    if not 1 <= k <= c or k * min_size > c:
        raise HierarchyError(f"cannot split {c} classes into {k} clusters of at least {min_size}")
    affinity = _affinity(sim)
    x = _embedding(affinity, k)
    labels = _fill_small(_best_kmeans(x, k, seed), x, k, min_size)

    clusters = [np.flatnonzero(labels == j) for j in range(k)]
    clusters.sort(key=lambda idx: (-len(idx), int(idx[0])))
    sups = []
    for j, idx in enumerate(clusters):
        subs = tuple(Subclass(str(class_ids[i]), str(class_names[i])) for i in idx)
        sups.append(Superclass(f"learned_{j}", _cluster_name(affinity, idx, class_names), subs))
    return Hierarchy(name or f"learned:{k}", tuple(sups))


def _affinity(sim: np.ndarray) -> np.ndarray:
    """Symmetric, non-negative, zero diagonal: a class's similarity to itself says nothing about
    which *other* classes it goes with, and would swamp the off-diagonal mass."""
    a = np.clip((sim + sim.T) / 2.0, 0.0, None)
    np.fill_diagonal(a, 0.0)
    return a


def _embedding(affinity: np.ndarray, k: int) -> np.ndarray:
    """Rows of the top-k eigenvectors of D^-1/2 A D^-1/2 (= bottom of the normalised Laplacian),
    each scaled to unit length."""
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))  # isolated classes: no division by zero
    m = inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    _, vectors = np.linalg.eigh(m)  # ascending eigenvalues
    u = vectors[:, -k:]
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    return u / np.maximum(norms, 1e-12)


def _best_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The lowest-inertia labels of several k-means runs, all drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(_RESTARTS):
        labels, inertia = _kmeans(x, k, rng)
        if inertia < best_inertia - 1e-12:  # strict: the first of equal solutions wins
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return best_labels


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Lloyd's k-means from a k-means++ start; an emptied cluster takes the worst-fit point."""
    n = len(x)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(x[rng.choice(n, p=p)])
    centers_arr = np.array(centers)
    labels = np.full(n, -1)
    for _ in range(_MAX_ITER):
        d2 = ((x[:, None, :] - centers_arr[None]) ** 2).sum(-1)
        new = d2.argmin(axis=1)
        for j in range(k):
            if not np.any(new == j):
                # Take the worst-fitting point among clusters that keep at least one member.
                fit = d2[np.arange(n), new].copy()
                fit[np.bincount(new, minlength=k)[new] <= 1] = -np.inf
                new[int(np.argmax(fit))] = j
        if np.array_equal(new, labels):
            break
        labels = new
        centers_arr = np.array([x[labels == j].mean(axis=0) for j in range(k)])
    inertia = float(((x - centers_arr[labels]) ** 2).sum())
    return labels, inertia


def _fill_small(labels: np.ndarray, x: np.ndarray, k: int, min_size: int) -> np.ndarray:
    """Grows clusters below ``min_size`` with the nearest points of clusters that can spare one."""
    labels = labels.copy()
    for j in range(k):
        while np.sum(labels == j) < min_size:
            center = x[labels == j].mean(axis=0) if np.any(labels == j) else np.zeros(x.shape[1])
            sizes = np.bincount(labels, minlength=k)
            donors = np.flatnonzero(sizes[labels] > min_size)
            nearest = donors[np.argmin(((x[donors] - center) ** 2).sum(-1))]
            labels[nearest] = j
    return labels


def _cluster_name(affinity: np.ndarray, idx: np.ndarray, names: Sequence[str]) -> str:
    if len(idx) == 1:
        return str(names[idx[0]])
    within = affinity[np.ix_(idx, idx)].sum(axis=1)
    top = idx[np.argsort(-within, kind="stable")[:2]]
    label = " / ".join(str(names[i]) for i in sorted(top))
    return label + (f" +{len(idx) - 2}" if len(idx) > 2 else "")
