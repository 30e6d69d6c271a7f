"""Shared pieces of the fusion methods: input checks, top-k masks, the λ grid.

A task vector is a pytree (nested dict of arrays) τ_i = φ_i − φ0. All task
vectors given to one fusion call must share one tree structure and one shape
per leaf; everything here checks that with Python-level metadata only (paths
and shapes), so the checks also work on tracers inside ``jax.jit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import tree as tree_lib

PyTree = Any

# λ ∈ {0, 0.05, ..., 1.0}: the default coefficient grid for task arithmetic
# (and the λ axis of the TIES and isolation grids). Rounded so that the values
# print and serialise exactly.
LAMBDA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
# DARE has one more axis (p), so its λ axis is coarser: {0, 0.1, ..., 1.0}.
COARSE_LAMBDA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


def check_taus(taus: Sequence[PyTree]) -> list[PyTree]:
    """Return ``taus`` as a list after checking they can be merged element-wise.

    Raises ``ValueError`` on a non-list, an empty list, or a task vector whose
    paths, leaf shapes or tree type differ from task vector 0, naming the first
    differing path (in sorted path order).
    """
    if isinstance(taus, Mapping) or not isinstance(taus, (list, tuple)):
        raise ValueError(
            f"expected a list of task vectors (pytrees), got {type(taus).__name__}; "
            "wrap a single task vector as [tau]"
        )
    if len(taus) == 0:
        raise ValueError("no task vectors given: pass a non-empty list of task vectors")
    ref = tree_lib.flatten(taus[0])
    ref_def = jax.tree.structure(taus[0])
    for i, tau in enumerate(taus[1:], start=1):
        flat = tree_lib.flatten(tau)
        if flat.keys() != ref.keys():
            missing = set(ref) - set(flat)
            first = min(missing | (set(flat) - set(ref)))
            where = (
                f"missing from task vector {i}"
                if first in missing
                else (f"only in task vector {i}, not in task vector 0")
            )
            raise ValueError(
                f"task vector {i} has a different tree structure from task vector 0: "
                f"path {first!r} is {where}; all task vectors must come from the same "
                "adapter layout (same targets)"
            )
        for path, leaf in ref.items():
            if np.shape(flat[path]) != np.shape(leaf):
                raise ValueError(
                    f"task vector {i} differs from task vector 0 at path {path!r}: shape "
                    f"{tuple(np.shape(flat[path]))} != {tuple(np.shape(leaf))} (same targets "
                    "but a different rank or backbone?)"
                )
        if jax.tree.structure(tau) != ref_def:
            raise ValueError(
                f"task vector {i} has the same paths as task vector 0 but a different "
                f"container type: {jax.tree.structure(tau)} vs {ref_def}"
            )
    return list(taus)


def num_elements(tau: PyTree) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tau)))


def keep_count(frac: float, d: int, name: str = "k") -> int:
    """Number of elements that a top-``frac`` selection keeps out of ``d``: ceil(frac·d), >= 1.

    ``frac`` must be a Python number (it fixes an array size, so it is static under jit).
    The product is rounded to 9 decimals first so that e.g. 0.1·30 counts 3, not 4.
    """
    if isinstance(frac, bool) or not isinstance(frac, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a Python float (it is static under jit), got {frac!r}")
    if not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {frac}")
    if d == 0:
        raise ValueError("task vectors have no elements: nothing to select")
    return max(1, math.ceil(round(float(frac) * d, 9)))


def acc_dtype(dtype: Any) -> Any:
    """Accumulation dtype: at least float32 (bf16 sums of several tasks lose too much)."""
    return jnp.promote_types(dtype, jnp.float32)


def stack_leaves(xs: Sequence[jax.Array]) -> jax.Array:
    """(n, *shape) stack of one leaf across tasks, in the accumulation dtype."""
    xs = [jnp.asarray(x) for x in xs]
    return jnp.stack(xs).astype(acc_dtype(xs[0].dtype))


def topk_thresholds(taus: Sequence[PyTree], frac: float, name: str = "k") -> jax.Array:
    """Per task, the magnitude of its m-th largest |τ_i| element, m = ceil(frac·d), shape (n,).

    Computed over the whole flattened task vector (all leaves together). With
    frac = 1 no sort is needed and the threshold is 0.
    """
    d = num_elements(taus[0])
    m = keep_count(frac, d, name)
    if m == d:
        return jnp.zeros((len(taus),), jnp.float32)
    return thresholds_of_count(taus, m)


def thresholds_of_count(taus: Sequence[PyTree], m: Any) -> jax.Array:
    """Per task, its m-th largest |τ_i| element (n,); ``m`` (1..d) may be traced, so that one
    compiled program serves every keep fraction (``keep_count`` gives m on the host)."""
    d = num_elements(taus[0])
    index = d - jnp.asarray(m, jnp.int32)
    ths = [jnp.sort(jnp.abs(tree_lib.to_vector(t)).astype(jnp.float32))[index] for t in taus]
    return jnp.stack(ths)


def topk_keep(x: jax.Array, thresholds: jax.Array) -> jax.Array:
    """Boolean (n, *shape) mask of one stacked leaf: |x| >= threshold of its task, and x != 0.

    Elements tied with the threshold are all kept (so slightly more than m may
    be kept); exact zeros are never kept (an untouched parameter is not "top").
    """
    t = thresholds.reshape((-1,) + (1,) * (x.ndim - 1))
    a = jnp.abs(x)
    return (a >= t) & (a > 0)


def topk_masks(taus: Sequence[PyTree], frac: float, name: str = "k") -> list[PyTree]:
    """Per task, the boolean tree of its top-``frac`` elements by magnitude (see :func:`topk_keep`)."""
    taus = check_taus(taus)
    thr = topk_thresholds(taus, frac, name)
    masks = []
    for i, tau in enumerate(taus):
        masks.append(
            jax.tree.map(lambda x, i=i: topk_keep(jnp.asarray(x)[None], thr[i : i + 1])[0], tau)
        )
    return masks


def subset_masks(masks: Any, n: int) -> jax.Array:
    """Boolean (S, n) subset masks, checked: row s selects the tasks of subset s."""
    m = jnp.asarray(masks)
    if m.ndim != 2 or m.shape[1] != n:
        raise ValueError(f"subset masks must have shape (n_subsets, {n}), got {tuple(m.shape)}")
    return m.astype(bool)


def per_subset(fn: Any, taus: Sequence[PyTree], masks: Any, batch_size: int) -> Any:
    """``fn(x_masked)`` for every subset, mapped over the subset masks ``batch_size`` at a time.

    ``fn`` takes one tree of stacked leaves (n, *shape), in the accumulation dtype, where the
    tasks outside the subset are zero; outputs are stacked on a leading subset axis.
    """
    stacked = jax.tree.map(lambda *xs: stack_leaves(xs), *taus)
    masks = subset_masks(masks, len(taus))

    def one(mask):
        return fn(
            jax.tree.map(
                lambda x: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), stacked
            )
        )

    return jax.lax.map(one, masks, batch_size=batch_size)
