"""Building blocks of the CLIP towers (HF ``CLIPVisionModel`` / ``CLIPTextModel``) in Linen.

Submodule names mirror the HF attribute names, so parameter paths read like HF keys with
``layers_{i}`` for ``layers.{i}``. Every dense projection is its own ``nn.Dense`` (adapters
intercept them by path); every parameter carries logical axis names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llora_jax.backbones.attention import check_attention_impl, fused_attention

__all__ = [
    "VisionConfig",
    "TextConfig",
    "VisionTransformer",
    "TextTransformer",
    "dense",
]

_KERNEL_INIT = nn.initializers.normal(0.02)
_NEG = -1e30  # finite "minus infinity": a fully masked row stays finite (uniform), never NaN


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP vision tower (HF ``CLIPVisionConfig`` fields, ``num_layers`` etc. renamed)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    attention_dropout: float = 0.0
    attention_impl: str = "auto"  # see attention.ATTENTION_IMPLS

    def __post_init__(self) -> None:
        check_attention_impl(self.attention_impl, "CLIP VisionConfig")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Shape of a CLIP text tower (HF ``CLIPTextConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_position_embeddings: int
    # HF pooling rule: eos_token_id == 2 (pre-2023 configs) -> position of the largest id
    # (the original CLIP vocabulary puts <|endoftext|> last); otherwise the first position of eos.
    eos_token_id: int = 2
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    attention_dropout: float = 0.0
    attention_impl: str = "auto"  # see attention.ATTENTION_IMPLS

    def __post_init__(self) -> None:
        check_attention_impl(self.attention_impl, "CLIP TextConfig")


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    acts = {
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }
    if name not in acts:
        raise ValueError(f"CLIP hidden_act {name!r} is not supported; use one of {sorted(acts)}")
    return acts[name]


def dense(features: int, axes: tuple, dtype: Any, param_dtype: Any, bias: bool = True) -> nn.Dense:
    """An ``nn.Dense`` whose kernel (and bias) carry the logical axis names ``axes``."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
    )


def _layer_norm(eps: float, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


class Attention(nn.Module):
    hidden_size: int
    num_heads: int
    dropout: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"  # see attention.ATTENTION_IMPLS

    def setup(self) -> None:
        check_attention_impl(self.attention_impl, "CLIP Attention")
        # Separate q/k/v Dense layers: adapters intercept nn.Dense by path.
        mk = lambda axes: dense(self.hidden_size, axes, self.dtype, self.param_dtype)  # noqa: E731
        self.q_proj = mk(("embed", "qkv"))
        self.k_proj = mk(("embed", "qkv"))
        self.v_proj = mk(("embed", "qkv"))
        self.out_proj = mk(("qkv", "embed"))
        self.attn_dropout = nn.Dropout(self.dropout)

    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        b, t, _ = x.shape
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads}")
        hd = self.hidden_size // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, hd)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        dropout_active = not deterministic and self.dropout > 0.0
        if self.attention_impl != "reference" and not dropout_active:
            # mask: None (vision) or bool (1|B, 1, T, T), causal & padding (text).
            out = fused_attention(q, k, v, mask=mask, scale=hd**-0.5, impl=self.attention_impl)
            return self.out_proj(out.reshape(b, t, self.hidden_size))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * hd**-0.5
        if mask is not None:
            scores = jnp.where(mask, scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # softmax in float32, like HF
        probs = self.attn_dropout(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.hidden_size)
        return self.out_proj(out)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.fc1 = dense(self.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype)
        self.fc2 = dense(self.hidden_size, ("mlp", "embed"), self.dtype, self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_activation(self.hidden_act)(self.fc1(x)))


class Encoder(nn.Module):
    """Pre-LN transformer layers ``layers_{i}`` (HF ``encoder.layers.{i}``)."""

    cfg: VisionConfig | TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        self.layers = [
            EncoderLayer(c, dtype=dt, param_dtype=pdt) for _ in range(self.cfg.num_layers)
        ]

    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask, deterministic)
        return x


class EncoderLayer(nn.Module):
    cfg: VisionConfig | TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        self.layer_norm1 = _layer_norm(c.layer_norm_eps, dt, pdt)
        self.self_attn = Attention(
            c.hidden_size, c.num_heads, c.attention_dropout, dt, pdt, c.attention_impl
        )
        self.layer_norm2 = _layer_norm(c.layer_norm_eps, dt, pdt)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dt, pdt)

    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, deterministic)
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.cfg
        # A convolution, not a Dense: the patch embedding is never an adapter target.
        self.patch_embedding = nn.Conv(
            c.hidden_size,
            kernel_size=(c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, (None, None, None, "embed")),
        )
        self.class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(_KERNEL_INIT, ("embed",)),
            (c.hidden_size,),
            self.param_dtype,
        )
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        self.position_embedding = nn.Embed(
            num_positions,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_KERNEL_INIT, ("pos", "embed")),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.cfg
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            hint = ""
            if pixel_values.ndim == 4 and pixel_values.shape[1] == c.num_channels:
                hint = " (NCHW input? transpose with x.transpose(0, 2, 3, 1))"
            raise ValueError(
                f"CLIP pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}), "
                f"got shape {tuple(pixel_values.shape)}{hint}"
            )
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major grid, like HF flatten(2)
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class VisionTransformer(nn.Module):
    """HF ``CLIPVisionModel``: returns (last_hidden_state, pooled = post_layernorm(CLS))."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        self.embeddings = VisionEmbeddings(c, dt, pdt)
        self.pre_layrnorm = _layer_norm(c.layer_norm_eps, dt, pdt)  # sic: HF spelling
        self.encoder = Encoder(c, dt, pdt)
        self.post_layernorm = _layer_norm(c.layer_norm_eps, dt, pdt)

    def __call__(self, pixel_values: jax.Array, deterministic: bool = True):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = self.encoder(x, None, deterministic)
        return x, self.post_layernorm(x[:, 0])


class TextTransformer(nn.Module):
    """HF ``CLIPTextModel``: causal encoder, final norm, pooled at the EOS token."""

    cfg: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        self.embeddings = TextEmbeddings(c, dt, pdt)
        self.encoder = Encoder(c, dt, pdt)
        self.final_layer_norm = _layer_norm(c.layer_norm_eps, dt, pdt)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, deterministic: bool = True
    ):
        b, t = input_ids.shape
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        x = self.encoder(self.embeddings(input_ids), mask, deterministic)
        x = self.final_layer_norm(x)
        if self.cfg.eos_token_id == 2:
            pos = jnp.argmax(input_ids, axis=-1)
        else:  # first eos; 0 when a row has none (as HF's argmax of all-zeros)
            pos = jnp.argmax(input_ids == self.cfg.eos_token_id, axis=-1)
        return x, x[jnp.arange(b), pos]


class TextEmbeddings(nn.Module):
    cfg: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.cfg
        embed = lambda n, axes: nn.Embed(  # noqa: E731
            n,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_KERNEL_INIT, axes),
        )
        self.token_embedding = embed(c.vocab_size, ("vocab", "embed"))
        self.position_embedding = embed(c.max_position_embeddings, ("pos", "embed"))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t = input_ids.shape[-1]
        if input_ids.ndim != 2 or t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP input_ids must be (batch, seq) with seq <= max_position_embeddings="
                f"{self.cfg.max_position_embeddings}; got shape {tuple(input_ids.shape)} "
                "(tokenize with truncation=True, max_length=...)"
            )
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]
