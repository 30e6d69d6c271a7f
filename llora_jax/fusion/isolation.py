"""Parameter isolation: each task keeps its most important ("core") elements.

Core set C_i of task i: its top-p fraction of elements by |τ_i|, ranked over the
whole flattened task vector (same rule as TIES trimming: m = ceil(p·d), ties at
the threshold kept, exact zeros never core).

Merge, per element:
* if some task claims it as core, it takes that task's value τ_owner, unscaled
  (the task-specific value is kept as fine-tuned); when several tasks claim it,
  the owner is the one with the largest |τ_i| there (lowest task index on an
  exact tie);
* otherwise it is merged by task arithmetic, λ Σ_i τ_i.

:func:`core_overlap` measures how much the core sets collide (Jaccard index);
a high overlap means the tasks compete for the same parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.fusion.common import (
    PyTree,
    check_taus,
    per_subset,
    stack_leaves,
    topk_keep,
    topk_thresholds,
)
from llora_jax.fusion.common import topk_masks as _topk_masks


def core_masks(taus: Sequence[PyTree], p: float) -> list[PyTree]:
    """Per task, the boolean tree of its core elements."""
    return _topk_masks(taus, p, "p")


def core_overlap(taus: Sequence[PyTree], p: float) -> np.ndarray:
    """n×n Jaccard index |C_i ∩ C_j| / |C_i ∪ C_j| of the core sets (1 for two empty sets)."""
    taus = check_taus(taus)
    thr = topk_thresholds(taus, p, "p")
    n = len(taus)
    inter = np.zeros((n, n), np.int64)
    for xs in zip(*(jax.tree.leaves(t) for t in taus)):
        m = topk_keep(stack_leaves(xs), thr).reshape(n, -1).astype(jnp.int32)
        # int32 counts per leaf (exact up to 2^31 elements), summed over leaves in int64.
        inter += np.asarray(jnp.matmul(m, m.T, preferred_element_type=jnp.int32), np.int64)
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def isolation_parts(x: jax.Array, thresholds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(core, rest) of one stacked leaf x (n, *shape); its isolation merge is core + λ·rest.

    core: the owner's value where some task claims the element, else 0; rest: Σ_i τ_i
    where no task claims it, else 0 (disjoint supports, so the sum is exact).
    """
    core = topk_keep(x, thresholds)
    claimed = core.any(0)
    return owner_values(x, core), jnp.where(claimed, 0, x.sum(0))


def owner_values(x: jax.Array, core: jax.Array) -> jax.Array:
    """Transplanted cores of one stacked leaf x (n, *shape) given the claims ``core`` (n, *shape):
    where some task claims an element, the value of the claiming task with the largest |τ_i|
    there (lowest task index on an exact tie); 0 where no task claims it."""
    score = jnp.where(core, jnp.abs(x), -1.0)
    owner = jnp.argmax(score, axis=0)  # first maximum: lowest task index on ties
    owned = jnp.take_along_axis(x, owner[None], axis=0)[0]
    return jnp.where(core.any(0), owned, 0)


def isolation_leaf(x: jax.Array, thresholds: jax.Array, lam: Any) -> jax.Array:
    """Isolation merge of one stacked leaf x (n, *shape)."""
    core, rest = isolation_parts(x, thresholds)
    return core + lam * rest


def isolation(taus: Sequence[PyTree], p: float, lam: Any) -> PyTree:
    """Core elements keep their owner's value, the rest is λ Σ τ_i; ``p`` is static under jit."""
    taus = check_taus(taus)
    thr = topk_thresholds(taus, p, "p")

    def leaf(*xs):
        return isolation_leaf(stack_leaves(xs), thr, lam).astype(xs[0].dtype)

    return jax.tree.map(leaf, *taus)


def isolation_subsets(
    taus: Sequence[PyTree], masks: Any, p: float, batch_size: int = 8
) -> tuple[PyTree, PyTree]:
    """(core, rest) of many subsets of ``taus`` at once, each stacked on a leading axis (S, ...).

    ``masks`` (S, n) is boolean; ``core[s] + λ · rest[s]`` equals
    ``isolation([taus[i] for i in subset s], p, λ)`` for every λ (core sets are per task, so
    a task outside the subset, set to zero, neither claims nor adds anything).
    """
    taus = check_taus(taus)
    thr = topk_thresholds(taus, p, "p")
    dtypes = jax.tree.map(lambda x: jnp.asarray(x).dtype, taus[0])

    def parts(x):
        pairs = jax.tree.map(
            lambda v, dt: tuple(a.astype(dt) for a in isolation_parts(v, thr)), x, dtypes
        )
        return jax.tree.transpose(jax.tree.structure(x), jax.tree.structure((0, 0)), pairs)

    return per_subset(parts, taus, masks, batch_size)
