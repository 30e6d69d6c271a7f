"""T5 / Flan-T5 encoder-decoder as Linen modules with Hugging Face parameter names.

Parameter paths mirror ``T5ForConditionalGeneration``: ``shared/embedding``,
``encoder/block_0/layer_0/SelfAttention/{q,k,v,o}/kernel``,
``encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding`` (block 0 of
each stack only), ``encoder/block_0/layer_1/DenseReluDense/{wi,wo | wi_0,wi_1,wo}/kernel``,
``.../layer_norm/weight``, ``decoder/block_0/layer_1/EncDecAttention/...``,
``decoder/block_0/layer_2/DenseReluDense/...``, ``{encoder,decoder}/final_layer_norm/weight``
and ``lm_head/kernel`` (untied models only). Every projection is an ``nn.Dense`` without bias,
so adapters attach by intercepting ``nn.Dense.__call__``.

The layers live in :mod:`llora_jax.backbones.t5_layers`; the helpers shift_right, loss,
greedy_decode (key/value cache, jitted) and score_label_words (rank classification) in
:mod:`llora_jax.backbones.t5_decode`. Both are re-exported here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.backbones.t5_decode import (
    greedy_decode,
    init_decode_cache,
    loss,
    score_label_words,
    shift_right,
    token_log_probs,
)
from llora_jax.backbones.t5_layers import (
    Dtype,
    T5Spec,
    T5Stack,
    axes_init,
    padding_bias,
    relative_position_bucket,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "T5Spec",
    "T5",
    "spec_from_hf_config",
    "module_from_hf_config",
    "params_from_hf",
    "init_params",
    "relative_position_bucket",
    "shift_right",
    "loss",
    "token_log_probs",
    "greedy_decode",
    "init_decode_cache",
    "score_label_words",
]

# q and v of every attention (self and cross), as HF PEFT targets ["q", "v"] on T5.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (r"(SelfAttention|EncDecAttention)/(q|v)/kernel$",)


class T5(nn.Module):
    """``T5ForConditionalGeneration``: ``encode``, ``decode`` and ``__call__`` give logits."""

    spec: T5Spec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        s, kw = self.spec, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.shared = nn.Embed(
            s.vocab_size,
            s.d_model,
            embedding_init=axes_init(nn.initializers.normal(1.0), ("vocab", "embed")),
            **kw,
        )
        self.encoder = T5Stack(s, is_decoder=False, **kw)
        self.decoder = T5Stack(s, is_decoder=True, **kw)
        if not s.tie_word_embeddings:
            self.lm_head = nn.Dense(
                s.vocab_size,
                use_bias=False,
                kernel_init=axes_init(nn.initializers.normal(s.d_model**-0.5), ("embed", "vocab")),
                **kw,
            )

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encoder last hidden state (batch, src_len, d_model)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x = self.shared(input_ids)
        return self.encoder(x, padding_bias(attention_mask), deterministic=deterministic)[0]

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        cache: dict | None = None,
    ) -> jax.Array | tuple[jax.Array, dict]:
        """Logits (batch, tgt_len, vocab) in float32.

        Teacher forcing when ``cache`` is None (causal mask, combined with
        ``decoder_attention_mask`` when given). With a ``cache`` (see
        :func:`init_decode_cache`) the tokens are appended at ``cache["index"]`` and
        ``(logits, new_cache)`` is returned; ``encoder_hidden`` is needed on the first
        step only (cross-attention keys/values are cached) and ``decoder_attention_mask``
        is ignored.
        """
        lq = decoder_input_ids.shape[1]
        if encoder_mask is None:
            if encoder_hidden is None:
                raise ValueError("decode needs encoder_mask when encoder_hidden is not given")
            encoder_mask = jnp.ones(encoder_hidden.shape[:2], jnp.int32)
        x = self.shared(decoder_input_ids)
        mask_bias = None
        if cache is None:
            allowed = jnp.tril(jnp.ones((lq, lq), bool))[None, None]
            if decoder_attention_mask is not None:
                allowed = allowed & (decoder_attention_mask[:, None, None, :] > 0)
            mask_bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        h, new_cache = self.decoder(
            x, mask_bias, encoder_hidden, padding_bias(encoder_mask), deterministic, cache
        )
        logits = self._logits(h)
        return logits if cache is None else (logits, new_cache)

    def _logits(self, h: jax.Array) -> jax.Array:
        if self.spec.tie_word_embeddings:
            # HF rescales before the tied projection (T5 v1.0 convention).
            h = h * (self.spec.d_model**-0.5)
            return self.shared.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced logits (batch, tgt_len, vocab), float32."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        enc = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(
            decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic
        )


# ----------------------------------------------------------------------------- HF conversion


def spec_from_hf_config(config: Any, *, dropout_rate: float | None = None) -> T5Spec:
    """T5Spec from a ``transformers.T5Config`` (v4 or v5)."""
    # transformers 5 always sets tie_word_embeddings=True and keeps the checkpoint's own flag as
    # scale_decoder_outputs; real untied checkpoints (T5 v1.1, Flan) have it False.
    tied = getattr(config, "scale_decoder_outputs", None)
    if tied is None:
        tied = bool(getattr(config, "tie_word_embeddings", True))
    act = getattr(config, "dense_act_fn", None)
    gated = getattr(config, "is_gated_act", None)
    if act is None or gated is None:
        parts = config.feed_forward_proj.split("-")
        gated, act = parts[0] == "gated", parts[-1]
        act = "gelu_new" if config.feed_forward_proj == "gated-gelu" else act
    eos = config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    start = getattr(config, "decoder_start_token_id", None)
    return T5Spec(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_decoder_layers=config.num_decoder_layers or config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate if dropout_rate is None else dropout_rate,
        layer_norm_epsilon=config.layer_norm_epsilon,
        dense_act_fn=act,
        is_gated_act=bool(gated),
        tie_word_embeddings=bool(tied),
        pad_token_id=int(pad),
        eos_token_id=-1 if eos is None else int(eos),
        decoder_start_token_id=int(pad if start is None else start),
    )


def module_from_hf_config(
    config: Any,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    dropout_rate: float | None = None,
) -> T5:
    """A :class:`T5` module for an HF ``T5Config`` (``dropout_rate`` overrides the config's)."""
    return T5(spec_from_hf_config(config, dropout_rate=dropout_rate), dtype, param_dtype)


def _hf_layout(spec: T5Spec) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """(HF key, Flax path, HF shape, transpose?) of every parameter."""
    s = spec
    inner = s.num_heads * s.d_kv
    rows: list[tuple[str, str, tuple[int, ...], bool]] = []

    def linear(hf: str, fx: str, n_in: int, n_out: int) -> None:
        rows.append((f"{hf}.weight", f"{fx}/kernel", (n_out, n_in), True))

    def norm(hf: str, fx: str) -> None:
        rows.append((f"{hf}.weight", f"{fx}/weight", (s.d_model,), False))

    def attention(hf: str, fx: str, relative: bool) -> None:
        for name in "qkv":
            linear(f"{hf}.{name}", f"{fx}/{name}", s.d_model, inner)
        linear(f"{hf}.o", f"{fx}/o", inner, s.d_model)
        if relative:
            shape = (s.relative_attention_num_buckets, s.num_heads)
            rows.append(
                (
                    f"{hf}.relative_attention_bias.weight",
                    f"{fx}/relative_attention_bias/embedding",
                    shape,
                    False,
                )
            )

    def ff(hf: str, fx: str) -> None:
        names = ("wi_0", "wi_1") if s.is_gated_act else ("wi",)
        for name in names:
            linear(f"{hf}.DenseReluDense.{name}", f"{fx}/DenseReluDense/{name}", s.d_model, s.d_ff)
        linear(f"{hf}.DenseReluDense.wo", f"{fx}/DenseReluDense/wo", s.d_ff, s.d_model)
        norm(f"{hf}.layer_norm", f"{fx}/layer_norm")

    rows.append(("shared.weight", "shared/embedding", (s.vocab_size, s.d_model), False))
    for stack, n_layers in (("encoder", s.num_layers), ("decoder", s.num_decoder_layers)):
        for i in range(n_layers):
            hf, fx = f"{stack}.block.{i}.layer", f"{stack}/block_{i}"
            attention(f"{hf}.0.SelfAttention", f"{fx}/layer_0/SelfAttention", i == 0)
            norm(f"{hf}.0.layer_norm", f"{fx}/layer_0/layer_norm")
            if stack == "decoder":
                attention(f"{hf}.1.EncDecAttention", f"{fx}/layer_1/EncDecAttention", False)
                norm(f"{hf}.1.layer_norm", f"{fx}/layer_1/layer_norm")
                ff(f"{hf}.2", f"{fx}/layer_2")
            else:
                ff(f"{hf}.1", f"{fx}/layer_1")
        norm(f"{stack}.final_layer_norm", f"{stack}/final_layer_norm")
    if not s.tie_word_embeddings:
        linear("lm_head", "lm_head", s.d_model, s.vocab_size)
    return rows


def params_from_hf(state: dict[str, np.ndarray], config: Any) -> dict:
    """Convert an HF T5 state dict ({name: array}) to this module's parameter tree.

    Linear weights (out, in) become kernels (in, out). Raises ``ValueError`` naming the key
    when a weight is missing or its shape does not fit the config. An untied model without
    ``lm_head.weight`` uses ``shared.weight`` as its head, as transformers does.
    """
    spec = spec_from_hf_config(config)
    state = dict(state)
    if "shared.weight" not in state:
        for alt in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alt in state:
                state["shared.weight"] = state[alt]
                break
    if not spec.tie_word_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        state["lm_head.weight"] = state["shared.weight"]
    if spec.tie_word_embeddings and "lm_head.weight" in state and "shared.weight" in state:
        if not np.array_equal(
            np.asarray(state["lm_head.weight"]), np.asarray(state["shared.weight"])
        ):
            raise ValueError(
                "checkpoint has an lm_head.weight different from shared.weight but its config ties "
                "them (tie_word_embeddings true); set tie_word_embeddings=false in config.json"
            )
    flat: dict[str, np.ndarray] = {}
    for hf_key, path, shape, transpose in _hf_layout(spec):
        if hf_key not in state:
            raise ValueError(
                f"T5 checkpoint lacks {hf_key!r} (needed by the config: {spec.num_layers} encoder / "
                f"{spec.num_decoder_layers} decoder layers, gated={spec.is_gated_act}, "
                f"tied={spec.tie_word_embeddings})"
            )
        value = np.asarray(state[hf_key])
        if tuple(value.shape) != shape:
            raise ValueError(
                f"T5 checkpoint tensor {hf_key!r} has shape {tuple(value.shape)}, the config "
                f"expects {shape}"
            )
        flat[path] = np.ascontiguousarray(value.T) if transpose else value
    return tree_lib.unflatten(flat)


def init_params(
    module: T5,
    rng: jax.Array,
    *,
    batch_size: int = 1,
    input_length: int = 8,
    target_length: int = 8,
) -> dict:
    """Randomly initialised parameters (plain arrays), with HF's init scales."""
    ids = jnp.zeros((batch_size, input_length), jnp.int32)
    tgt = jnp.zeros((batch_size, target_length), jnp.int32)
    variables = module.init(rng, ids, jnp.ones_like(ids), tgt)
    return nn.unbox(variables)["params"]
