"""DARE (Yu et al., 2023, "Language Models are Super Mario"): drop and rescale, then merge.

Each element of each τ_i is dropped (set to 0) with probability p and the
survivors are rescaled by 1/(1−p), so E[τ̃_i] = τ_i; the rescaled task vectors
are then merged by a base method (task arithmetic or TIES, ...).

Randomness is explicit: task i draws one mask over its whole flattened vector (leaves
in path order, as ``tree.to_vector``) with the key ``fold_in(key, i)``, so
:func:`random_masks` reproduces exactly the masks that :func:`dare` drew. (All tasks
are drawn by one random-number program: one draw per leaf would compile one program
per leaf shape, tens of seconds for a transformer's adapters.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.fusion.average import average
from llora_jax.fusion.common import PyTree, acc_dtype, check_taus
from llora_jax.fusion.task_arithmetic import task_arithmetic, weighted
from llora_jax.fusion.ties import ties

# Base methods DARE can feed. (Not the registry: importing it here would be circular.)
BASES = {"task_arithmetic": task_arithmetic, "ties": ties, "average": average, "weighted": weighted}


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def check_p(p: Any) -> None:
    """Raise ValueError unless the drop probability p (a number) is in [0, 1)."""
    if np.isscalar(p) and not 0.0 <= float(p) < 1.0:
        raise ValueError(f"DARE drop probability p must be in [0, 1), got {p}")


def random_masks(taus: Sequence[PyTree], p: Any, key: Any) -> list[PyTree]:
    """Per task, a boolean tree: True = element kept (probability 1 − p; p may be traced)."""
    taus = check_taus(taus)
    check_p(p)
    key = _as_key(key)
    leaves, treedef = jax.tree.flatten(taus[0])
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(taus)))
    flat = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - p, (sum(sizes),)))(keys)
    cuts = np.cumsum(sizes)[:-1]
    masks = []
    for row in flat:
        parts = jnp.split(row, cuts)
        masks.append(
            jax.tree.unflatten(treedef, [m.reshape(np.shape(x)) for m, x in zip(parts, leaves)])
        )
    return masks


def drop_and_rescale(taus: Sequence[PyTree], masks: Sequence[PyTree], p: Any) -> list[PyTree]:
    """τ̃_i = mask_i · τ_i / (1 − p) for given boolean masks (same trees as ``taus``)."""
    taus = check_taus(taus)
    check_p(p)
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
