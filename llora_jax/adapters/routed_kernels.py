"""Per-example adapter branches for one dense layer: the four routed implementations.

Every function takes one layer of a stacked bank (see :mod:`llora_jax.adapters.routed`),
the layer input ``x`` of shape (R, ..., d_in) and ``ids`` (R,), one adapter index per
leading row (−1 = no adapter), and returns Δy of shape (R, ..., d_out) with

    Δy[i] = s[ids[i]] · (x[i] A[ids[i]]) B[ids[i]]          (0 where ids[i] = −1)

All give the same numbers up to float rounding; they differ in work and traffic
(R rows of T tokens, bank of N adapters of rank r, layer d_in → d_out):

=========  ====================================  ========================================
impl       FLOPs per token (adapter part)        extra bytes moved per layer
=========  ====================================  ========================================
gather     2 r (d_in + d_out)                    R r (d_in + d_out) (gathered A and B)
ragged     2 r (d_in + d_out) if grouped          the ≤ min(N, R) distinct A, B read once;
           (N× that if lowered to a masked        a sort and an unsort of the activations
           dense product)
onehot     2 N r (d_in + d_out)                  the whole bank, N r (d_in + d_out)
shared_a   2 r d_in (dense) + 2 r d_out           R r d_out (gathered B only)
dense      2 d_in d_out                           R d_in d_out (gathered dense ΔW)
=========  ====================================  ========================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rows(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """x as (R, T, d_in) with T = product of the middle dims (1 for a 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1]), x.shape[:-1]


def _row_scale(scale: jax.Array, ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(index clipped to a valid entry, per-row scale that is 0 for −1 rows)."""
    safe = jnp.maximum(ids, 0)
    return safe, jnp.where(ids >= 0, scale[safe], 0.0).astype(dtype)


def gather(layer: dict, x: jax.Array, ids: jax.Array) -> jax.Array:
    """Each row's A and B gathered, then two batched matmuls: minimum FLOPs."""
    xr, lead = _rows(x)
    safe, s = _row_scale(layer["scale"], ids, x.dtype)
    a = layer["A"][safe].astype(x.dtype)  # (R, d_in, r)
    b = layer["B"][safe].astype(x.dtype)  # (R, r, d_out)
    h = jnp.einsum("rti,rik->rtk", xr, a)
    y = jnp.einsum("rtk,rko->rto", h, b) * s[:, None, None]
    return y.reshape(*lead, y.shape[-1])


def onehot(layer: dict, x: jax.Array, ids: jax.Array) -> jax.Array:
    """Every adapter applied to every row, masked by a scaled one-hot: two dense matmuls.

    Wasteful in FLOPs (N×) but free of gathers and sorts, so the fastest form for a
    handful of adapters.
    """
    xr, lead = _rows(x)
    n, d_in, r = layer["A"].shape
    d_out = layer["B"].shape[-1]
    # one_hot(−1) is an all-zero row: base rows get no adapter.
    w = jax.nn.one_hot(ids, n, dtype=x.dtype) * layer["scale"].astype(x.dtype)[None, :]
    a_all = jnp.transpose(layer["A"].astype(x.dtype), (1, 0, 2)).reshape(d_in, n * r)
    h = (xr @ a_all).reshape(xr.shape[0], xr.shape[1], n, r) * w[:, None, :, None]
    y = h.reshape(xr.shape[0], xr.shape[1], n * r) @ layer["B"].astype(x.dtype).reshape(
        n * r, d_out
    )
    return y.reshape(*lead, d_out)


def ragged(layer: dict, x: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows sorted by adapter, then grouped matmuls (``jax.lax.ragged_dot``), then unsorted.

    Rows with −1 are grouped with adapter 0 and zeroed by their scale, so the bank needs
    no extra zero entry (which would copy it).
    """
    xr, lead = _rows(x)
    n_rows, t, d_in = xr.shape
    n = layer["A"].shape[0]
    safe, s = _row_scale(layer["scale"], ids, x.dtype)
    order = jnp.argsort(safe, stable=True)
    xs = xr[order].reshape(n_rows * t, d_in)
    sizes = (jnp.bincount(safe, length=n) * t).astype(jnp.int32)
    h = jax.lax.ragged_dot(xs, layer["A"].astype(x.dtype), sizes)
    y = jax.lax.ragged_dot(h, layer["B"].astype(x.dtype), sizes)
    y = y.reshape(n_rows, t, -1) * s[order][:, None, None]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n_rows, dtype=order.dtype))
    return y[inverse].reshape(*lead, y.shape[-1])


def shared_a(layer: dict, x: jax.Array, ids: jax.Array) -> jax.Array:
    """L-LoRA with one A0 for the whole bank: x·A0 is one dense matmul, only B is routed."""
    xr, lead = _rows(x)
    safe, s = _row_scale(layer["scale"], ids, x.dtype)
    h = xr @ layer["A0"].astype(x.dtype)  # (R, T, r): the same for every adapter
    b = layer["B"][safe].astype(x.dtype)  # (R, r, d_out)
    y = jnp.einsum("rtk,rko->rto", h, b) * s[:, None, None]
    return y.reshape(*lead, y.shape[-1])


def dense(layer: dict, x: jax.Array, ids: jax.Array) -> jax.Array:
    """Dense ΔW per row, gathered: the base layer's FLOPs again and R·d_in·d_out bytes."""
    xr, lead = _rows(x)
    safe, s = _row_scale(layer["scale"], ids, x.dtype)
    w = layer["W"][safe].astype(x.dtype)  # (R, d_in, d_out)
    y = jnp.einsum("rti,rio->rto", xr, w) * s[:, None, None]
    return y.reshape(*lead, y.shape[-1])


KERNELS = {
    "gather": gather,
    "ragged": ragged,
    "onehot": onehot,
    "shared_a": shared_a,
    "dense": dense,
}
