"""T5 training and inference helpers: shift_right, loss, greedy decoding, rank classification.

All functions take the :class:`llora_jax.backbones.t5.T5` module and its parameters.
Where a function runs the model it accepts ``apply_fn(params, *args, method=..., **kwargs)``
(default: ``module.apply({"params": params}, ...)``). ``params`` is handed to ``apply_fn``
untouched, so a caller that attaches adapters may pass e.g. ``(backbone_params, adapter)``
and an ``apply_fn`` that unpacks them; both stay traced inputs of the jitted decoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "shift_right",
    "token_log_probs",
    "loss",
    "init_decode_cache",
    "greedy_decode",
    "score_label_words",
]

ApplyFn = Callable[..., Any]


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """Decoder inputs for teacher forcing: ``[start, labels[:-1]]`` with -100 replaced by pad."""
    labels = jnp.asarray(labels)
    start = jnp.full(labels[..., :1].shape, decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def token_log_probs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(labels[t]) under ``logits`` (float32, shape of ``labels``); negative labels give 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(labels < 0, 0, labels)
    picked = jnp.take_along_axis(logp, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(labels < 0, 0.0, picked)


def loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array | None = None) -> jax.Array:
    """Mean token cross-entropy over the targets that count.

    A target counts where ``label_mask`` is nonzero, or, with no mask, where the label is not
    -100 (HF's ignore index). Returns 0 when no target counts (HF would give NaN).
    """
    labels = jnp.asarray(labels)
    mask = labels != -100 if label_mask is None else jnp.asarray(label_mask) > 0
    mask = mask & (labels >= 0)
    nll = -token_log_probs(logits, jnp.where(mask, labels, 0))
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def init_decode_cache(module: Any, batch_size: int, max_length: int) -> dict:
    """Empty key/value cache for ``module.decode(..., cache=...)`` holding ``max_length`` tokens.

    Layout: ``{"index": int32 scalar, "block_i": {"self": {"k", "v"}, "cross": None}}``; the
    self-attention arrays are (batch, max_length, heads * d_kv) in the compute dtype. The cross
    entries are filled by the first decoding step, which must be given ``encoder_hidden``.
    """
    s = module.spec
    shape = (batch_size, max_length, s.num_heads * s.d_kv)
    cache: dict = {"index": jnp.zeros((), jnp.int32)}
    for i in range(s.num_decoder_layers):
        kv = {"k": jnp.zeros(shape, module.dtype), "v": jnp.zeros(shape, module.dtype)}
        cache[f"block_{i}"] = {"self": kv, "cross": None}
    return cache


def _apply(module: Any, apply_fn: ApplyFn | None) -> ApplyFn:
    if apply_fn is not None:
        return apply_fn
    return lambda params, *args, **kwargs: module.apply({"params": params}, *args, **kwargs)


def _ones_if_none(mask: Any, ids: jax.Array) -> jax.Array:
    return jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask)


def greedy_decode(
    module: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    max_new_tokens: int,
    *,
    decoder_start_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    apply_fn: ApplyFn | None = None,
) -> jax.Array:
    """Greedy decoding with a key/value cache, jitted with fixed shapes.

    Returns the generated ids (batch, max_new_tokens), int32, without the start token: each
    row stops at its first EOS (kept) and is padded with ``pad_token_id`` afterwards, which is
    what HF ``generate(do_sample=False, num_beams=1)`` returns after its leading start token.
    The loop exits early once every row has produced EOS. Token ids default to the module's
    spec (from the HF config); ``eos_token_id=-1`` disables stopping.
    """
    s = module.spec
    start = s.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    eos = s.eos_token_id if eos_token_id is None else eos_token_id
    pad = s.pad_token_id if pad_token_id is None else pad_token_id
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = jnp.asarray(input_ids)
    mask = _ones_if_none(attention_mask, input_ids)
    ids = (start, eos, pad)
    return _greedy(module, apply_fn, int(max_new_tokens), params, input_ids, mask, *ids)


# Token ids are traced (not static) so that changing them does not recompile.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _greedy(module, apply_fn, n, params, input_ids, mask, start, eos, pad):
    apply = _apply(module, apply_fn)
    batch = input_ids.shape[0]
    enc = apply(params, input_ids, mask, method="encode")
    cache = init_decode_cache(module, batch, n)
    first = jnp.full((batch, 1), start, jnp.int32)
    # The first step also computes and caches every layer's cross-attention keys/values.
    logits, cache = apply(params, first, enc, mask, cache=cache, method="decode")
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((batch, n), pad, jnp.int32).at[:, 0].set(tok)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, out, tok, done, cache = carry
        logits, cache = apply(params, tok[:, None], None, mask, cache=cache, method="decode")
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.int32(0), i))
        return i + 1, out, nxt, done | (nxt == eos), cache

    carry = (jnp.int32(1), out, tok, tok == eos, cache)
    return jax.lax.while_loop(cond, body, carry)[1]


def score_label_words(
    module: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    label_token_ids: jax.Array,
    label_mask: jax.Array,
    *,
    decoder_start_token_id: int | None = None,
    pad_token_id: int | None = None,
    apply_fn: ApplyFn | None = None,
) -> jax.Array:
    """Rank classification: Σ_t log p(label token t | input, previous label tokens).

    ``label_token_ids``/``label_mask``: (n_labels, T) shared by the batch, or
    (batch, n_labels, T); mask 1 on the real tokens of each candidate (include its EOS to
    score the whole word). Returns (batch, n_labels) float32; ``argmax(-1)`` is the
    prediction. The encoder runs once per input; candidates are teacher-forced in one batch.
    Jitted (the module and ``apply_fn`` are static; arrays and token ids are traced).
    """
    s = module.spec
    start = s.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    pad = s.pad_token_id if pad_token_id is None else pad_token_id
    input_ids = jnp.asarray(input_ids)
    mask = _ones_if_none(attention_mask, input_ids)
    labels = jnp.asarray(label_token_ids)
    lmask = jnp.asarray(label_mask) > 0
    if labels.shape != lmask.shape or labels.ndim not in (2, 3):
        raise ValueError(
            f"label_token_ids {labels.shape} and label_mask {lmask.shape} must have the same "
            "shape, (n_labels, T) or (batch, n_labels, T)"
        )
    if labels.ndim == 2:  # broadcast outside the jit: both forms share one compilation
        labels = jnp.broadcast_to(labels[None], (input_ids.shape[0], *labels.shape))
        lmask = jnp.broadcast_to(lmask[None], (input_ids.shape[0], *lmask.shape))
    return _score(module, apply_fn, params, input_ids, mask, labels, lmask, start, pad)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score(module, apply_fn, params, input_ids, mask, labels, lmask, start, pad):
    apply = _apply(module, apply_fn)
    batch, n_labels, length = labels.shape
    labels = jnp.where(lmask, labels, pad).reshape(batch * n_labels, length)
    enc = apply(params, input_ids, mask, method="encode")
    enc = jnp.repeat(enc, n_labels, axis=0)
    dec_in = shift_right(labels, start, pad)
    logits = apply(params, dec_in, enc, jnp.repeat(mask, n_labels, axis=0), method="decode")
    logp = token_log_probs(logits, labels).reshape(batch, n_labels, length)
    return jnp.sum(jnp.where(lmask, logp, 0.0), axis=-1)
