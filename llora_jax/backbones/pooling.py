"""Sentence embeddings of a BERT-family encoder: mean pooling, then L2 normalisation."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


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
    module: Any,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """all-MiniLM-L6-v2 style embeddings (B, H) in float32: mean pooling, then L2 normalise."""
    out = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    hidden = out[0] if isinstance(out, tuple) else out
    return l2_normalize(mean_pool(hidden, attention_mask))
