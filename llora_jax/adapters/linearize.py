"""Linearization of any function of adapter parameters around φ0.

``l_lora`` linearizes each adapter branch (``attach.py`` calls ``jax.jvp`` on the
branch); ``l_lora_model`` linearizes the whole model with the helpers here. For
merge grids, :func:`linearize_outputs` returns f(φ0) and the Jacobian-vector
products J·τ_i once, so any Σ λ_i τ_i costs only a contraction afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from llora_jax.backbones.attention import forward_mode_ad

PyTree = Any


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def linearized_call(f: Callable[[PyTree], Any], phi0: PyTree, tau: PyTree) -> Any:
    """f(φ0) + ∂f(φ0)·τ for any f whose float outputs are differentiable in φ.

    Integer outputs (token ids, say) are returned as f(φ0): they have no tangent.
    """
    with forward_mode_ad():  # attention "auto" picks a path with a forward-mode rule
        y0, dy = jax.jvp(f, (phi0,), (tau,))
    return jax.tree.map(lambda a, b: a + b if _is_float(a) else a, y0, dy)


def linearize_outputs(f: Callable[[PyTree], Any], phi0: PyTree, taus: PyTree) -> tuple[Any, Any]:
    """(f(φ0), stacked J·τ_i) for task vectors stacked on a leading axis of ``taus``.

    With these, the output of the linearized model at φ0 + Σ λ_i τ_i is exactly
    f(φ0) + Σ λ_i (J τ_i): :func:`combine_linear`.
    """
    with forward_mode_ad():
        y0, jvp_fn = jax.linearize(f, phi0)
    return y0, jax.vmap(jvp_fn)(taus)


def combine_linear(y0: Any, jtaus: Any, lambdas: jax.Array) -> Any:
    """f(φ0) + Σ_i λ_i (J τ_i); ``lambdas`` has shape (K, n) → outputs with a leading K axis."""
    return jax.tree.map(
        lambda a, j: a[None] + jnp.tensordot(lambdas.astype(j.dtype), j, axes=(1, 0)), y0, jtaus
    )
