"""Activation functions of the backbones, by their Hugging Face names."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-z^2) for z >= 0,
# t = 1 / (1 + p z), with |error| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, HF's "gelu", x · Φ(x), computed in float32 and returned in x's
    dtype. erf is Abramowitz & Stegun 7.1.26: in float32 this is within 7e-7 of GELU in
    float64, as close as ``jax.nn.gelu(approximate=False)`` in float32 (6e-7); on bf16 inputs
    that one rounds every step in bf16. On an H200, XLA's erf made the activation 31% of a
    merge-grid pass; with this form the pass is 1.18× faster (benchmarks/NOTES.md, session 7)."""
    x32 = x.astype(jnp.float32)
    z = jnp.abs(x32) * (1 / math.sqrt(2.0))
    t = 1 / (1 + _AS_P * z)
    a1, a2, a3, a4, a5 = _AS_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    erf = jnp.sign(x32) * (1 - poly * jnp.exp(-z * z))
    return (0.5 * x32 * (1 + erf)).astype(x.dtype)


ACTIVATIONS = {
    "gelu": gelu_erf,  # HF "gelu" is the exact erf form
    # The same function through XLA's erf (slower on GPUs; kept for comparisons).
    "gelu_xla_erf": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
