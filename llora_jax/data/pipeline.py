"""Batching: seeded shuffling, per-process shards, fixed shapes, device prefetch.

``batch_size`` is the *global* batch size. In every step the global batch (rows of one
seeded permutation per epoch, identical on every process) is cut into ``process_count``
equal slices and process ``process_index`` yields its slice, so the processes see
disjoint rows, together cover the split, and all yield the same number of steps (which
collectives across hosts need). With ``drop_remainder=False`` the last global batch is
filled up to full size with copies of a real row whose ``weight`` is 0; every batch
carries a float32 ``weight`` field (1 = real example, 0 = padding). Weight your loss and
metrics by it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["steps_per_epoch", "batches", "prefetch_to_device"]


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


class _ArraysView:
    """``take`` over a dict of equal-length arrays."""

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {
            k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in arrays.items()
        }
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"batches: fields have different lengths {lengths}")
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.arrays.items()}


def _plans(
    n: int,
    batch_size: int,
    local: int,
    offset: int,
    seed: int,
    shuffle: bool,
    drop_remainder: bool,
    epochs: int | None,
    start_step: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, valid mask) of this process for every step."""
    steps = steps_per_epoch(n, batch_size, drop_remainder)
    epoch, first = divmod(start_step, steps)
    while epochs is None or epoch < epochs:
        # One permutation per (seed, epoch): identical on all processes, independent of
        # how many steps were skipped.
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for s in range(first, steps):
            g = order[s * batch_size : (s + 1) * batch_size]
            valid = np.arange(batch_size) < len(g)
            g = np.concatenate([g, np.full(batch_size - len(g), g[0], g.dtype)])
            sl = slice(offset, offset + local)
            yield g[sl], valid[sl]
        epoch, first = epoch + 1, 0


def batches(
    data: Any,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    transform: Callable[[dict], dict] | None = None,
    num_workers: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield this process's fixed-shape batches (``batch_size // process_count`` rows).

    ``data``: a dict of equal-length arrays, or anything with ``__len__`` and
    ``take(indices) -> dict`` (a :class:`~llora_jax.data.TaskData`). ``epochs=None``
    loops forever (a fresh permutation each epoch). ``start_step`` skips that many
    global steps without reading data (resume). ``transform`` maps each batch dict (e.g.
    an image transform) before ``weight`` is added; ``num_workers`` > 0 reads and
    transforms batches in that many threads, in order.
    """
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"global batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    source = data if hasattr(data, "take") else _ArraysView(data)
    n = len(source)
    if steps_per_epoch(n, batch_size, drop_remainder) == 0:
        raise ValueError(
            f"no batch: {n} rows, batch_size {batch_size}, drop_remainder={drop_remainder}"
        )
    local = batch_size // process_count
    plans = _plans(
        n,
        batch_size,
        local,
        process_index * local,
        seed,
        shuffle,
        drop_remainder,
        epochs,
        start_step,
    )

    def make(plan: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        idx, valid = plan
        batch = dict(source.take(idx))
        if transform is not None:
            batch = dict(transform(batch))
        for k, v in batch.items():
            if not isinstance(v, np.ndarray) or len(v) != local:
                raise TypeError(
                    f"batch field {k!r} is a {type(v).__name__} of {len(v)} rows, expected an "
                    f"array of {local}; variable-size images need a transform (see image_transform)"
                )
        batch["weight"] = valid.astype(np.float32)
        return batch

    if num_workers <= 0:
        yield from map(make, plans)
        return
    yield from _ordered_map(make, plans, num_workers)


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


# ---------------------------------------------------------------------------------------
# device prefetch


def _device_put(batch: Mapping[str, Any], sharding: Any) -> dict[str, Any]:

    out = {}
    for k, v in batch.items():
        s = sharding.get(k) if isinstance(sharding, Mapping) else sharding
        if isinstance(v, np.ndarray) and v.dtype.kind in "OUS":
            out[k] = v  # strings stay on the host
        elif s is None:
            out[k] = jax.device_put(v)
        elif s.is_fully_addressable:
            out[k] = jax.device_put(v, s)
        else:  # multi-host: v is this process's slice of the global batch
            out[k] = jax.make_array_from_process_local_data(s, v)
    return out


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def prefetch_to_device(
    iterator: Iterable[Mapping[str, Any]], size: int = 2, sharding: Any = None
) -> Iterator[dict[str, Any]]:
    """Move batches to devices in a background thread, keeping ``size`` ready.

    ``sharding``: None (default device), a ``jax.sharding.Sharding`` for every field, or a
    dict field -> sharding. A sharding that spans several processes builds global arrays
    with ``jax.make_array_from_process_local_data`` from each process's slice. String
    fields stay numpy. Errors in the producer are re-raised here.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in iterator:
                if not put(_device_put(batch, sharding)):
                    return
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            put(_Raised(e))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
