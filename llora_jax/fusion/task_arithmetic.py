"""Task arithmetic (Ilharco et al. 2023): τ = λ Σ τ_i, and its per-task form Σ λ_i τ_i."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.fusion.common import PyTree, acc_dtype, check_taus, stack_leaves


def task_arithmetic(taus: Sequence[PyTree], lam: Any) -> PyTree:
    """λ Σ_i τ_i with one scalar λ (may be a traced value, e.g. under ``vmap`` over a λ grid)."""
    taus = check_taus(taus)
    if np.ndim(lam) != 0:
        raise ValueError(
            f"task_arithmetic takes one scalar lam, got shape {np.shape(lam)}; "
            "use weighted(taus, lams) for one coefficient per task"
        )

    def leaf(*xs):
        return (lam * stack_leaves(xs).sum(0)).astype(xs[0].dtype)

    return jax.tree.map(leaf, *taus)


def weighted(taus: Sequence[PyTree], lams: Any) -> PyTree:
    """Σ_i λ_i τ_i with one coefficient per task (``lams`` has shape (n,); may be traced)."""
    taus = check_taus(taus)
    if np.shape(lams) != (len(taus),):
        raise ValueError(
            f"weighted needs one coefficient per task vector: lams has shape {np.shape(lams)}, "
            f"expected ({len(taus)},)"
        )

    def leaf(*xs):
        x = stack_leaves(xs)
        w = jnp.asarray(lams, acc_dtype(x.dtype))
        return jnp.tensordot(w, x, axes=1).astype(xs[0].dtype)

    return jax.tree.map(leaf, *taus)
