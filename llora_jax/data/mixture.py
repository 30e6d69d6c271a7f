"""Multi-task batches: n tasks' arrays mixed into fixed-shape batches with a task id per example.

Each task keeps its own row stream, exactly the rows (and order) that its single-task run
reads from :func:`llora_jax.data.pipeline.batches` with the same seed (one seeded
permutation per epoch, the incomplete last batch of each epoch dropped, one process).
A seeded schedule says which task fills each slot of each batch; a task's next slots take
its stream's next rows. Hence:

* a mixture of one task is that task's batches, field for field;
* under the ``"per_task"`` budget (n × steps steps) every task sees exactly the rows of
  its single run, in the same order, interleaved with the others;
* under the ``"total"`` budget (steps steps, the cost of one single run) each task gets
  an equal share, steps · batch_size / n rows (the remainder to seeded tasks), a prefix
  of its single run's rows.

Every batch carries ``task_id`` (int32) and ``weight`` (float32, all 1: no padding).
:func:`select_by_task` scores each example with its own task's readout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "BUDGETS",
    "mixture_steps",
    "task_schedule",
    "mixture_batches",
    "stack_padded",
    "select_by_task",
]

BUDGETS = ("per_task", "total")
_SCHEDULE_STREAM = 0x6D6978  # separates the schedule's generator from the rows' ([seed, epoch])


def mixture_steps(n_tasks: int, steps: int, budget: str) -> int:
    """Steps of the multi-task run: n·steps ("per_task": each task as many examples as its
    single run) or steps ("total": the single run's total)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    return n_tasks * steps if budget == "per_task" else steps


def task_schedule(n_tasks: int, total_steps: int, batch_size: int, seed: int) -> np.ndarray:
    """(total_steps, batch_size) task ids: each task ⌊N/n⌋ slots (N = all slots), the
    remainder one each to seeded tasks, all slots in seeded random order."""
    if n_tasks < 1 or total_steps < 1 or batch_size < 1:
        raise ValueError(
            f"need n_tasks, total_steps, batch_size >= 1; got {n_tasks}, {total_steps}, {batch_size}"
        )
    rng = np.random.default_rng([seed, _SCHEDULE_STREAM])
    slots = total_steps * batch_size
    quota = np.full(n_tasks, slots // n_tasks)
    quota[rng.choice(n_tasks, slots % n_tasks, replace=False)] += 1
    ids = rng.permutation(np.repeat(np.arange(n_tasks, dtype=np.int32), quota))
    return ids.reshape(total_steps, batch_size)


class _Stream:
    """Rows of one task in its single run's order: per epoch, the first ⌊n/B⌋·B rows of
    ``default_rng([seed, epoch]).permutation(n)``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.seed = n, seed
        self.per_epoch = (n // batch_size) * batch_size
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._order

    def take(self, start: int, count: int) -> np.ndarray:
        out = []
        while count > 0:
            epoch, pos = divmod(start, self.per_epoch)
            k = min(count, self.per_epoch - pos)
            out.append(self._perm(epoch)[pos : pos + k])
            start, count = start + k, count - k
        return np.concatenate(out) if out else np.empty(0, np.int64)


def _check_fields(arrays_per_task: Sequence[Mapping[str, Any]], batch_size: int) -> list[dict]:
    tasks = [{k: np.asarray(v) for k, v in a.items()} for a in arrays_per_task]
    if not tasks:
        raise ValueError("mixture_batches: no tasks given")
    ref = tasks[0]
    for t, arrays in enumerate(tasks):
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"task {t}: fields have different lengths {lengths}")
        if next(iter(lengths)) < batch_size:
            raise ValueError(
                f"task {t} has {next(iter(lengths))} rows, fewer than batch_size {batch_size}: "
                "no full batch (lower batch_size or drop the task)"
            )
        if arrays.keys() != ref.keys():
            raise ValueError(f"task {t} has fields {sorted(arrays)}, task 0 has {sorted(ref)}")
        for k, v in arrays.items():
            if v.shape[1:] != ref[k].shape[1:] or v.dtype != ref[k].dtype:
                raise ValueError(
                    f"field {k!r}: task {t} has rows {v.shape[1:]} {v.dtype}, task 0 has "
                    f"{ref[k].shape[1:]} {ref[k].dtype}; pad / cast them alike before mixing"
                )
    if {"task_id", "weight"} & ref.keys():
        raise ValueError("task arrays must not have fields 'task_id' or 'weight' (added here)")
    return tasks


def mixture_batches(
    arrays_per_task: Sequence[Mapping[str, Any]],
    batch_size: int,
    steps: int,
    *,
    budget: str = "per_task",
    seed: int = 0,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the multi-task run's batches (``mixture_steps(n, steps, budget)`` of them).

    ``arrays_per_task[t]``: task t's train arrays (same field names, row shapes and dtypes
    for all tasks); ``steps``: the single-task runs' step count; ``start_step``: resume.
    """
    tasks = _check_fields(arrays_per_task, batch_size)
    total = mixture_steps(len(tasks), steps, budget)
    schedule = task_schedule(len(tasks), total, batch_size, seed)
    streams = [_Stream(len(next(iter(a.values()))), batch_size, seed) for a in tasks]
    # Rows each task has consumed before start_step.
    used = np.bincount(schedule[:start_step].ravel(), minlength=len(tasks))
    for step in range(start_step, total):
        ids = schedule[step]
        batch = {k: np.empty((batch_size, *v.shape[1:]), v.dtype) for k, v in tasks[0].items()}
        for t in np.unique(ids):
            slots = np.flatnonzero(ids == t)
            rows = streams[t].take(int(used[t]), len(slots))
            used[t] += len(slots)
            for k, v in tasks[t].items():
                batch[k][slots] = v[rows]
        batch["task_id"] = ids.astype(np.int32)
        batch["weight"] = np.ones(batch_size, np.float32)
        yield batch


def stack_padded(outputs_per_task: Sequence[Any], fill: float | None = None) -> Any:
    """Stack per-task outputs (batch, C_t) into (n, batch, max C_t), padding the class axis
    with ``fill`` (default: the dtype's most negative finite value, so a softmax or an
    argmax over the padded logits equals the one over the task's own classes)."""
    width = max(int(o.shape[-1]) for o in outputs_per_task)
    dtype = jnp.result_type(*outputs_per_task)
    value = jnp.finfo(dtype).min if fill is None else fill
    padded = [
        jnp.pad(
            jnp.asarray(o, dtype),
            [(0, 0)] * (o.ndim - 1) + [(0, width - o.shape[-1])],
            constant_values=value,
        )
        for o in outputs_per_task
    ]
    return jnp.stack(padded)


def select_by_task(outputs_per_task: Any, task_id: Any) -> Any:
    """out[b] = outputs_per_task[task_id[b], b]: each example read out by its own task's
    head. ``outputs_per_task``: (n_tasks, batch, ...) (see :func:`stack_padded`)."""
    out = jnp.asarray(outputs_per_task)
    ids = jnp.asarray(task_id)
    if out.ndim < 2 or ids.shape != out.shape[1:2]:
        raise ValueError(
            f"outputs_per_task must be (n_tasks, batch, ...) and task_id (batch,); got "
            f"{tuple(out.shape)} and {tuple(ids.shape)}"
        )
    index = ids.reshape((1, -1) + (1,) * (out.ndim - 2))
    return jnp.take_along_axis(out, index, axis=0)[0]
