"""DARE (Yu et al., 2023, "Language Models are Super Mario"): drop and rescale, then merge.

Each element of each τ_i is dropped (set to 0) with probability p and the
survivors are rescaled by 1/(1−p), so E[τ̃_i] = τ_i; the rescaled task vectors
are then merged by a base method (task arithmetic or TIES, ...).

Randomness is explicit: task i, leaf j (in path order) uses the key
``fold_in(fold_in(key, i), j)``, so :func:`random_masks` reproduces exactly the
masks that :func:`dare` drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.fusion._common import PyTree, acc_dtype, check_taus
from llora_jax.fusion.average import average
from llora_jax.fusion.task_arithmetic import task_arithmetic, weighted
from llora_jax.fusion.ties import ties

# Base methods DARE can feed. (Not the registry: importing it here would be circular.)
BASES = {"task_arithmetic": task_arithmetic, "ties": ties, "average": average, "weighted": weighted}


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def _check_p(p: Any) -> None:
    if np.isscalar(p) and not 0.0 <= float(p) < 1.0:
        raise ValueError(f"DARE drop probability p must be in [0, 1), got {p}")


def random_masks(taus: Sequence[PyTree], p: Any, key: Any) -> list[PyTree]:
    """Per task, a boolean tree: True = element kept (probability 1 − p)."""
    taus = check_taus(taus)
    _check_p(p)
    key = _as_key(key)
    masks = []
    for i, tau in enumerate(taus):
        ki = jax.random.fold_in(key, i)
        leaves, treedef = jax.tree.flatten(tau)
        kept = [
            jax.random.bernoulli(jax.random.fold_in(ki, j), 1.0 - p, jnp.shape(x))
            for j, x in enumerate(leaves)
        ]
        masks.append(jax.tree.unflatten(treedef, kept))
    return masks


def drop_and_rescale(taus: Sequence[PyTree], masks: Sequence[PyTree], p: Any) -> list[PyTree]:
    """τ̃_i = mask_i · τ_i / (1 − p) for given boolean masks (same trees as ``taus``)."""
    taus = check_taus(taus)
    _check_p(p)
    if len(masks) != len(taus):
        raise ValueError(f"got {len(masks)} masks for {len(taus)} task vectors")

    def leaf(x, m):
        x = jnp.asarray(x)
        xa = x.astype(acc_dtype(x.dtype))
        return jnp.where(m, xa / (1.0 - p), 0).astype(x.dtype)

    return [jax.tree.map(leaf, t, m) for t, m in zip(taus, masks)]


def dare(
    taus: Sequence[PyTree],
    p: Any,
    key: Any,
    base: str = "task_arithmetic",
    **kw: Any,
) -> PyTree:
    """Drop-and-rescale every task vector with probability ``p``, then merge with ``base``.

    ``key`` is a JAX PRNG key or an int seed; ``kw`` goes to the base method
    (``lam`` for task arithmetic, ``k`` and ``lam`` for TIES, ``lams`` for weighted).
    """
    if base not in BASES:
        raise ValueError(f"unknown DARE base method {base!r}; valid: {sorted(BASES)}")
    dropped = drop_and_rescale(taus, random_masks(taus, p, key), p)
    return BASES[base](dropped, **kw)
