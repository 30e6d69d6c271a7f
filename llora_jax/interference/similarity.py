"""Interference diagnostics: cosine similarity of task vectors and of LoRA weight changes."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.fusion.common import PyTree, check_taus, stack_leaves


def cosine_matrix(taus: Sequence[PyTree], eps: float = 1e-12) -> np.ndarray:
    """n×n cosine similarity of the flattened task vectors (float64).

    The Gram matrix is accumulated leaf by leaf (float32 on device, float64
    across leaves), so no full flattened copy is made. A zero task vector has
    cosine 0 with everything, itself included.
    """
    taus = check_taus(taus)
    n = len(taus)
    gram = np.zeros((n, n), np.float64)
    for xs in zip(*(jax.tree.leaves(t) for t in taus)):
        x = stack_leaves(xs).reshape(n, -1)
        gram += np.asarray(jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST), np.float64)
    nrm = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(nrm, nrm)
    return np.where(denom > eps, gram / np.maximum(denom, eps), 0.0)


def mean_off_diagonal(m: np.ndarray) -> float:
    """Mean of m[i, j] over i != j (the average pairwise similarity)."""
    m = np.asarray(m, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {m.shape}")
    n = m.shape[0]
    if n < 2:
        raise ValueError("mean_off_diagonal needs at least a 2×2 matrix (two task vectors)")
    return float((m.sum() - np.trace(m)) / (n * (n - 1)))


def _layers(tree: PyTree, what: str) -> dict[str, dict[str, jax.Array]]:
    flat = tree_lib.flatten(tree)
    layers: dict[str, dict[str, jax.Array]] = {}
    for path, v in flat.items():
        prefix, _, leaf = path.rpartition("/")
        if leaf in ("A", "B"):
            layers.setdefault(prefix, {})[leaf] = v
    for prefix, lay in layers.items():
        if set(lay) != {"A", "B"}:
            raise ValueError(
                f"{what}: LoRA layer {prefix!r} has {sorted(lay)} but needs both A and B"
            )
    if not layers:
        raise ValueError(f"{what}: no LoRA layers found (expected leaves named .../A and .../B)")
    return layers


def lora_delta_w(
    tau_tree: PyTree,
    phi0_tree: PyTree,
    scale: float | Mapping[str, float],
    *,
    linearized: bool = False,
) -> dict[str, jax.Array]:
    """Per-layer weight change {layer path: ΔW (in, out)} that a LoRA task vector makes.

    With A = A0 + τA, B = B0 + τB and s = α/r (``scale``, or {layer path: s}):

        ΔW = s·A B − s·A0 B0 = s·(A0 τB + τA B0 + τA τB)            (LoRA)
        ΔW = s·(A0 τB + τA B0)                    (``linearized``: L-LoRA)

    The expanded form is used because it avoids cancelling two large products.
    Leaves other than A and B are ignored. Feed the per-task results to
    :func:`cosine_matrix` for the "merged ΔW" similarity.
    """
    taus = _layers(tau_tree, "tau_tree")
    phi0 = _layers(phi0_tree, "phi0_tree")
    out: dict[str, jax.Array] = {}
    for path, lay in taus.items():
        if path not in phi0:
            raise ValueError(f"LoRA layer {path!r} of the task vector is missing from phi0_tree")
        s = scale[path] if isinstance(scale, Mapping) else scale
        ta, tb = (jnp.asarray(lay[k], jnp.float32) for k in ("A", "B"))
        a0, b0 = (jnp.asarray(phi0[path][k], jnp.float32) for k in ("A", "B"))
        if ta.shape != a0.shape or tb.shape != b0.shape:
            raise ValueError(
                f"LoRA layer {path!r}: task vector shapes A{ta.shape} B{tb.shape} do not match "
                f"phi0 A{a0.shape} B{b0.shape}"
            )
        mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        dw = mm(a0, tb) + mm(ta, b0)
        if not linearized:
            dw = dw + mm(ta, tb)
        out[path] = s * dw
    return out
