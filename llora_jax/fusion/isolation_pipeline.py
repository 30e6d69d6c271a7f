"""Structural isolation: core regions per task, tasks clustered by core overlap, cores
transplanted, the rest merged on the sphere within clusters and added across clusters.

Steps (every coefficient and threshold an explicit argument, chosen on validation by the
caller):

a) Core region C_i of task i: its top-p fraction of elements, ranked over the whole
   flattened task vector, by |τ_i| (:func:`llora_jax.fusion.isolation.core_masks`, the
   rule of today's isolation merge) or by an importance score tree s_i
   (:func:`core_masks_by_score`; e.g. :func:`gradient_importance`, E[g²]·τ²).
b) Overlap J_ij = |C_i ∩ C_j| / |C_i ∪ C_j| (:func:`jaccard_matrix`); tasks clustered
   by average-linkage agglomeration on the distance 1 − J, cut where the average
   overlap between two clusters falls below ``threshold`` (:func:`cluster_tasks`).
c) Merge (:func:`pipeline_merge`), per element e:
   * claimed by some core: the owner's value τ_owner[e], unscaled, where the owner is
     the claiming task with the largest |τ_i[e]| (lowest task index on an exact tie);
   * claimed by no core ("non-core", support U): λ · Σ_clusters m_c[e], where
     m_c = spherical_mean({τ_i restricted to U : i ∈ c}) — the weighted Karcher mean
     of the restricted vectors' directions, scaled by their mean norm
     (:mod:`llora_jax.fusion.spherical`), computed over all leaves together (one
     vector per task). A cluster of one task gives m_c = τ_i on U, so with every task
     in its own cluster the pipeline is exactly :func:`~llora_jax.fusion.isolation`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.cluster.hierarchy as sch
from jax.flatten_util import ravel_pytree

from llora_jax.fusion.common import PyTree, check_taus, stack_leaves, topk_masks
from llora_jax.fusion.isolation import core_masks, owner_values
from llora_jax.fusion.spherical import spherical_mean
from llora_jax.interference.similarity import mean_off_diagonal

__all__ = [
    "core_masks_by_score",
    "gradient_importance",
    "jaccard_matrix",
    "mean_core_overlap",
    "cluster_tasks",
    "transplant_cores",
    "pipeline_merge",
    "isolation_pipeline",
    "pipeline_parts",
    "NAME",
    "THRESHOLD_GRID",
    "hparam_grid",
]

# The fusion search's name for the pipeline, and its default thresholds (issue 21's
# design: 1.0 keeps every task alone unless two cores are identical).
NAME = "isolation_pipeline"
THRESHOLD_GRID: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 1.0)


def hparam_grid() -> list[dict]:
    """Default grid: p ∈ {0.05, 0.1, 0.2} × threshold ∈ THRESHOLD_GRID × λ ∈ 0..1 step 0.1."""
    lams = [round(0.1 * i, 1) for i in range(11)]
    return [
        {"p": p, "threshold": t, "lam": lam}
        for p in (0.05, 0.1, 0.2)
        for t in THRESHOLD_GRID
        for lam in lams
    ]


def core_masks_by_score(scores: Sequence[PyTree], p: float) -> list[PyTree]:
    """Per task, its core: the top-p fraction of elements by ``scores[i]`` (non-negative
    trees shaped like the task vectors; ties at the threshold kept, a zero score never core)."""
    return topk_masks(scores, p, "p")


def gradient_importance(
    grad_fn: Callable[[PyTree, Any], PyTree], params: PyTree, batches: Iterable[Any], tau: PyTree
) -> PyTree:
    """Importance of each element for one task: mean over ``batches`` of grad_fn(params, b)²,
    times τ² (a diagonal-Fisher estimate of the loss change from removing τ there).

    ``grad_fn(params, batch)`` returns the loss gradient tree (shaped like ``tau``) at
    ``params`` (e.g. the fine-tuned adapter φ_i on the task's training data); pure.
    """
    total, count = None, 0
    for batch in batches:
        sq = jax.tree.map(lambda g: jnp.square(jnp.asarray(g, jnp.float32)), grad_fn(params, batch))
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        count += 1
    if count == 0:
        raise ValueError("gradient_importance: no batches given (pass the task's training batches)")
    return jax.tree.map(
        lambda s, t: (s / count) * jnp.square(jnp.asarray(t, jnp.float32)), total, tau
    )


def jaccard_matrix(masks: Sequence[PyTree]) -> np.ndarray:
    """n×n Jaccard index |C_i ∩ C_j| / |C_i ∪ C_j| of boolean trees (1 for two empty sets)."""
    masks = check_taus(masks)
    n = len(masks)
    inter = np.zeros((n, n), np.int64)
    for xs in zip(*(jax.tree.leaves(m) for m in masks)):
        m = jnp.stack([jnp.asarray(x, bool).reshape(-1) for x in xs]).astype(jnp.int32)
        inter += np.asarray(jnp.matmul(m, m.T, preferred_element_type=jnp.int32), np.int64)
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_core_overlap(masks: Sequence[PyTree]) -> float:
    """Mean off-diagonal Jaccard index of the core regions (the capacity study's overlap)."""
    return mean_off_diagonal(jaccard_matrix(masks))


def cluster_tasks(overlap: Any, threshold: float, linkage: str = "average") -> np.ndarray:
    """Cluster label per task (0, 1, ... in order of first appearance).

    Agglomerative clustering (``scipy.cluster.hierarchy``) on the distance 1 − J; two
    clusters join while their ``linkage`` overlap (average: the mean J over cross pairs)
    is at least ``threshold`` ∈ [0, 1]. threshold 0: one cluster; above every
    off-diagonal J: every task alone.
    """
    j = np.asarray(overlap, np.float64)
    if j.ndim != 2 or j.shape[0] != j.shape[1] or not np.allclose(j, j.T):
        raise ValueError(f"overlap must be a symmetric n×n matrix, got shape {j.shape}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a Jaccard index in [0, 1], got {threshold}")
    n = j.shape[0]
    if n == 1:
        return np.zeros(1, np.int64)
    dist = np.clip(1.0 - j, 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    z = sch.linkage(sch.distance.squareform(dist, checks=False), method=linkage)
    raw = sch.fcluster(z, t=1.0 - float(threshold), criterion="distance")
    first = {c: i for i, c in reversed(list(enumerate(raw)))}
    order = {c: k for k, c in enumerate(sorted(first, key=first.get))}
    return np.array([order[c] for c in raw], np.int64)


def transplant_cores(taus: Sequence[PyTree], masks: Sequence[PyTree]) -> tuple[PyTree, PyTree]:
    """(core values, claimed): the owner's τ where any core claims an element (else 0), and
    the boolean tree of claimed elements."""
    taus = check_taus(taus)

    def leaf(*xs):
        k = len(xs) // 2
        x, core = stack_leaves(xs[:k]), jnp.stack([jnp.asarray(c, bool) for c in xs[k:]])
        return owner_values(x, core).astype(jnp.asarray(xs[0]).dtype), core.any(0)

    pairs = jax.tree.map(leaf, *taus, *masks)
    outer = jax.tree.structure(taus[0])
    return jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)


def pipeline_merge(
    taus: Sequence[PyTree],
    masks: Sequence[PyTree],
    clusters: Sequence[int],
    lam: Any,
    *,
    weights: Sequence[float] | None = None,
    mean: str = "karcher",
    iterations: int = 30,
) -> PyTree:
    """Transplanted cores + λ · Σ_clusters spherical_mean(non-core parts of the cluster).

    ``masks``: per task its core (boolean trees); ``clusters``: a label per task (static);
    ``weights``: per task, its weight in its cluster's spherical mean (default equal);
    ``lam`` may be traced. See the module docstring for the exact rule.
    """
    taus = check_taus(taus)
    labels = [int(c) for c in clusters]
    if len(labels) != len(taus) or len(masks) != len(taus):
        raise ValueError(
            f"need one core mask and one cluster label per task vector: {len(taus)} task "
            f"vectors, {len(masks)} masks, {len(labels)} labels"
        )
    w = np.ones(len(taus)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(taus),) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be {len(taus)} finite non-negative numbers, got {weights}")
    core, claimed = transplant_cores(taus, masks)
    flat = []
    for tau in taus:
        rest = jax.tree.map(lambda t, c: jnp.where(c, 0, jnp.asarray(t, jnp.float32)), tau, claimed)
        vec, unravel = ravel_pytree(rest)
        flat.append(vec)
    total = jnp.zeros_like(flat[0])
    for c in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == c]
        rows = jnp.stack([flat[i] for i in members])
        total = total + spherical_mean(rows, w[members], mean=mean, iterations=iterations)
    merged_rest = unravel(lam * total)
    return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), core, merged_rest)


