"""The data position of a run's batch source, as of the batches the loop has consumed.

A run's batches are read ahead (``data.prefetch_to_device`` keeps a few ready in a
thread), so the source's own ``get_state()`` is ahead of the training step. ``Positions``
wraps the source: the producer records the state after each batch it yields, the loop
calls ``consumed()`` once per step, and ``state()`` is then the position right after
the last batch a step used, which is what a checkpoint must save.

Two kinds of source:

* a streaming iterator with ``get_state()`` / ``set_state()`` (``data.streaming``'s grain
  iterator): its state is saved with the checkpoint and restored on resume;
* arrays (``data.batches``, seeded permutations indexed by step): the position is the
  step itself, so resuming only needs ``start_step``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any


class Positions(Iterator[dict]):
    """An iterator over a source's batches that knows the state after each consumed batch."""

    def __init__(self, source: Any, start: int, restored: dict | None) -> None:
        self.source = source
        self.streaming = hasattr(source, "get_state") and hasattr(source, "set_state")
        if self.streaming and restored is not None and "source" in restored:
            source.set_state(restored["source"])
        self._pending: collections.deque = collections.deque()
        self._step = int(start)
        self._current: Any = restored.get("source") if restored else None

    def __next__(self) -> dict:
        batch = next(self.source)
        if self.streaming:
            self._pending.append(self.source.get_state())  # deque: thread-safe append
        return batch

    def consumed(self) -> None:
        """The loop took one more batch (call once per step)."""
        self._step += 1
        if self.streaming:
            self._current = self._pending.popleft()

    def state(self) -> dict:
        """JSON-able position after the last consumed batch (the checkpoint's ``data`` item)."""
        out: dict[str, Any] = {"step": self._step}
        if self.streaming:
            out["source"] = self._current
        return out

    @property
    def skipped(self) -> int | None:
        """Corrupt images skipped by the consumed batches (streaming sources that count them)."""
        if not self.streaming:
            return None
        if isinstance(self._current, dict) and "skipped" in self._current:
            return int(self._current["skipped"])
        return int(getattr(self.source, "skipped", 0))
