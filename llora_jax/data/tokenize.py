"""Tokenisation of whole splits into fixed-shape arrays (done once, before batching).

``tokenizer`` is either a Hugging Face tokenizer (anything with ``pad_token_id`` and
``batch_decode``; called with ``padding="max_length", truncation=True``) or a plain
callable ``text -> list[int]`` (``(text_a, text_b) -> list[int]`` for pairs), whose ids
are truncated to ``max_length`` and padded with ``pad_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from llora_jax.data.glue import as_spec, encoder_format, t5_format

__all__ = ["tokenize", "t5_arrays", "encoder_arrays"]


def _is_hf(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "batch_decode")


def _pad(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    lengths = np.minimum([len(s) for s in seqs], max_length)
    ids = np.full((len(seqs), max_length), pad_id, np.int32)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        ids[i, :n] = s[:n]
    mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask}


def tokenize(
    tokenizer: Any | Callable[..., Sequence[int]],
    texts: Sequence[str],
    *,
    max_length: int,
    text_pair: Sequence[str] | None = None,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """-> ``input_ids`` and ``attention_mask`` int32 [N, max_length] (+ ``token_type_ids``
    when an HF tokenizer returns them)."""
    texts = [str(t) for t in texts]
    pair = None if text_pair is None else [str(t) for t in text_pair]
    if _is_hf(tokenizer):
        enc = tokenizer(
            texts,
            text_pair=pair,
            max_length=max_length,
            truncation=True,
            padding="max_length",
            return_tensors="np",
        )
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: np.asarray(enc[k], np.int32) for k in keys if k in enc}
    seqs = (
        [tokenizer(a) for a in texts]
        if pair is None
        else [tokenizer(a, b) for a, b in zip(texts, pair)]
    )
    return _pad(seqs, max_length, 0 if pad_id is None else pad_id)


def t5_arrays(
    task: Any,
    examples: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int = 256,
    max_target_length: int = 8,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Text-to-text arrays: ``input_ids``, ``attention_mask``, ``labels`` (target ids,
    padded with the pad id), ``decoder_attention_mask`` (mask the loss with it) and
    ``label`` (class id or score, for metrics)."""
    spec = as_spec(task)
    inputs, targets = t5_format(spec, examples)
    enc = tokenize(tokenizer, inputs, max_length=max_length, pad_id=pad_id)
    dec = tokenize(tokenizer, targets, max_length=max_target_length, pad_id=pad_id)
    label = np.asarray(examples["label"], np.float32 if spec.is_regression else np.int64)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": dec["input_ids"],
        "decoder_attention_mask": dec["attention_mask"],
        "label": label,
    }


def encoder_arrays(
    task: Any,
    examples: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_length: int = 128,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Encoder arrays: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``label``."""
    fmt = encoder_format(task, examples)
    out = tokenize(
        tokenizer, fmt["text_a"], text_pair=fmt["text_b"], max_length=max_length, pad_id=pad_id
    )
    out["label"] = fmt["label"]
    return out
