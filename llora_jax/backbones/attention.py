"""The attention core shared by every backbone: jax.nn.dot_product_attention or the reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ATTENTION_IMPLS", "check_attention_impl", "fused_attention", "with_attention_impl"]

# How the attention core is computed (field ``attention_impl`` of every backbone config):
# "auto": jax.nn.dot_product_attention(implementation=None); in jax 0.10 None means the XLA
#   path (its own comment: automatic backend selection is a TODO), so it gives no cuDNN kernel;
# "xla": the same function, implementation="xla" (scores still materialised, softmax in fp32);
# "cudnn": implementation="cudnn", the fused flash kernel (GPU, fp16/bf16 only; a custom_vjp,
#   so no forward-mode AD: l_lora_model's jvp/linearize needs "xla"/"auto"/"reference");
# "reference": the explicit einsum + softmax code, kept for parity tests.
# Whatever the choice, attention-probability dropout that is active (deterministic=False and
# rate > 0) runs the reference code: jax.nn.dot_product_attention has no dropout.
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "reference")
_CUDNN_NEG = -float(2 << 40)  # jax's own masked logit for bf16 in its cuDNN path (no overflow)


def check_attention_impl(impl: str, where: str) -> None:
    """Raise a clear error for an unknown ``attention_impl`` (``where`` names the config)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{where}: attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float,
    impl: str,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` on (B, T, N, H) inputs for impl auto / xla / cudnn.

    ``bias`` (additive, float32) and ``mask`` (bool, True = attend) are 4-D and broadcast to
    (B, N, T, S). The XLA path computes logits in float32 (preferred_element_type), adds the
    bias, masks with -0.7 * float32 max and takes the softmax in float32 before casting the
    probabilities to the value dtype: the reference code's numerics.
    """
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, bias, mask, scale)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        scale=scale,
        implementation=None if impl == "auto" else impl,
    )


def _spanning(a: jax.Array, t: int, s: int) -> jax.Array:
    """A (B|1, N|1, T|1, S|1) bias or mask broadcast over the full (T, S)."""
    return jnp.broadcast_to(a, (*a.shape[:2], t, s))


def _cudnn_attention(q, k, v, bias, mask, scale: float) -> jax.Array:
    """The cuDNN flash kernel. jax's cuDNN path turns a mask into a bias and checks that a
    bias spans the full (T, S) (broadcasting over batch and heads only); the bias goes in the
    input dtype, huge negatives clamped to jax's bf16-safe value. With a bias, training needs
    even lengths (ViT-B/16 has 197 tokens): an odd length gets one padded query row and key
    column, the padded key masked out and the padded query's output dropped."""
    t0, s0 = q.shape[1], k.shape[1]
    t, s = t0 + t0 % 2, s0 + s0 % 2
    if (t, s) != (t0, s0):
        rows = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)))  # noqa: E731
        q, k, v = rows(q, t), rows(k, s), rows(v, s)
        grow = ((0, 0), (0, 0), (0, t - t0), (0, s - s0))
        keys = jnp.arange(s)[None, None, None, :] < s0
        if mask is not None:
            keys = jnp.pad(_spanning(mask, t0, s0), grow, constant_values=True) & keys
        mask = keys
        bias = None if bias is None else jnp.pad(_spanning(bias, t0, s0), grow)
    mask = None if mask is None else _spanning(mask, t, s)
    bias = None if bias is None else _spanning(jnp.maximum(bias, _CUDNN_NEG), t, s).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn"
    )
    return out[:, :t0]


def with_attention_impl(module: Any, impl: str) -> Any:
    """A backbone module (BERT, CLIP or T5) with every attention computed by ``impl``."""
    check_attention_impl(impl, "attention_impl")
    changes = {
        field: dataclasses.replace(sub, attention_impl=impl)
        for field in ("cfg", "spec", "vision", "text")
        if hasattr(sub := getattr(module, field, None), "attention_impl")
    }
    if not changes:
        raise ValueError(f"{type(module).__name__} has no attention settings to set")
    return module.clone(**changes)
