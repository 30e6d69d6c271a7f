"""Linen layers of T5 (see :mod:`llora_jax.backbones.t5` for the model and the HF loader).

Module and parameter names follow ``transformers``' ``T5ForConditionalGeneration`` so that
parameter paths read like HF keys (``block_0/layer_0/SelfAttention/q/kernel``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.backbones.attention import check_attention_impl, fused_attention

Dtype = Any

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Spec:
    """Architecture hyper-parameters (the fields of an HF ``T5Config`` that shape the model)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    # True (T5 v1.0): lm_head = shared^T and the decoder output is scaled by d_model**-0.5.
    # False (T5 v1.1, Flan-T5): a separate lm_head and no scaling.
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # How the attention core runs: "auto" | "xla" | "cudnn" | "reference" (not an HF field;
    # see attention.ATTENTION_IMPLS).
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        check_attention_impl(self.attention_impl, "T5Spec")
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(
                f"T5 feed-forward activation {self.dense_act_fn!r} is not supported; "
                f"supported: {sorted(_ACTIVATIONS)}"
            )


def axes_init(init: Any, names: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(init, names)


def _dense(
    parent: nn.Module, features: int, std: float, axes: tuple[str, str], name: str
) -> nn.Dense:
    """A bias-free projection (created inside ``parent``'s compact method)."""
    return nn.Dense(
        features,
        use_bias=False,
        dtype=parent.dtype,
        param_dtype=parent.param_dtype,
        kernel_init=axes_init(nn.initializers.normal(std), axes),
        name=name,
    )


@functools.lru_cache(maxsize=32)
def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every relative position in [-max_distance, max_distance] (index rel + max_distance).

    Computed once in float32 numpy with the HF formula; positions beyond max_distance share the
    last bucket, so clipping to this range is exact and the table avoids backend-dependent logs.
    """
    rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(n.astype(np.float32) / np.float32(max_exact))
    scaled = (
        ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    )
    large = max_exact + np.where(n < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(n < max_exact, n, large)).astype(np.int32)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of ``memory_position - query_position`` (int32, same shape)."""
    table = jnp.asarray(_bucket_table(bool(bidirectional), int(num_buckets), int(max_distance)))
    idx = jnp.clip(relative_position, -max_distance, max_distance) + max_distance
    return table[idx]


class T5LayerNorm(nn.Module):
    """RMS norm with a weight only (no mean, no bias), accumulated in float32 like HF."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "weight", axes_init(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w.astype(jnp.float32) * x32).astype(self.dtype)


class T5Attention(nn.Module):
    """Multi-head attention without score scaling (T5 folds it into the init)."""

    spec: T5Spec
    causal: bool = False
    cross: bool = False
    has_relative_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention.ATTENTION_IMPLS

    def _relative_bias(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        s = self.spec
        embed = nn.Embed(
            s.relative_attention_num_buckets,
            s.num_heads,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            embedding_init=axes_init(nn.initializers.normal(s.d_model**-0.5), ("relpos", "heads")),
            name="relative_attention_bias",
        )
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None],
            bidirectional=not self.causal,
            num_buckets=s.relative_attention_num_buckets,
            max_distance=s.relative_attention_max_distance,
        )
        return jnp.transpose(embed(buckets), (2, 0, 1))[None]  # (1, H, Lq, Lk)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        mask_bias: jax.Array | None = None,
        position_bias: jax.Array | None = None,
        deterministic: bool = True,
        cache: dict | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, dict | None]:
        """Returns (output, position bias for the next layers, updated cache or None)."""
        s = self.spec
        if cache is not None and not (self.causal or self.cross):
            raise ValueError("a decode cache is only meaningful in the decoder")
        inner = s.num_heads * s.d_kv
        b, lq = x.shape[:2]
        q = _dense(self, inner, (s.d_model * s.d_kv) ** -0.5, ("embed", "qkv"), "q")(x)
        new_cache = None
        if self.cross and cache:
            k, v = cache["k"], cache["v"]  # computed once, at the first decoding step
        else:
            src = kv if self.cross else x
            if src is None:
                raise ValueError("cross-attention needs encoder_hidden (or a filled decode cache)")
            k = _dense(self, inner, s.d_model**-0.5, ("embed", "qkv"), "k")(src)
            v = _dense(self, inner, s.d_model**-0.5, ("embed", "qkv"), "v")(src)
        if cache is not None:
            if self.cross:
                new_cache = {"k": k, "v": v}
            else:
                zero = jnp.zeros((), jnp.int32)
                at = (zero, jnp.asarray(cache_index, jnp.int32), zero)
                k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
                v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
                new_cache = {"k": k, "v": v}
        lk = k.shape[1]
        offset = cache_index if (cache is not None and not self.cross) else 0
        q_pos = jnp.arange(lq) + offset
        k_pos = jnp.arange(lk)
        no_bias = position_bias is None and not self.has_relative_bias
        if position_bias is None:
            if self.has_relative_bias:
                position_bias = self._relative_bias(q_pos, k_pos)
            else:
                position_bias = jnp.zeros((1, s.num_heads, lq, lk), jnp.float32)
        check_attention_impl(self.attention_impl, "T5Attention")
        qh = q.reshape(b, lq, s.num_heads, s.d_kv)
        kh = k.reshape(b, lk, s.num_heads, s.d_kv).astype(q.dtype)
        vh = v.reshape(b, lk, s.num_heads, s.d_kv).astype(self.dtype)
        # Keys not yet written to the decode cache (and future ones) are masked by position.
        allowed = None
        if cache is not None and self.causal:
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        # jax.nn.dot_product_attention has no dropout: HF T5 drops attention weights
        # (dropout_rate, 0.1 in the T5 / Flan-T5 configs), so training runs the reference code.
        dropout_active = not deterministic and s.dropout_rate > 0.0
        if self.attention_impl != "reference" and not dropout_active:
            # No score scaling (scale=1); the relative-position bias (1, H, Lq, Lk) and the
            # additive padding / causal bias go in as one float32 bias, as the reference adds
            # them; the all-zero bias of attentions without relative bias is left out.
            bias = None if no_bias else position_bias
            if mask_bias is not None:
                bias = mask_bias if bias is None else bias + mask_bias
            ctx = fused_attention(
                qh, kh, vh, bias=bias, mask=allowed, scale=1.0, impl=self.attention_impl
            )
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", qh, kh).astype(jnp.float32)
            scores = scores + position_bias
            if mask_bias is not None:
                scores = scores + mask_bias
            if allowed is not None:
                scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            weights = nn.Dropout(s.dropout_rate)(weights, deterministic=deterministic)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", weights, vh)
        out = _dense(self, s.d_model, inner**-0.5, ("qkv", "embed"), "o")(ctx.reshape(b, lq, inner))
        return out, position_bias, new_cache


class T5DenseReluDense(nn.Module):
    spec: T5Spec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.spec
        act = _ACTIVATIONS[s.dense_act_fn]
        std_in = s.d_model**-0.5
        if s.is_gated_act:
            h = act(_dense(self, s.d_ff, std_in, ("embed", "mlp"), "wi_0")(x))
            h = h * _dense(self, s.d_ff, std_in, ("embed", "mlp"), "wi_1")(x)
        else:
            h = act(_dense(self, s.d_ff, std_in, ("embed", "mlp"), "wi")(x))
        h = nn.Dropout(s.dropout_rate)(h, deterministic=deterministic)
        return _dense(self, s.d_model, s.d_ff**-0.5, ("mlp", "embed"), "wo")(h)


class T5LayerSelfAttention(nn.Module):
    spec: T5Spec
    causal: bool = False
    has_relative_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, position_bias, deterministic, cache, cache_index):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = T5LayerNorm(self.spec.layer_norm_epsilon, name="layer_norm", **kw)(x)
        h, position_bias, cache = T5Attention(
            self.spec,
            self.causal,
            False,
            self.has_relative_bias,
            attention_impl=self.spec.attention_impl,
            name="SelfAttention",
            **kw,
        )(h, None, mask_bias, position_bias, deterministic, cache, cache_index)
        x = x + nn.Dropout(self.spec.dropout_rate)(h, deterministic=deterministic)
        return x, position_bias, cache


class T5LayerCrossAttention(nn.Module):
    spec: T5Spec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, enc, enc_bias, deterministic, cache):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = T5LayerNorm(self.spec.layer_norm_epsilon, name="layer_norm", **kw)(x)
        impl = self.spec.attention_impl
        h, _, cache = T5Attention(
            self.spec, cross=True, attention_impl=impl, name="EncDecAttention", **kw
        )(h, enc, enc_bias, None, deterministic, cache)
        x = x + nn.Dropout(self.spec.dropout_rate)(h, deterministic=deterministic)
        return x, cache


class T5LayerFF(nn.Module):
    spec: T5Spec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = T5LayerNorm(self.spec.layer_norm_epsilon, name="layer_norm", **kw)(x)
        h = T5DenseReluDense(self.spec, name="DenseReluDense", **kw)(h, deterministic)
        return x + nn.Dropout(self.spec.dropout_rate)(h, deterministic=deterministic)


class T5Block(nn.Module):
    """HF's ``layer`` list: layer_0 self-attention, [layer_1 cross-attention], then feed-forward."""

    spec: T5Spec
    is_decoder: bool = False
    has_relative_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, position_bias, enc, enc_bias, deterministic, cache, index):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        use_cache = cache is not None
        x, position_bias, self_cache = T5LayerSelfAttention(
            self.spec, self.is_decoder, self.has_relative_bias, name="layer_0", **kw
        )(x, mask_bias, position_bias, deterministic, cache["self"] if use_cache else None, index)
        cross_cache = None
        if self.is_decoder:
            # An empty cross cache means "compute the encoder keys/values now and return them".
            cross_in = (cache.get("cross") or {}) if use_cache else None
            x, cross_cache = T5LayerCrossAttention(self.spec, name="layer_1", **kw)(
                x, enc, enc_bias, deterministic, cross_in
            )
        ff_name = "layer_2" if self.is_decoder else "layer_1"
        x = T5LayerFF(self.spec, name=ff_name, **kw)(x, deterministic)
        new_cache = {"self": self_cache, "cross": cross_cache} if use_cache else None
        return x, position_bias, new_cache


