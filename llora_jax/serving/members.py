"""Every single-task adapter of a study on its own split, as one routed pass.

``predict_members(members)`` puts each member's adapter into one bank (in memory)
and runs all members' examples through one routed prediction program: a row is
(member's adapter, member's task, example index), batches hold one task's rows
(its head), and the program is compiled once for all tasks whose heads share a
shape. The predictions equal the per-task evaluation
(``evaluation.grid.predict`` with the member's φ = φ0 + τ; tested).

Routable members: ``lora`` and ``l_lora`` task vectors (and imported ``delta_w``
ones); ``full`` and ``l_lora_model`` runs have no per-layer adapter branch and are
refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llora_jax.fusion.programs import Member
from llora_jax.serving.bank import AdapterBank
from llora_jax.serving.entries import entry_from_task_vector
from llora_jax.serving.predict import RowTask, predict_rows


def _split_task(member: Member, split: str) -> RowTask:
    """Rows are example indices into the member's already-encoded split."""
    arrays = member.exp.arrays[split]

    def encode(rows: Sequence[dict]) -> dict[str, np.ndarray]:
        idx = np.asarray([r["i"] for r in rows], np.int64)
        return {k: np.asarray(v)[idx] for k, v in arrays.items()}

    return RowTask(member.exp.tm, ("i",), encode, decode=lambda p: np.asarray(p))


def members_bank(members: Sequence[Member], capacity: int | None = None) -> AdapterBank:
    """An in-memory bank holding each member's adapter under its task's name."""
    entries = {m.task: entry_from_task_vector(m.tv) for m in members}
    return AdapterBank(entries, capacity=capacity or len(entries))


def predict_members(
    members: Mapping[str, Member] | Sequence[Member],
    split: str = "test",
    *,
    batch_size: int = 64,
    capacity: int | None = None,
    impl: str = "auto",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """{task: predictions of its own adapter on its own ``split``}, in one routed pass."""
    ms = list(members.values()) if isinstance(members, Mapping) else list(members)
    tasks = [m.task for m in ms]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"members must be of distinct tasks, got {tasks}")
    bank = members_bank(ms, capacity)
    row_tasks = {m.task: _split_task(m, split) for m in ms}
    rows = [
        {"adapter": m.task, "task": m.task, "i": i}
        for m in ms
        for i in range(_num_rows(m.exp.arrays[split]))
    ]
    preds = predict_rows(bank, row_tasks, rows, batch_size=batch_size, impl=impl, progress=progress)
    out: dict[str, list[Any]] = {t: [] for t in tasks}
    for r, p in zip(rows, preds):
        out[r["task"]].append(p)
    return {t: np.stack(v) if v else np.zeros((0,), np.int32) for t, v in out.items()}


def _num_rows(arrays: Mapping[str, Any]) -> int:
    return len(next(iter(arrays.values())))
