"""The attention core shared by every backbone: jax.nn.dot_product_attention or the reference."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

__all__ = [
    "ATTENTION_IMPLS",
    "FORWARD_MODE_METHODS",
    "attention_for_method",
    "check_attention_impl",
    "choose_attention",
    "cudnn_operands",
    "current_platform",
    "forward_mode_ad",
    "fused_attention",
    "in_forward_mode_ad",
    "with_attention_impl",
]

# How the attention core is computed (field ``attention_impl`` of every backbone config):
# "auto": cuDNN's fused flash kernel where it is valid (``choose_attention``: an NVIDIA GPU,
#   bf16/fp16 compute, a head width cuDNN takes, no forward-mode AD), else XLA's path. jax's
#   own default (implementation=None) is XLA's unfused path in jax 0.10-0.11, hence our choice;
# "xla": implementation="xla" (scores materialised, softmax in fp32);
# "cudnn": implementation="cudnn", asked for explicitly (GPU, fp16/bf16 only; a custom_vjp,
#   so no forward-mode AD: l_lora_model's jvp needs "xla"/"auto"/"reference");
# "reference": the explicit einsum + softmax code, kept for parity tests.
# Whatever the choice, attention-probability dropout that is active (deterministic=False and
# rate > 0) runs the reference code: jax.nn.dot_product_attention has no dropout.
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "reference")
# Methods whose forward pass runs jax.jvp through the whole backbone (forward.py, the linear
# grid shortcut): cuDNN's kernel is a custom_vjp and has no forward-mode rule.
FORWARD_MODE_METHODS: frozenset[str] = frozenset({"l_lora_model"})
# Set while a function is traced under jax.jvp / jax.linearize by our own linearization
# (adapters/linearize.py), so that "auto" picks XLA's attention there whatever the method the
# backbone was built for. A ContextVar: each thread (the study fine-tunes in one) has its own.
_FORWARD_MODE = contextvars.ContextVar("llora_attention_forward_mode_ad", default=False)
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper; 128 holds on every cuDNN-capable card
_CUDNN_NEG = -float(2 << 40)  # jax's own masked logit for bf16 in its cuDNN path (no overflow)


def check_attention_impl(impl: str, where: str) -> None:
    """Raise a clear error for an unknown ``attention_impl`` (``where`` names the config)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{where}: attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")


def _refuse_cudnn_under_jvp(requested: str, forward_mode_ad: bool, why: str) -> None:
    if requested == "cudnn" and forward_mode_ad:
        raise ValueError(
            f"attention_impl='cudnn' cannot run {why}: the cuDNN kernel has no forward-mode "
            "derivative (jax.jvp); use attention_impl 'auto' or 'xla'"
        )


def choose_attention(
    requested: str,
    *,
    platform: str,
    dtype: Any,
    forward_mode_ad: bool,
    head_dim: int | None = None,
) -> str:
    """The implementation that runs: ``requested`` unless it is "auto", which becomes
    "cudnn" on an NVIDIA GPU (``platform`` "cuda", see ``current_platform``) for bf16/fp16
    compute without forward-mode AD (and a head width cuDNN takes), else "xla"."""
    check_attention_impl(requested, "attention_impl")
    _refuse_cudnn_under_jvp(requested, forward_mode_ad, "under forward-mode AD")
    if requested != "auto":
        return requested
    fits = head_dim is None or (head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM)
    fused = platform == "cuda" and jnp.dtype(dtype) in _CUDNN_DTYPES and not forward_mode_ad
    return "cudnn" if fused and fits else "xla"


def attention_for_method(requested: str, method: str) -> str:
    """The ``attention_impl`` to build a backbone with for training / evaluating ``method``:
    "auto" becomes "xla" where the method differentiates forward through the backbone
    (``FORWARD_MODE_METHODS``); "cudnn" there is refused. Otherwise unchanged ("auto" is
    settled per call by ``choose_attention`` from the platform and the compute dtype)."""
    check_attention_impl(requested, "config.attention_impl")
    forward = method in FORWARD_MODE_METHODS
    _refuse_cudnn_under_jvp(requested, forward, f"method {method!r}")
    return "xla" if forward and requested == "auto" else requested


