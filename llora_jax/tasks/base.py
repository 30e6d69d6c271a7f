"""What every task family builds: an ``Experiment`` (task model, adapter spec, arrays, metrics)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llora_jax.types import AdapterSpec, TaskModel


@dataclasses.dataclass
class Experiment:
    """Everything a fine-tuning or evaluation run of one task needs."""

    task: str
    tm: TaskModel
    spec: AdapterSpec
    arrays: dict[str, dict[str, np.ndarray]]  # "train" | "validation" | "test"
    metric_fn: Callable[[np.ndarray, dict[str, np.ndarray]], dict]
    task_spec: Any
    primary_metric: str = "accuracy"
    # Optional second readout at the end of a run: (trainable, phi0, split) -> metrics
    # (T5: greedy generation + exact match, beside label-word scoring).
    extra_eval: Callable[[Any, Any, str], dict] | None = None
    # Provenance of the splits it was built from (data.fingerprint.task_fingerprint).
    data: dict | None = None
    # A streamed training split (variable-size images): (batch_size, seed) -> an iterator
    # with get_state() / set_state() (the loop's ``Run.batches``); "train" is then not in
    # ``arrays``. Such a run trains alone (groups need arrays).
    train_batches: Callable[[int, int], Iterator[dict]] | None = None
    # Corrupt images skipped per split while decoding it (data.skip_corrupt).
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def streams_train(self) -> bool:
        return self.train_batches is not None


def limit_rows(n: int, limit: int) -> np.ndarray:
    """All positions, or a fixed (seed 0, sorted) random subset of ``limit`` of them.

    A random subset rather than the first rows: source files are often ordered by label.
    """
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))
