"""Disentanglement error of a pair of task vectors (Ortiz-Jiménez et al.; the L-LoRA paper).

ξ(λ1, λ2) = E_{x∈D1}[pred(λ1τ1)(x) ≠ pred(λ1τ1 + λ2τ2)(x)]
          + E_{x∈D2}[pred(λ2τ2)(x) ≠ pred(λ1τ1 + λ2τ2)(x)]

Predictions on D1 use task 1's readout (its frozen head), those on D2 task
2's. The whole grid — G² joint models and G single-task models per dataset —
is evaluated as batched merge grids (one compiled program per batch shape;
for ``l_lora_model`` exactly, by linearity, from one forward and two JVPs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llora_jax.fusion.programs import Member, base_vector
from llora_jax.task_vectors import check_compatible

DEFAULT_GRID = tuple(round(-2.0 + 0.2 * i, 1) for i in range(21))


def _take(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in arrays.items()}


def disentanglement_error(
    m1: Member,
    m2: Member,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    split: str = "test",
    n_examples: int = 640,
    batch_size: int = 64,
    chunk: int = 21,
) -> np.ndarray:
    """ξ on the grid: array (G, G), rows λ1, columns λ2."""

    check_compatible([m1.tv, m2.tv])
    g = np.asarray(grid, np.float32)
    G = len(g)
    joint = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)  # (G², 2)
    zeros = np.zeros_like(g)
    zero = np.flatnonzero(g == 0.0)
    base, phi0 = base_vector([m1, m2])
    taus = [m1.tv.tau, m2.tv.tau]
    xi = np.zeros((G, G))
    for m, single, axis in (
        (m1, np.stack([g, zeros], 1), 0),
        (m2, np.stack([zeros, g], 1), 1),
    ):
        arr = _take(m.exp.arrays[split], n_examples)
        ev = m.grid(batch_size, chunk)
        pj = ev.predict(base, phi0, taus, joint, arr, m.exp.tm).reshape(G, G, -1)
        if zero.size:  # the single models are the joint grid's row or column at λ = 0
            ps = pj[:, zero[0]] if axis == 0 else pj[zero[0]]
        else:
            ps = ev.predict(base, phi0, taus, single, arr, m.exp.tm)  # (G, N)
        ref = ps[:, None, :] if axis == 0 else ps[None, :, :]
        xi += np.mean(pj != ref, axis=-1)
    return xi
