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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from llora_jax.adapters import routed
from llora_jax.data import tokenize
from llora_jax.errors import UserError
from llora_jax.serving.bank import AdapterBank
from llora_jax.types import TaskModel

log = logging.getLogger(__name__)


class PredictInputError(UserError, ValueError):
    """Input rows that cannot be predicted (bad JSON, unknown adapter, missing fields)."""


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
    adapters: Sequence[str | None],
    buckets: Sequence[int],
    batch_size: int,
    capacity: int,
    groups: Sequence[str] | None = None,
) -> list[list[int]]:
    """Row indices grouped by (group, bucket, adapter); a batch never spans two groups
    (tasks) or buckets, or holds more than ``capacity`` distinct adapters."""
    groups = groups or [""] * len(adapters)
    key = [(groups[i], buckets[i]) for i in range(len(adapters))]
    order = sorted(range(len(adapters)), key=lambda i: (key[i], adapters[i] or "", i))
    batches: list[list[int]] = []
    cur: list[int] = []
    names: set[str | None] = set()
    for i in order:
        new_name = adapters[i] is not None and adapters[i] not in names
        full = len(cur) == batch_size
        too_many = new_name and len(names - {None}) >= capacity
        if cur and (full or key[i] != key[cur[0]] or too_many):
            batches.append(cur)
            cur, names = [], set()
        cur.append(i)
        names.add(adapters[i])
    if cur:
        batches.append(cur)
    return batches


Tasks = RowTask | Mapping[str, RowTask]


def row_task_names(bank: AdapterBank, tasks: Tasks, rows: Sequence[dict]) -> list[str]:
    """Each row's task: ``""`` for one RowTask; with a mapping, the row's ``"task"`` field,
    else the task its adapter was trained for (``bank.task_of``)."""
    if isinstance(tasks, RowTask):
        return [""] * len(rows)
    out = []
    for r in rows:
        name = r.get("task")
        if name is None and r.get("adapter") is not None:
            name = bank.task_of(r["adapter"])
        out.append(name)
    return out


def _encode(task: RowTask, rows: Sequence[dict]) -> tuple[dict, list[int]]:
    """(arrays, each row's length bucket) of one task's rows."""
    arrays = {k: np.asarray(v) for k, v in task.encode(rows).items()}
    if "attention_mask" in arrays:
        width = arrays["attention_mask"].shape[1]
        lengths = arrays["attention_mask"].sum(axis=1)
        return arrays, [_bucket(int(n), width) for n in lengths]
    return arrays, [0] * len(rows)


def predict_rows(
    bank: AdapterBank,
    task: Tasks,
    rows: Sequence[dict],
    *,
    batch_size: int = 32,
    impl: str = "auto",
    progress: bool = True,
) -> list[Any]:
    """Predictions for ``rows`` (validated by the caller), in input order.

    ``task``: one RowTask for every row, or {task name: RowTask} (rows of one batch then
    share a task, whose head the batch uses; task models whose functions and head shapes
    agree share one compiled program)."""
    if not rows:
        return []
    names = row_task_names(bank, task, rows)
    by_task = {"": task} if isinstance(task, RowTask) else task
    where, buckets = [0] * len(rows), [0] * len(rows)
    arrays = {}
    for t in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == t]
        arrays[t], bks = _encode(by_task[t], [rows[i] for i in idx])
        for j, (i, b) in enumerate(zip(idx, bks)):
            where[i], buckets[i] = j, b
    adapters = [r.get("adapter") for r in rows]
    tokens = sum(buckets)  # bucketed tokens, an upper bound on real tokens
    preds: list[Any] = [None] * len(rows)
    start = time.perf_counter()
    with tqdm(total=len(rows), disable=not progress, desc="predict", unit="row") as bar:
        for idx in plan_batches(adapters, buckets, batch_size, bank.capacity, names):
            rt = by_task[names[idx[0]]]
            tm = rt.task_model
            run = _predict_fn(tm.module, tm.readout, tm.predict, impl)
            # Pad to a fixed batch with copies of the first row run on the base model.
            pos = [where[i] for i in idx]
            pos += [pos[0]] * (batch_size - len(idx))
            ids_names = [adapters[i] for i in idx] + [None] * (batch_size - len(idx))
            dev_bank, ids = bank.resolve(ids_names)
            width = buckets[idx[0]]
            batch = {
                k: (v[pos][:, :width] if k in rt.token_keys else v[pos])
                for k, v in arrays[names[idx[0]]].items()
            }
            out = np.asarray(run(tm.params, tm.head, dev_bank, ids, batch))
            for j, i in enumerate(idx):
                preds[i] = rt.decode(out[j])
            bar.update(len(idx))
    secs = time.perf_counter() - start
    log.info(
        "predicted %d rows in %.2f s: %.1f examples/s, %.1f tokens/s (padded to buckets; "
        "cache: %s)",
        len(rows),
        secs,
        len(rows) / secs,
        tokens / secs,
        dataclasses.asdict(bank.stats),
    )
    return preds


def validate_rows(bank: AdapterBank, task: Tasks | None, lines: Sequence[str]) -> list[dict]:
    """Parse and check every line; raise one error naming each bad row (its line number)
    and its adapter. ``task=None`` checks JSON and adapters only (before models load)."""
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
        fields = _fields(task)
        if "adapter" not in row:
            problems.append(f"row {n}: no 'adapter' field (a bank name, or null for the base)")
        elif name is not None and name not in known:
            problems.append(f"row {n}: adapter {name!r} is not in the bank")
        elif task is not None and not isinstance(task, RowTask):
            t = row_task_names(bank, task, [row])[0]
            if t not in task:
                how = "a 'task' field" if name is None else f"a task in adapter {name!r}'s meta"
                problems.append(
                    f"row {n} (adapter {name!r}): task {t!r} is not one of {sorted(task)}; "
                    f"give {how}"
                )
            else:
                fields = task[t].fields
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            problems.append(f"row {n} (adapter {name!r}): missing field(s) {missing}")
        rows.append(row)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PredictInputError(
            f"{len(problems)} bad input row(s), nothing was predicted: "
            + "; ".join(problems[:5])
            + more
            + f". Each row needs 'adapter' (one of the bank's {len(known)} names, or null) "
            f"and its task's fields"
        )
    return rows


def _fields(task: Tasks | None) -> tuple[str, ...]:
    return task.fields if isinstance(task, RowTask) else ()


def read_rows(bank: AdapterBank, input_jsonl: str | os.PathLike, task: Tasks | None = None):
    """The validated rows of a JSON-lines file (see :func:`validate_rows`)."""
    src = Path(input_jsonl)
    if not src.is_file():
        raise PredictInputError(f"no input file {src} (one JSON object a line)")
    return validate_rows(bank, task, src.read_text().splitlines())


def predict_file(
    bank: AdapterBank,
    task: Tasks,
    input_jsonl: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    *,
    batch_size: int = 32,
    impl: str = "auto",
    progress: bool = True,
) -> dict:
    """Predict every row of ``input_jsonl`` into ``out_jsonl`` (one JSON object a line,
    in input order: ``{"adapter", "prediction"}`` plus the row's ``"id"`` if it has one)."""
    dst = Path(out_jsonl)
    rows = read_rows(bank, input_jsonl, task)
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
