"""BERT / MiniLM encoder as Linen modules with Hugging Face ``BertModel`` parameter names.

Parameter paths mirror HF: ``embeddings/{word,position,token_type}_embeddings/embedding``,
``embeddings/LayerNorm``, ``encoder/layer_{i}/attention/self/{query,key,value}``,
``encoder/layer_{i}/attention/output/{dense,LayerNorm}``, ``encoder/layer_{i}/intermediate/dense``,
``encoder/layer_{i}/output/{dense,LayerNorm}`` and, only with ``add_pooling_layer``,
``pooler/dense``. Sentence embeddings (all-MiniLM-L6-v2's mean pooling + L2 normalisation)
are in ``pooling``; the activations in ``activations``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llora_jax.backbones.activations import ACTIVATIONS
from llora_jax.backbones.attention import check_attention_impl, fused_attention

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "BertSettings",
    "BertModel",
    "init_params",
]

DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"encoder/layer_\d+/attention/self/query/kernel$",
    r"encoder/layer_\d+/attention/self/value/kernel$",
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertSettings:
    """The architecture hyper-parameters read from an HF ``BertConfig`` (hashable)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # How the attention core runs: "auto" | "xla" | "cudnn" | "reference" (not an HF field;
    # see attention.ATTENTION_IMPLS).
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        check_attention_impl(self.attention_impl, "BertSettings")


# ----------------------------------------------------------------------------- modules


def _dense(features: int, axes: tuple, m: nn.Module, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(m.cfg.initializer_range), axes
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def _layer_norm(m: nn.Module, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=m.cfg.layer_norm_eps,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class BertEmbeddings(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        c = self.cfg

        def embed(num: int, axes: tuple, name: str) -> nn.Embed:
            init = nn.initializers.normal(c.initializer_range)
            return nn.Embed(
                num,
                c.hidden_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                embedding_init=nn.with_logical_partitioning(init, axes),
                name=name,
            )

        # Same summation order as HF (word + token type + position).
        x = embed(c.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + embed(c.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        x = x + embed(c.max_position_embeddings, ("pos", "embed"), "position_embeddings")(
            position_ids
        )
        x = _layer_norm(self)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        """``mask``: bool (B, 1, 1, L), True on the keys that may be attended to."""
        c = self.cfg
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads

        def proj(name: str) -> jax.Array:
            # Separate q/k/v Dense modules: LoRA adapters intercept nn.Dense by path.
            y = _dense(c.hidden_size, ("embed", "qkv"), self, name)(x)
            return y.reshape(*y.shape[:-1], heads, head_dim)

        q, k, v = proj("query"), proj("key"), proj("value")
        check_attention_impl(self.attention_impl, "BertSelfAttention")
        # jax.nn.dot_product_attention has no dropout: HF BERT drops attention probabilities
        # (attention_probs_dropout_prob, 0.1 by default), so training runs the reference code.
        dropout_active = not deterministic and c.attention_probs_dropout_prob > 0.0
        if self.attention_impl != "reference" and not dropout_active:
            scale = 1.0 / math.sqrt(head_dim)
            ctx = fused_attention(q, k, v, mask=mask, scale=scale, impl=self.attention_impl)
            return ctx.reshape(*ctx.shape[:-2], c.hidden_size)
        # Additive bias over keys; the value HF uses (float32 minimum).
        mask_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        # Softmax in float32 even under bfloat16 compute: masked logits are huge negatives.
        probs = jax.nn.softmax(scores + mask_bias, axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return ctx.reshape(*ctx.shape[:-2], c.hidden_size)


class BertOutput(nn.Module):
    """HF ``Bert{Self,}Output``: dense, dropout, residual add, LayerNorm."""

    cfg: BertSettings
    in_axis: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True):
        y = _dense(self.cfg.hidden_size, (self.in_axis, "embed"), self, "dense")(x)
        y = nn.Dropout(self.cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return _layer_norm(self)(y + residual)


class BertIntermediate(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = _dense(self.cfg.intermediate_size, ("embed", "mlp"), self, "dense")(x)
        return ACTIVATIONS[self.cfg.hidden_act](y)


class BertAttention(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        impl = self.cfg.attention_impl
        ctx = BertSelfAttention(self.cfg, **kw, attention_impl=impl, name="self")(
            x, mask, deterministic
        )
        return BertOutput(self.cfg, "qkv", **kw, name="output")(ctx, x, deterministic)


class BertLayer(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = BertAttention(self.cfg, **kw, name="attention")(x, mask, deterministic)
        inter = BertIntermediate(self.cfg, **kw, name="intermediate")(h)
        return BertOutput(self.cfg, "mlp", **kw, name="output")(inter, h, deterministic)


class BertEncoder(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        for i in range(self.cfg.num_hidden_layers):
            x = BertLayer(
                self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer_{i}"
            )(x, mask, deterministic)
        return x


class BertModel(nn.Module):
    """HF ``BertModel``. Returns the last hidden states (B, L, H), or ``(hidden, pooled)``
    when ``add_pooling_layer`` is set (pooled = tanh(dense(hidden[:, 0])))."""

    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    add_pooling_layer: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
        segment_ids: jax.Array | None = None,
    ):
        """``segment_ids`` (B, L), for packed inputs (``llora_jax.evaluation.packing``): tokens attend
        only within their segment (0 = padding); pass each segment's own ``position_ids``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = BertEmbeddings(self.cfg, **kw, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic
        )
        # (B, 1, 1, L) boolean mask over keys (the attention turns it into HF's additive bias
        # on its reference path); packed rows: (B, 1, L, L), block-diagonal by segment.
        if segment_ids is None:
            keep = attention_mask[:, None, None, :].astype(bool)
        else:
            q, k = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
            keep = (q == k) & (k > 0)
        x = BertEncoder(self.cfg, **kw, name="encoder")(x, keep, deterministic)
        if not self.add_pooling_layer:
            return x
        pooled = _BertPooler(self.cfg, **kw, name="pooler")(x)
        return x, pooled


class _BertPooler(nn.Module):
    cfg: BertSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(_dense(self.cfg.hidden_size, ("embed", None), self, "dense")(x[:, 0]))


def init_params(module: BertModel, rng: jax.Array, *, batch: int = 1, seq_len: int = 8) -> dict:
    """Randomly initialised params (plain arrays, no logical-axis boxes)."""
    ids = jnp.zeros((batch, seq_len), jnp.int32)
    return nn.unbox(module.init(rng, ids)["params"])


# ----------------------------------------------------------------------------- sentence embeddings
