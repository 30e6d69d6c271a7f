"""Simple averaging: τ = (1/n) Σ τ_i (the "model soup" of the task vectors)."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from llora_jax.fusion.common import PyTree, check_taus, stack_leaves


def average(taus: Sequence[PyTree]) -> PyTree:
    """Element-wise mean of the task vectors; leaves keep their input dtype."""
    taus = check_taus(taus)
    return jax.tree.map(lambda *xs: stack_leaves(xs).mean(0).astype(xs[0].dtype), *taus)
