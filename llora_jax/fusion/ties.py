"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

1. Trim: each τ_i keeps its top-k fraction of elements by |τ_i|, ranked over
   the whole flattened task vector (all leaves together), as in the paper.
   m = ceil(k·d) elements are kept; every element tied with the m-th largest
   magnitude is kept too (so a few more than m may survive), and exact zeros
   are never kept. The rest is set to 0.
2. Elect: per element, γ = sign(Σ_i trimmed_i) (the sign with the larger total mass).
3. Disjoint mean: per element, the mean of the trimmed values that are nonzero
   and have sign γ (tasks that disagree or were trimmed do not count).
   Where γ = 0 (all trimmed values are 0, or they cancel exactly) the result is 0.
4. Scale: τ = λ · disjoint mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from llora_jax.fusion.common import (
    PyTree,
    check_taus,
    per_subset,
    stack_leaves,
    topk_keep,
    topk_thresholds,
)

# The paper's recommended setting: keep the top 20 %, λ = 1.
DEFAULT_K = 0.2
DEFAULT_LAM = 1.0


def ties_leaf(x: jax.Array, thresholds: jax.Array) -> jax.Array:
    """Unscaled TIES merge of one stacked leaf x (n, *shape) given per-task trim thresholds."""
    trimmed = jnp.where(topk_keep(x, thresholds), x, 0)
    elected = jnp.sign(trimmed.sum(0))
    # sign(v) of a nonzero v is ±1, so an element with γ = 0 has no agreeing task.
    agree = (trimmed != 0) & (jnp.sign(trimmed) == elected)
    count = agree.sum(0)
    total = jnp.where(agree, trimmed, 0).sum(0)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def ties(taus: Sequence[PyTree], k: float = DEFAULT_K, lam: Any = DEFAULT_LAM) -> PyTree:
    """TIES-merge of the task vectors; ``k`` in (0, 1] is static under jit, ``lam`` may be traced."""
    taus = check_taus(taus)
    thr = topk_thresholds(taus, k, "k")

    def leaf(*xs):
        return (lam * ties_leaf(stack_leaves(xs), thr)).astype(xs[0].dtype)

    return jax.tree.map(leaf, *taus)


def ties_subsets(
    taus: Sequence[PyTree],
    masks: Any,
    k: float = DEFAULT_K,
    lam: Any = DEFAULT_LAM,
    batch_size: int = 8,
    thresholds: Any = None,
) -> PyTree:
    """TIES merges of many subsets of ``taus`` at once, stacked on a leading axis (S, ...).

    ``masks`` (S, n) is boolean; entry s equals ``ties([taus[i] for i in subset s], k, lam)``.
    Trimming is per task (its threshold does not depend on the subset), and a task outside
    the subset, set to zero, is never kept, so it counts neither in the elected sign nor in
    the disjoint mean. ``batch_size`` subsets are merged at a time (memory: batch_size × n ×
    the largest leaf). ``thresholds`` (n,): the trim thresholds, given instead of ``k``
    (e.g. ``thresholds_of_count`` with a traced keep count: one program for every k).
    """
    taus = check_taus(taus)
    thr = topk_thresholds(taus, k, "k") if thresholds is None else thresholds
    dtypes = jax.tree.map(lambda x: jnp.asarray(x).dtype, taus[0])

    def merge(x):
        return jax.tree.map(lambda v, dt: (lam * ties_leaf(v, thr)).astype(dt), x, dtypes)

    return per_subset(merge, taus, masks, batch_size)
