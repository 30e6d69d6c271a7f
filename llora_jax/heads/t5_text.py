"""Text-to-text classification with T5 / Flan-T5 (the paper's GLUE set-up).

Training: teacher-forced cross-entropy on the target words. Evaluation: rank
classification — the sum of log-probabilities of each candidate label word,
argmax (one encoder pass, all candidates teacher-forced in one batch).
Greedy generation + exact match is available as a second readout
(:func:`generate_metrics`). STS-B is scored over the 26 strings "0.0".."5.0"
of T5's 0.2 grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import model as M
from llora_jax.backbones import t5_decode as D
from llora_jax.data import format_score, stsb_round, t5_arrays
from llora_jax.data.tasks import TaskSpec

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


def task_model(
    backbone: Any, tokenizer: Any, spec: TaskSpec, *, target_len: int = 8
) -> M.TaskModel:
    s = backbone.module.spec
    words = encode_label_words(tokenizer, label_words(spec), target_len)
    head = {"ids": jnp.asarray(words["ids"]), "mask": jnp.asarray(words["mask"])}
    start, pad = s.decoder_start_token_id, s.pad_token_id

    def readout(call, batch, head, train):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if train:
            dec_in = D.shift_right(batch["labels"], start, pad)
            return {"token_logits": call(ids, mask, dec_in, deterministic=False)}
        enc = call(ids, mask, method="encode")
        b, (c, t) = ids.shape[0], head["ids"].shape
        labels = jnp.broadcast_to(head["ids"][None], (b, c, t)).reshape(b * c, t)
        lmask = jnp.broadcast_to(head["mask"][None], (b, c, t)).reshape(b * c, t)
        labels = jnp.where(lmask > 0, labels, pad)
        logits = call(
            D.shift_right(labels, start, pad),
            jnp.repeat(enc, c, axis=0),
            jnp.repeat(mask, c, axis=0),
            method="decode",
        )
        logp = D.token_log_probs(logits, labels).reshape(b, c, t)
        return {"logits": jnp.sum(jnp.where(lmask.reshape(b, c, t) > 0, logp, 0.0), axis=-1)}

    def loss(outputs, batch):
        logp = D.token_log_probs(outputs["token_logits"], batch["labels"])
        m = batch["decoder_attention_mask"].astype(jnp.float32)
        return -jnp.sum(logp * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)

    def predict(outputs, batch):
        if "logits" in outputs:
            return jnp.argmax(outputs["logits"], axis=-1)
        # Teacher-forced argmax tokens that spell a label word exactly (else -1): a cheap
        # training-time accuracy.
        tok = jnp.argmax(outputs["token_logits"], axis=-1)  # (B, T)
        lab, lm = head["ids"], head["mask"] > 0  # (C, T)
        t = min(tok.shape[1], lab.shape[1])
        eq = (tok[:, None, :t] == lab[None, :, :t]) | ~lm[None, :, :t]
        hit = jnp.all(eq, axis=-1)
        return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1)

    return M.TaskModel(
        module=backbone.module,
        params=backbone.params,
        readout=readout,
        loss=loss,
        predict=predict,
        head=head,
        base_model=str(backbone.source),
    )


def metrics(spec: TaskSpec, preds: np.ndarray, arrays: dict) -> dict:
    from llora_jax.data import compute_metrics

    preds = np.asarray(preds)
    if spec.is_regression:
        values = np.where(preds >= 0, preds / 5.0, np.nan)
        return compute_metrics(spec, values, arrays["score"])
    return compute_metrics(spec, preds, arrays["label"])


def generate_metrics(
    tm: M.TaskModel,
    spec: TaskSpec,
    params: Any,
    tokenizer: Any,
    arrays: dict,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> dict:
    """Greedy generation + exact match of the decoded string (no adapter: pass merged params)."""
    from llora_jax.evaluate import iterate_batches

    texts: list[str] = []
    for batch, n in iterate_batches(arrays, batch_size):
        out = D.greedy_decode(
            tm.module, params, batch["input_ids"], batch["attention_mask"], max_new_tokens
        )
        texts += tokenizer.batch_decode(
            np.asarray(jax.device_get(out))[:n], skip_special_tokens=True
        )
    from llora_jax.data import compute_metrics

    labels = arrays["score"] if spec.is_regression else arrays["label"]
    return compute_metrics(spec, texts, labels)


def generation_eval(exp: Any, tokenizer: Any, target_len: int, batch_size: int):
    """(trainable, phi0, split) -> {"gen_accuracy", ...}: greedy decoding of the model with
    its adapter merged into the weights (``full``: the trained weights). ``l_lora_model``
    has no weight-space form, so it is scored by label words only."""
    from llora_jax import adapters as ad

    def run(trainable: Any, phi0: Any, split: str) -> dict:
        method = exp.spec.method
        if method == "l_lora_model":
            return {}
        if method == "full":
            params = M.merge_full(exp.tm.params, trainable)
        else:
            params = ad.merge_into_params(
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


def build_experiment(c: Any, bb: Any, tok: Any, splits: dict) -> Any:
    from llora_jax.backbones import t5
    from llora_jax.experiment import Experiment, _limit, lora_config

    spec = splits["train"].spec
    limits = {
        "train": int(c.data.train_limit),
        "validation": int(c.data.eval_limit),
        "test": int(c.data.eval_limit),
    }
    arrays = {
        s: encode_examples(
            tok,
            spec,
            d.take(_limit(len(d), limits[s])),
            int(c.data.max_len),
            int(c.data.target_len),
        )
        for s, d in splits.items()
    }
    exp = Experiment(
        task=spec.name,
        tm=task_model(bb, tok, spec, target_len=int(c.data.target_len)),
        spec=M.AdapterSpec(c.method, lora_config(c, t5.DEFAULT_LORA_TARGETS)),
        arrays=arrays,
        metric_fn=lambda preds, arr: metrics(spec, preds, arr),
        task_spec=spec,
        primary_metric=spec.primary_metric,
    )
    exp.extra_eval = generation_eval(exp, tok, int(c.data.target_len), int(c.eval_batch_size))
    return exp