def pipeline_parts(
    taus: Sequence[PyTree], masks: Sequence[PyTree], membership: Any, iterations: int = 30
) -> tuple[PyTree, PyTree]:
    """(cores, rest) with ``pipeline_merge(..., lam) == cores + lam · rest``: jittable with the
    clusters traced, so one program serves every clustering of k tasks.

    ``membership``: (k, k) 0/1 matrix, [i, c] = 1 when task i is in cluster c (columns of
    unused labels are all 0 and add nothing); equal weights within a cluster.
    """
    taus = check_taus(taus)
    core, claimed = transplant_cores(taus, masks)
    flat = []
    for tau in taus:
        rest = jax.tree.map(lambda t, c: jnp.where(c, 0, jnp.asarray(t, jnp.float32)), tau, claimed)
        vec, unravel = ravel_pytree(rest)
        flat.append(vec)
    rows = jnp.stack(flat)
    member = jnp.asarray(membership, jnp.float32)
    total = jnp.zeros_like(flat[0])
    for c in range(len(taus)):
        w = member[:, c]
        used = jnp.sum(w) > 0
        m = spherical_mean(rows, jnp.where(used, w, 1.0), iterations=iterations)
        total = total + jnp.where(used, m, 0.0)
    rest = jax.tree.map(lambda a, b: b.astype(a.dtype), core, unravel(total))
    return core, rest


def isolation_pipeline(
    taus: Sequence[PyTree],
    p: float,
    threshold: float,
    lam: Any,
    *,
    scores: Sequence[PyTree] | None = None,
    linkage: str = "average",
    mean: str = "karcher",
    iterations: int = 30,
) -> tuple[PyTree, dict[str, Any]]:
    """Steps a) to c) end to end: (merged τ, {"masks", "overlap", "clusters"}).

    Cores by |τ| (or by ``scores`` when given), clustered at ``threshold``, merged with
    coefficient ``lam``. Not jittable as a whole (clustering runs on the host); jit
    :func:`pipeline_merge` with fixed clusters to sweep λ.
    """
    taus = check_taus(taus)
    masks = core_masks(taus, p) if scores is None else core_masks_by_score(scores, p)
    overlap = jaccard_matrix(masks)
    clusters = cluster_tasks(overlap, threshold, linkage)
    merged = pipeline_merge(taus, masks, clusters, lam, mean=mean, iterations=iterations)
    return merged, {"masks": masks, "overlap": overlap, "clusters": clusters}