@contextlib.contextmanager
def forward_mode_ad() -> Iterator[None]:
    """Within: attention is being traced for forward-mode AD ("auto" settles on "xla")."""
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def in_forward_mode_ad() -> bool:
    """Whether the code being traced now runs under ``forward_mode_ad``."""
    return _FORWARD_MODE.get()


def current_platform() -> str:
    """ "cuda" for an NVIDIA GPU backend, "rocm" for AMD, else jax's backend name ("cpu", "tpu")."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = jax.extend.backend.get_backend().platform_version.lower()
    return "cuda" if "cuda" in version else "rocm"


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
    probabilities to the value dtype: the reference code's numerics. The implementation is
    settled here, at trace time (``choose_attention``), forward-mode AD known from
    ``forward_mode_ad``.
    """
    impl = choose_attention(
        impl,
        platform=current_platform(),
        dtype=q.dtype,
        forward_mode_ad=in_forward_mode_ad(),
        head_dim=q.shape[-1],
    )
    if impl == "cudnn":
        q2, k2, v2, bias2, mask2 = cudnn_operands(q, k, v, bias, mask)
        out = jax.nn.dot_product_attention(
            q2, k2, v2, bias=bias2, mask=mask2, scale=scale, implementation="cudnn"
        )
        return out[:, : q.shape[1]]  # the padded query row, if any, is dropped
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl
    )


def cudnn_operands(q, k, v, bias, mask) -> tuple:
    """(q, k, v, bias, mask) as jax's cuDNN path takes them, also under ``jax.vmap``.

    * No bias and no mask (ViT): unchanged, any length (jax refuses odd lengths only for a
      bias in training), so no mask is made up.
    * With a bias or mask, odd lengths (training needs even ones) get one padded query row
      and key column, the padded key masked out; the caller drops the padded query's row.
    * A bias or mask spans the whole (B, N, T, S): under ``vmap`` jax's cuDNN batching rule
      reshapes a vmapped bias to (vmap * B, N, T, S), which fails for the (B, 1, T, S) of a
      padding mask (the failure seen in the vmapped merge grids: (32, 32, 1, 64, 64) ->
      (1024, 12, 64, 64)); jax >= 0.11 broadcasts operands without the vmap axis itself.
    * A bias goes in the input dtype, huge negatives clamped to jax's bf16-safe value; a mask
      stays boolean, so jax computes no bias gradient for it (jax >= 0.11).
    """
    if bias is None and mask is None:
        return q, k, v, None, None
    b, t0, n, _ = q.shape
    s0 = k.shape[1]
    t, s = t0 + t0 % 2, s0 + s0 % 2
    if (t, s) != (t0, s0):
        rows = lambda a, m: jnp.pad(a, ((0, 0), (0, m - a.shape[1]), (0, 0), (0, 0)))  # noqa: E731
        q, k, v = rows(q, t), rows(k, s), rows(v, s)
        grow = ((0, 0), (0, 0), (0, t - t0), (0, s - s0))
        keys = jnp.arange(s)[None, None, None, :] < s0
        if mask is not None:
            keys = (
                jnp.pad(
                    jnp.broadcast_to(mask, (*mask.shape[:2], t0, s0)), grow, constant_values=True
                )
                & keys
            )
        mask = keys
        if bias is not None:
            bias = jnp.pad(jnp.broadcast_to(bias, (*bias.shape[:2], t0, s0)), grow)
    full = (b, n, t, s)
    mask = None if mask is None else jnp.broadcast_to(mask, full)
    if bias is not None:
        bias = jnp.broadcast_to(jnp.maximum(bias, _CUDNN_NEG).astype(q.dtype), full)
    return q, k, v, bias, mask


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