class T5Stack(nn.Module):
    spec: T5Spec
    is_decoder: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, enc=None, enc_bias=None, deterministic=True, cache=None):
        s = self.spec
        n_layers = s.num_decoder_layers if self.is_decoder else s.num_layers
        index = None if cache is None else cache["index"]
        new_cache = None if cache is None else {"index": index + x.shape[1]}
        x = nn.Dropout(s.dropout_rate)(x, deterministic=deterministic)
        position_bias = None  # computed by block 0, shared by the others (as in HF)
        for i in range(n_layers):
            name = f"block_{i}"
            x, position_bias, c = T5Block(
                s, self.is_decoder, i == 0, self.dtype, self.param_dtype, name=name
            )(
                x,
                mask_bias,
                position_bias,
                enc,
                enc_bias,
                deterministic,
                None if cache is None else cache[name],
                index,
            )
            if cache is not None:
                new_cache[name] = c
        x = T5LayerNorm(
            s.layer_norm_epsilon, self.dtype, self.param_dtype, name="final_layer_norm"
        )(x)
        x = nn.Dropout(s.dropout_rate)(x, deterministic=deterministic)
        return x, new_cache


def padding_bias(mask: jax.Array) -> jax.Array:
    """(batch, keys) 0/1 mask -> additive (batch, 1, 1, keys) float32 bias."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
