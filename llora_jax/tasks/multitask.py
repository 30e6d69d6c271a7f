"""One task model for a mixture of tasks: every example read out by its own task's head.

A multi-task run trains one adapter (or one full fine-tune) on batches that mix n tasks
(``data.mixture.mixture_batches``, each example with its ``task_id``). The task model is
the tasks' shared one with the n heads stacked on a leading axis; its readout runs the
task readout once per head under ``jax.vmap`` (the backbone call does not depend on the
head, so vmap leaves it unbatched: the backbone runs once) and keeps, for each example,
the outputs of its own task (``select_by_task``). Loss, predictions and the train step
are the single-task ones, unchanged. Heads must share one shape
(``text_encoder.pad_classes``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from llora_jax import tree as tree_lib
from llora_jax.data.mixture import mixture_batches, select_by_task
from llora_jax.fusion.frozen_cores import sequential_schedule
from llora_jax.types import TaskModel

PyTree = Any


@functools.cache
def by_task(readout: Callable[..., dict]) -> Callable[..., dict]:
    """The readout over stacked heads (n, ...) that reads example b with head task_id[b].
    Cached: one function per readout, so compiled steps are shared between runs."""

    def routed(call: Any, batch: dict, heads: PyTree, train: bool) -> dict:
        if "task_id" not in batch:
            raise ValueError("a multi-task readout needs batch['task_id'] (mixture_batches)")
        per_head = jax.vmap(lambda head: readout(call, batch, head, train))(heads)
        return {k: select_by_task(v, batch["task_id"]) for k, v in per_head.items()}

    return routed


def multitask_model(tm: TaskModel, heads: Sequence[PyTree]) -> TaskModel:
    """``tm`` with ``heads`` (one per task id, one shape) stacked and the routed readout."""
    if not heads:
        raise ValueError("multitask_model: no heads given (one per task of the mixture)")
    shapes = {repr(sorted(tree_lib.structure_signature(h).items())) for h in heads}
    if len(shapes) != 1:
        raise ValueError(
            "multitask_model: the tasks' heads differ in shape; pad them to one class count "
            "(text_encoder.pad_classes) before mixing"
        )
    return dataclasses.replace(tm, readout=by_task(tm.readout), head=tree_lib.stack(list(heads)))


def shared_fields(arrays_per_task: Sequence[dict]) -> list[str]:
    """The fields every task has with one row shape and dtype (what a mixture can carry;
    e.g. STS-B's float "score" beside its binned "label" is left out)."""

    def sig(arrays: dict, k: str) -> tuple:
        return arrays[k].shape[1:], arrays[k].dtype

    first = arrays_per_task[0]
    return [
        k for k in first if all(k in a and sig(a, k) == sig(first, k) for a in arrays_per_task[1:])
    ]


def sequential_batches(
    arrays_per_task: Sequence[dict],
    batch_size: int,
    steps_per_task: int,
    *,
    order: Sequence[int] | None = None,
    seed: int = 0,
    start_step: int = 0,
) -> Iterator[dict]:
    """The control of frozen-core tuning: tasks one after another (``order``, default 0..n−1),
    ``steps_per_task`` batches each, every batch one task's (its single run's first batches,
    with ``task_id``), so the same multi-task loop trains it. Resumable at ``start_step``."""
    schedule = sequential_schedule(len(arrays_per_task), steps_per_task, order=order)
    for k, t in enumerate(schedule[::steps_per_task]):
        first = k * steps_per_task
        if start_step >= first + steps_per_task:
            continue
        skip = max(start_step - first, 0)
        stream = mixture_batches(
            [arrays_per_task[int(t)]], batch_size, steps_per_task, seed=seed, start_step=skip
        )
        for batch in stream:
            yield {**batch, "task_id": np.full(batch_size, int(t), np.int32)}
