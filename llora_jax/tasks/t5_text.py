"""Text-to-text classification with T5 / Flan-T5 (the paper's GLUE set-up).

Training: teacher-forced cross-entropy on the target words. Evaluation: rank
classification — the sum of log-probabilities of each candidate label word,
argmax (one encoder pass, all candidates teacher-forced in one batch).
Greedy generation + exact match is available as a second readout
(:func:`generate_metrics`). STS-B is scored over the 26 strings "0.0".."5.0"
of T5's 0.2 grid.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import adapters, forward
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import t5_decode
from llora_jax.data import compute_metrics, format_score, stsb_round, t5_arrays
from llora_jax.data.tasks import TaskSpec
from llora_jax.evaluation.batches import iterate_batches
from llora_jax.tasks.base import Experiment, limit_rows
from llora_jax.types import AdapterSpec, TaskModel

STSB_WORDS = tuple(format_score(round(0.2 * i, 1)) for i in range(26))


def label_words(spec: TaskSpec) -> tuple[str, ...]:
    return STSB_WORDS if spec.is_regression else tuple(spec.label_names)


def class_index(spec: TaskSpec, labels: np.ndarray) -> np.ndarray:
    if spec.is_regression:
        return np.rint(stsb_round(labels) * 5).astype(np.int32)
    return np.asarray(labels, np.int32)


def encode_label_words(tokenizer: Any, words: Sequence[str], length: int) -> dict[str, np.ndarray]:
    enc = tokenizer(
        list(words), max_length=length, padding="max_length", truncation=True, return_tensors="np"
    )
    return {
        "ids": enc["input_ids"].astype(np.int32),
        "mask": enc["attention_mask"].astype(np.int32),
    }


def encode_examples(
    tokenizer: Any, spec: TaskSpec, examples: dict, max_len: int, target_len: int
) -> dict[str, np.ndarray]:
    arr = t5_arrays(spec, examples, tokenizer, max_length=max_len, max_target_length=target_len)
    out = {k: np.asarray(v) for k, v in arr.items() if k != "label"}
    out["label"] = class_index(spec, arr["label"])
    if spec.is_regression:
        out["score"] = np.asarray(arr["label"], np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class LabelWordReadout:
    """Teacher-forced training logits, or rank-classification scores of the head's label words.

    A value (compared by its fields), not a closure: every task of one backbone has an
    equal readout, so their train and predict programs are compiled once.
    """

    decoder_start: int
    pad: int

    def __call__(self, call, batch, head, train):
        start, pad = self.decoder_start, self.pad
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if train:
            dec_in = t5_decode.shift_right(batch["labels"], start, pad)
            # The label words travel with the outputs: ``predict`` needs them and takes
            # no head argument.
            return {
                "token_logits": call(ids, mask, dec_in, deterministic=False),
                "label_ids": head["ids"],
                "label_mask": head["mask"],
            }
        enc = call(ids, mask, method="encode")
        b, (c, t) = ids.shape[0], head["ids"].shape
        labels = jnp.broadcast_to(head["ids"][None], (b, c, t)).reshape(b * c, t)
        lmask = jnp.broadcast_to(head["mask"][None], (b, c, t)).reshape(b * c, t)
        labels = jnp.where(lmask > 0, labels, pad)
        logits = call(
            t5_decode.shift_right(labels, start, pad),
            jnp.repeat(enc, c, axis=0),
            jnp.repeat(mask, c, axis=0),
            method="decode",
        )
        logp = t5_decode.token_log_probs(logits, labels).reshape(b, c, t)
        return {"logits": jnp.sum(jnp.where(lmask.reshape(b, c, t) > 0, logp, 0.0), axis=-1)}


def target_loss(outputs: dict, batch: dict) -> jax.Array:
    """Mean token cross-entropy of the target words, per example."""
    logp = t5_decode.token_log_probs(outputs["token_logits"], batch["labels"])
    m = batch["decoder_attention_mask"].astype(jnp.float32)
    return -jnp.sum(logp * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def label_predict(outputs: dict, batch: dict) -> jax.Array:
    """The best-scoring label word; during training the teacher-forced argmax tokens that
    spell a label word exactly (else -1), a cheap training-time accuracy."""
    if "logits" in outputs:
        return jnp.argmax(outputs["logits"], axis=-1)
    tok = jnp.argmax(outputs["token_logits"], axis=-1)  # (B, T)
    lab, lm = outputs["label_ids"], outputs["label_mask"] > 0  # (C, T)
    t = min(tok.shape[1], lab.shape[1])
    eq = (tok[:, None, :t] == lab[None, :, :t]) | ~lm[None, :, :t]
    hit = jnp.all(eq, axis=-1)
    return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1)


def task_model(backbone: Any, tokenizer: Any, spec: TaskSpec, *, target_len: int = 8) -> TaskModel:
    s = backbone.module.spec
    words = encode_label_words(tokenizer, label_words(spec), target_len)
    head = {"ids": jnp.asarray(words["ids"]), "mask": jnp.asarray(words["mask"])}
    return TaskModel(
        module=backbone.module,
        params=backbone.params,
        readout=LabelWordReadout(int(s.decoder_start_token_id), int(s.pad_token_id)),
        loss=target_loss,
        predict=label_predict,
        head=head,
        base_model=str(backbone.source),
    )


def metrics(spec: TaskSpec, preds: np.ndarray, arrays: dict) -> dict:
    preds = np.asarray(preds)
    if spec.is_regression:
        values = np.where(preds >= 0, preds / 5.0, np.nan)
        return compute_metrics(spec, values, arrays["score"])
    return compute_metrics(spec, preds, arrays["label"])


def generate_metrics(
    tm: TaskModel,
    spec: TaskSpec,
    params: Any,
    tokenizer: Any,
    arrays: dict,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> dict:
    """Greedy generation + exact match of the decoded string (no adapter: pass merged params)."""
    texts: list[str] = []
    for batch, n in iterate_batches(arrays, batch_size):
        out = t5_decode.greedy_decode(
            tm.module, params, batch["input_ids"], batch["attention_mask"], max_new_tokens
        )
        texts += tokenizer.batch_decode(
            np.asarray(jax.device_get(out))[:n], skip_special_tokens=True
        )
    labels = arrays["score"] if spec.is_regression else arrays["label"]
    return compute_metrics(spec, texts, labels)


def generation_eval(exp: Any, tokenizer: Any, target_len: int, batch_size: int):
    """(trainable, phi0, split) -> {"gen_accuracy", ...}: greedy decoding of the model with
    its adapter merged into the weights (``full``: the trained weights). ``l_lora_model``
    has no weight-space form, so it is scored by label words only."""

    def run(trainable: Any, phi0: Any, split: str) -> dict:
        method = exp.spec.method
        if method == "l_lora_model":
            return {}
        if method == "full":
            params = forward.merge_full(exp.tm.params, trainable)
        else:
            params = adapters.merge_into_params(
                exp.tm.params, trainable, exp.spec.lora.scale, phi0=phi0, mode=method
            )
        got = generate_metrics(
            exp.tm,
            exp.task_spec,
            params,
            tokenizer,
            exp.arrays[split],
            max_new_tokens=target_len,
            batch_size=batch_size,
        )
        return {f"gen_{k}": v for k, v in got.items() if k != "num_examples"}

    return run


def build(
    backbone: Any,
    tokenizer: Any,
    splits: dict,
    *,
    method: str,
    lora: LoraConfig,
    limits: dict[str, int],
    max_len: int,
    target_len: int,
    eval_batch_size: int,
) -> Experiment:
    """The experiment of one text-to-text task (``splits``: {"train"|"validation"|"test": TaskData})."""
    spec = splits["train"].spec
    arrays = {
        s: encode_examples(
            tokenizer, spec, d.take(limit_rows(len(d), limits[s])), max_len, target_len
        )
        for s, d in splits.items()
    }
    exp = Experiment(
        task=spec.name,
        tm=task_model(backbone, tokenizer, spec, target_len=target_len),
        spec=AdapterSpec(method, lora),
        arrays=arrays,
        metric_fn=functools.partial(metrics, spec),
        task_spec=spec,
        primary_metric=spec.primary_metric,
    )
    exp.extra_eval = generation_eval(exp, tokenizer, target_len, eval_batch_size)
    return exp
