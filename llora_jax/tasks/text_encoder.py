"""Text classification on a frozen sentence encoder (BERT / MiniLM) with frozen label heads.

In the spirit of CLIP's zero-shot heads, each class gets a short
natural-language description, embedded once by the *frozen base* encoder:
logits = scale · cos(embedding(input), embedding(description)). Sentence pairs
are encoded as one joint input ([CLS] a [SEP] b [SEP]). Regression tasks
(STS-B) become 5 equal-width bins of the score range with descriptions of
increasing similarity; their metric adds the Spearman/Pearson correlation of
the predicted bin centre with the true score.

Only the encoder (or its adapters) trains, so merged models need no head
surgery: every task vector shares the same frozen heads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from llora_jax import forward
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import pooling
from llora_jax.data import compute_metrics, encoder_arrays
from llora_jax.data import tokenize as tok
from llora_jax.data.metrics import pearson, spearman
from llora_jax.data.tasks import TaskSpec
from llora_jax.tasks.base import Experiment, limit_rows
from llora_jax.types import AdapterSpec, TaskModel

N_BINS = 5

# Nicer descriptions for well-known label words; any other task falls back to
# "{label word with spaces}", so nothing depends on these names.
_KNOWN = {
    ("unacceptable", "acceptable"): (
        "this sentence is ungrammatical and unacceptable",
        "this sentence is grammatical and acceptable",
    ),
    ("negative", "positive"): ("this is negative", "this is positive"),
    ("not_equivalent", "equivalent"): (
        "the two sentences mean different things",
        "the two sentences mean the same thing",
    ),
    ("not_duplicate", "duplicate"): (
        "the two questions ask different things",
        "the two questions ask the same thing",
    ),
    ("entailment", "not_entailment"): (
        "the second sentence follows from the first",
        "the second sentence does not follow from the first",
    ),
    ("entailment", "neutral", "contradiction"): (
        "the second sentence follows from the first",
        "the second sentence may or may not be true given the first",
        "the second sentence contradicts the first",
    ),
}
_BIN_WORDS = ("unrelated", "barely related", "somewhat similar", "very similar", "equivalent")


def label_descriptions(spec: TaskSpec) -> tuple[str, ...]:
    """One description per class (per score bin for regression tasks)."""
    if spec.is_regression:
        if len(spec.text_fields) > 1:
            return tuple(f"the two sentences are {w}" for w in _BIN_WORDS)
        return tuple(f"a score of {k + 1} out of {N_BINS}" for k in range(N_BINS))
    if spec.descriptions:  # a local task's info.json names its classes in words
        return tuple(spec.descriptions)
    words = tuple(spec.label_names)
    if words in _KNOWN:
        return _KNOWN[words]
    return tuple(w.replace("_", " ") for w in words)


def score_bins(spec: TaskSpec, scores: np.ndarray) -> np.ndarray:
    lo, hi = spec.label_range or (float(np.min(scores)), float(np.max(scores)))
    width = (hi - lo) / N_BINS
    return np.clip(((np.asarray(scores) - lo) / width).astype(np.int64), 0, N_BINS - 1)


def bin_centres(spec: TaskSpec) -> np.ndarray:
    lo, hi = spec.label_range or (0.0, 1.0)
    width = (hi - lo) / N_BINS
    return lo + width * (np.arange(N_BINS) + 0.5)


def tokenize(
    tokenizer: Any, text_a: Sequence[str], text_b: Sequence[str] | None, max_len: int
) -> dict[str, np.ndarray]:
    """Fixed-length ids, mask and token types (all int32) of single texts or pairs."""

    out = tok(tokenizer, text_a, max_length=max_len, text_pair=text_b)
    out.setdefault("token_type_ids", np.zeros_like(out["input_ids"]))
    return out


def encode_examples(
    tokenizer: Any, spec: TaskSpec, examples: Mapping[str, Any], max_len: int
) -> dict[str, np.ndarray]:
    """Examples (data.load_task(...).examples) -> model arrays with an integer "label".

    Regression tasks also keep the float "score" (for correlation metrics).
    """
    arrays = encoder_arrays(spec, examples, tokenizer, max_length=max_len)
    arrays.setdefault("token_type_ids", np.zeros_like(arrays["input_ids"]))
    label = np.asarray(arrays.pop("label"))
    if spec.is_regression:
        arrays["score"] = label.astype(np.float32)
        arrays["label"] = score_bins(spec, label).astype(np.int32)
    else:
        arrays["label"] = label.astype(np.int32)
    return arrays


def build_head(
    module: Any, params: Any, tokenizer: Any, descriptions: Sequence[str], max_len: int = 32
) -> jnp.ndarray:
    """(C, H) L2-normalised embeddings of the class descriptions by the frozen base model."""
    toks = tokenize(tokenizer, descriptions, None, max_len)
    return pooling.sentence_embedding(
        module, params, toks["input_ids"], toks["attention_mask"], toks["token_type_ids"]
    )


def readout(call: Any, batch: dict, head: dict, train: bool) -> dict:
    """scale · cos(mean-pooled sentence embedding, frozen class embeddings).

    A module-level function (no closure): task models of different tasks share it,
    so their compiled programs are shared too.
    """
    if "segment_ids" in batch:
        emb = _packed_embeddings(call, batch, train)
    else:
        hidden = call(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            deterministic=not train,
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        emb = pooling.l2_normalize(pooling.mean_pool(hidden, batch["attention_mask"]))
    logits = head["scale"] * emb @ head["classes"].T.astype(emb.dtype)
    # Padding rows (pad_classes) can never win and add exactly 0 to the softmax.
    return {"logits": jnp.where(head["valid"], logits, jnp.asarray(-1e9, logits.dtype))}


def _packed_embeddings(call: Any, batch: dict, train: bool) -> jnp.ndarray:
    """(R, S, H) sentence embeddings of packed rows (``llora_jax.evaluation.packing``): each segment
    attends only to itself and is mean-pooled over its own tokens."""
    seg = batch["segment_ids"]
    hidden = call(
        batch["input_ids"],
        seg > 0,
        batch["token_type_ids"],
        position_ids=batch["position_ids"],
        segment_ids=seg,
        deterministic=not train,
    )
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    n_slots = batch["weight"].shape[-1]
    member = (seg[..., None] == jnp.arange(1, n_slots + 1)).astype(jnp.float32)  # (R, L, S)
    summed = jnp.einsum("rlh,rls->rsh", hidden.astype(jnp.float32), member)
    return pooling.l2_normalize(summed / jnp.maximum(member.sum(1), 1e-9)[..., None])


def pad_classes(tm: TaskModel, n: int) -> TaskModel:
    """The task model with its class table padded to ``n`` rows that are never predicted.

    Task models of one study padded to one class count have heads of one shape, so every
    task shares the compiled train step and evaluation programs (STS-B's 5 bins otherwise
    compile their own). Losses, predictions and gradients are unchanged.
    """
    classes, valid = tm.head["classes"], tm.head["valid"]
    extra = n - classes.shape[0]
    if extra <= 0:
        return tm
    head = dict(
        tm.head,
        classes=jnp.concatenate([classes, jnp.zeros((extra, classes.shape[1]), classes.dtype)]),
        valid=jnp.concatenate([valid, jnp.zeros((extra,), bool)]),
    )
    return dataclasses.replace(tm, head=head)


def task_model(
    backbone: Any,
    tokenizer: Any,
    spec: TaskSpec,
    *,
    scale: float = 20.0,
    descriptions: Sequence[str] | None = None,
) -> TaskModel:
    """A TaskModel whose logits are scale · cos(sentence embedding, frozen class embedding)."""
    descriptions = tuple(descriptions or label_descriptions(spec))
    head = {
        "classes": build_head(backbone.module, backbone.params, tokenizer, descriptions),
        "scale": jnp.asarray(scale, jnp.float32),
        "valid": jnp.ones((len(descriptions),), bool),
    }

    return TaskModel(
        module=backbone.module,
        params=backbone.params,
        readout=readout,
        loss=forward.classification_loss,
        predict=forward.argmax_predict,
        head=head,
        base_model=str(backbone.source),
        full_ft_targets=(r"^encoder/",),
        packable=True,
    )


def metrics(spec: TaskSpec, preds: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict:
    """Task metrics of class predictions (bin predictions for regression tasks)."""

    preds = np.asarray(preds)
    if spec.is_regression:
        values = bin_centres(spec)[preds]
        score = np.asarray(arrays["score"])
        return {
            "accuracy": float(np.mean(preds == np.asarray(arrays["label"]))),
            "pearson": pearson(values, score),  # 0 for one bin everywhere (data.metrics)
            "spearman": spearman(values, score),
        }
    return compute_metrics(spec, preds, np.asarray(arrays["label"]))


def build(
    backbone: Any,
    tokenizer: Any,
    splits: dict,
    *,
    method: str,
    lora: LoraConfig,
    limits: dict[str, int],
    max_len: int,
    head_scale: float = 20.0,
) -> Experiment:
    """The experiment of one sentence-encoder task (``splits``: {split: TaskData})."""
    spec = splits["train"].spec
    arrays = {
        s: encode_examples(tokenizer, spec, d.take(limit_rows(len(d), limits[s])), max_len)
        for s, d in splits.items()
    }
    return Experiment(
        task=spec.name,
        tm=task_model(backbone, tokenizer, spec, scale=head_scale),
        spec=AdapterSpec(method, lora),
        arrays=arrays,
        metric_fn=functools.partial(metrics, spec),
        task_spec=spec,
        primary_metric=spec.primary_metric,
    )
