"""Batch prediction over many adapters: rows naming an adapter → predictions in input order.

A row is a dict with ``"adapter"`` (a bank name, or null for the bare base model) and
the task's fields (e.g. ``"sentence"``). Rows are encoded once, grouped into
fixed-shape batches by length bucket and adapter (so a batch holds few distinct
adapters and never more than the bank's device capacity), run through one compiled
routed program per bucket, and put back in input order.

``predict_file`` validates every row before any work (an unknown adapter or a
malformed row raises one error naming the line and the adapter) and writes its
output to a temporary sibling renamed into place at the end: a failure leaves no
output file, and an existing one is replaced only by a complete one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from llora_jax.adapters import routed
from llora_jax.data import tokenize
from llora_jax.serving.bank import AdapterBank
from llora_jax.types import TaskModel

log = logging.getLogger(__name__)

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
MIN_BUCKET = 8


def _json_value(p: Any) -> Any:
    a = np.asarray(p)
    return a.item() if a.ndim == 0 else a.tolist()


@dataclasses.dataclass(frozen=True)
class RowTask:
    """How rows of one task become model inputs, and predictions JSON values.

    ``encode(rows)`` returns arrays with one leading entry per row; arrays named in
    ``token_keys`` are (rows, max_length) and are cut to each batch's length bucket
    (lengths from ``attention_mask``). ``decode`` turns one prediction into a JSON value.
    """

    task_model: TaskModel
    fields: tuple[str, ...]
    encode: Callable[[Sequence[dict]], dict[str, np.ndarray]]
    decode: Callable[[Any], Any] = _json_value
    token_keys: tuple[str, ...] = TOKEN_KEYS


def text_task(
    task_model: TaskModel,
    tokenizer: Any,
    text_fields: Sequence[str],
    *,
    label_names: Sequence[str] | None = None,
    max_length: int = 128,
) -> RowTask:
    """A RowTask for text models whose batches are tokenized ``text_fields`` (one or a pair)."""
    if not 1 <= len(text_fields) <= 2:
        raise ValueError(f"text_fields must name one text or a pair, got {list(text_fields)}")

    def encode(rows: Sequence[dict]) -> dict[str, np.ndarray]:
        a = [r[text_fields[0]] for r in rows]
        b = [r[text_fields[1]] for r in rows] if len(text_fields) == 2 else None
        out = tokenize(tokenizer, a, max_length=max_length, text_pair=b)
        out.setdefault("token_type_ids", np.zeros_like(out["input_ids"]))
        return out

    def decode(p: Any) -> Any:
        v = _json_value(p)
        return label_names[v] if label_names is not None and 0 <= v < len(label_names) else v

    return RowTask(task_model, tuple(text_fields), encode, decode)


@functools.cache
def _predict_fn(module: Any, readout: Callable, predict: Callable, impl: str) -> Callable:
    """One jitted routed prediction program per task-model functions and implementation."""

    @jax.jit
    def run(params, head, bank, ids, batch):
        def call(*args, **kw):
            return routed.apply(module, params, bank, ids, *args, impl=impl, **kw)

        return predict(readout(call, batch, head, False), batch)

    return run


def _bucket(length: int, max_length: int) -> int:
    b = MIN_BUCKET
    while b < length:
        b *= 2
    return min(b, max_length)


def plan_batches(
    adapters: Sequence[str | None], buckets: Sequence[int], batch_size: int, capacity: int
) -> list[list[int]]:
    """Row indices grouped by (bucket, adapter); a batch never spans two buckets or holds
    more than ``capacity`` distinct adapters."""
    order = sorted(range(len(adapters)), key=lambda i: (buckets[i], adapters[i] or "", i))
    batches: list[list[int]] = []
    cur: list[int] = []
    names: set[str | None] = set()
    for i in order:
        new_name = adapters[i] is not None and adapters[i] not in names
        full = len(cur) == batch_size
        too_many = new_name and len(names - {None}) >= capacity
        if cur and (full or buckets[i] != buckets[cur[0]] or too_many):
            batches.append(cur)
            cur, names = [], set()
        cur.append(i)
        names.add(adapters[i])
    if cur:
        batches.append(cur)
    return batches


def predict_rows(
    bank: AdapterBank,
    task: RowTask,
    rows: Sequence[dict],
    *,
    batch_size: int = 32,
    impl: str = "auto",
    progress: bool = True,
) -> list[Any]:
    """Predictions for ``rows`` (validated by the caller), in input order."""
    if not rows:
        return []
    arrays = task.encode(rows)
    tm = task.task_model
    token_len = arrays["input_ids"].shape[1] if "input_ids" in arrays else 0
    if "attention_mask" in arrays:
        lengths = np.asarray(arrays["attention_mask"]).sum(axis=1)
        buckets = [_bucket(int(n), token_len) for n in lengths]
    else:
        lengths = np.zeros(len(rows), np.int64)
        buckets = [0] * len(rows)
    adapters = [r.get("adapter") for r in rows]
    run = _predict_fn(tm.module, tm.readout, tm.predict, impl)
    preds: list[Any] = [None] * len(rows)
    start = time.perf_counter()
    with tqdm(total=len(rows), disable=not progress, desc="predict", unit="row") as bar:
        for idx in plan_batches(adapters, buckets, batch_size, bank.capacity):
            # Pad to a fixed batch with copies of the first row run on the base model.
            padded = idx + [idx[0]] * (batch_size - len(idx))
            names = [adapters[i] for i in idx] + [None] * (batch_size - len(idx))
            dev_bank, ids = bank.resolve(names)
            batch = {}
            for k, v in arrays.items():
                v = np.asarray(v)[padded]
                batch[k] = v[:, : buckets[idx[0]]] if k in task.token_keys else v
            out = np.asarray(run(tm.params, tm.head, dev_bank, ids, batch))
            for j, i in enumerate(idx):
                preds[i] = task.decode(out[j])
            bar.update(len(idx))
    secs = time.perf_counter() - start
    log.info(
        "predicted %d rows in %.2f s: %.1f examples/s, %.1f tokens/s (cache: %s)",
        len(rows),
        secs,
        len(rows) / secs,
        float(lengths.sum()) / secs,
        dataclasses.asdict(bank.stats),
    )
    return preds


def validate_rows(bank: AdapterBank, task: RowTask, lines: Sequence[str]) -> list[dict]:
    """Parse and check every line; raise one error naming each bad row (its line number)
    and its adapter."""
    rows, problems = [], []
    known = set(bank.names)
    for n, line in enumerate(lines, start=1):
        if not line.strip():  # blank lines are skipped but keep the numbering of the file
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"row {n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"row {n}: a JSON object is needed, got {type(row).__name__}")
            continue
        name = row.get("adapter")
        if "adapter" not in row:
            problems.append(f"row {n}: no 'adapter' field (a bank name, or null for the base)")
        elif name is not None and name not in known:
            problems.append(f"row {n}: adapter {name!r} is not in the bank")
        missing = [f for f in task.fields if row.get(f) is None]
        if missing:
            problems.append(f"row {n} (adapter {name!r}): missing field(s) {missing}")
        rows.append(row)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"{len(problems)} bad input row(s), nothing was predicted: "
            + "; ".join(problems[:5])
            + more
            + f". Each row needs 'adapter' (one of the bank's {len(known)} names, or null) "
            f"and the fields {list(task.fields)}"
        )
    return rows


def predict_file(
    bank: AdapterBank,
    task: RowTask,
    input_jsonl: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    *,
    batch_size: int = 32,
    impl: str = "auto",
    progress: bool = True,
) -> dict:
    """Predict every row of ``input_jsonl`` into ``out_jsonl`` (one JSON object a line,
    in input order: ``{"adapter", "prediction"}`` plus the row's ``"id"`` if it has one)."""
    src, dst = Path(input_jsonl), Path(out_jsonl)
    if not src.is_file():
        raise FileNotFoundError(f"no input file {src}")
    lines = src.read_text().splitlines()
    rows = validate_rows(bank, task, lines)
    preds = predict_rows(bank, task, rows, batch_size=batch_size, impl=impl, progress=progress)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with tmp.open("w") as f:
            for row, p in zip(rows, preds):
                out = {"id": row["id"]} if "id" in row else {}
                f.write(json.dumps(out | {"adapter": row.get("adapter"), "prediction": p}) + "\n")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"rows": len(rows), "out": str(dst), "cache": dataclasses.asdict(bank.stats)}
