"""Frozen zero-shot classification heads from the CLIP text tower.

A head is an (n_classes, dim) array of L2-normalised text embeddings; the logits of an image
are ``exp(logit_scale) * cos(image_embedding, class_embedding)``. With several templates the
class embedding is the renormalised mean of the normalised per-template embeddings (the CLIP
paper's prompt ensembling). Per-dataset template lists belong to ``llora_jax.data``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PAPER_TEMPLATE", "PAPER_TEMPLATES", "build_zeroshot_head", "zeroshot_logits"]

# The single prompt of the L-LoRA paper's CLIP experiments.
PAPER_TEMPLATE = "a photo of a {c}."
PAPER_TEMPLATES: tuple[str, ...] = (PAPER_TEMPLATE,)

Template = str | Callable[[str], str]


def _render(template: Template, name: str) -> str:
    if callable(template):
        return template(name)
    if "{c}" not in template and "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{c}}' (or '{{}}') placeholder")
    return template.format(name, c=name)


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_zeroshot_head(
    module: nn.Module,
    params: Any,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[Template] = PAPER_TEMPLATES,
    *,
    batch_size: int = 256,
) -> jax.Array:
    """(n_classes, dim) float32 L2-normalised class embeddings from the text tower.

    ``templates`` are format strings with ``{c}`` (or ``{}``) for the class name, or callables
    ``name -> prompt``. ``tokenizer`` is an HF CLIP tokenizer (e.g. ``tokenizers.load_tokenizer(path)``).
    """
    class_names, templates = list(class_names), list(templates)
    if not class_names:
        raise ValueError("build_zeroshot_head: class_names is empty")
    if not templates:
        raise ValueError("build_zeroshot_head: templates is empty")
    if getattr(module, "text", None) is None:
        raise ValueError(
            "build_zeroshot_head needs a CLIP module with a text tower (a full CLIPModel "
            "checkpoint); this one is vision-only"
        )
    texts = [_render(t, c) for c in class_names for t in templates]
    # One tokenization padded to the longest prompt and equal-size chunks: a single compile.
    tok = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=module.text.max_position_embeddings,
        return_tensors="np",
    )
    ids = np.asarray(tok["input_ids"], np.int32)
    mask = np.asarray(tok["attention_mask"], np.int32)
    n = len(texts)
    size = min(batch_size, n)
    pad = -n % size
    if pad:  # fill the last chunk with copies of row 0, dropped below
        ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    chunks = [
        _encode_text(module, params, ids[i : i + size], mask[i : i + size])
        for i in range(0, len(ids), size)
    ]
    emb = jnp.concatenate(chunks)[:n].reshape(len(class_names), len(templates), -1)
    return jax.lax.stop_gradient(_normalize(emb.mean(axis=1)))


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(module: nn.Module, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    emb = module.apply({"params": params}, ids, mask, method="encode_text")
    return _normalize(emb.astype(jnp.float32))


def zeroshot_logits(image_embeds: jax.Array, head: jax.Array, logit_scale: Any) -> jax.Array:
    """``exp(logit_scale) * cos(image, class)``: (batch, dim) x (n_classes, dim) -> (batch, n)."""
    img = _normalize(image_embeds.astype(jnp.float32))
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * (img @ head.astype(jnp.float32).T)
