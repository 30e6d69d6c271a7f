"""Streaming batches with Google's grain: seeded index sampling over a random-access
source, per-process shards, worker processes that decode and resize images, fixed-shape
uint8 batches, bounded host memory and a checkpointable position.

::

    it = data.make_batch_iterator(task_data, 128, seed=0, image_size=224, worker_count=4)
    for step, batch in zip(range(steps), it):      # batch["image"]: uint8 [B, 224, 224, 3]
        ...
    state = it.get_state()                          # JSON-able: save it with the checkpoint
    it = data.make_batch_iterator(task_data, 128, seed=0, image_size=224, worker_count=4)
    it.set_state(state)                             # the same batches as without the stop

``data`` is a :class:`~llora_jax.data.TaskData` (images are decoded from paths, bytes or
arrays in the workers; text rows pass through) or a dict of equal-length arrays (e.g.
the output of ``t5_arrays`` / ``encoder_arrays``: text goes through the same pipeline).
``batch_size`` is global: each of ``shard_count`` processes (default: jax processes)
yields ``batch_size // shard_count`` rows of its own shard. Every batch has a float32
``weight`` (0 for padding and skipped corrupt images) and an int32 ``corrupt`` flag; the
iterator's ``skipped`` counts corrupt images seen so far (it is part of the state).

The order is a function of (``seed``, ``shard_index``, ``shard_count``, ``worker_count``):
grain batches inside each worker, so resume with the same ``worker_count``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import grain  # not in the GPU image: import this module only where streaming is used
import jax
import numpy as np
from absl import flags

from llora_jax.data import images

__all__ = ["BatchIterator", "make_batch_iterator"]


class _RowsSource:
    """grain random-access source over a TaskData's rows (picklable for workers)."""

    def __init__(self, rows: Any, indices: np.ndarray):
        self.rows, self.indices = rows, np.asarray(indices, np.int64)

    def __repr__(self) -> str:
        # grain checks the saved repr against the resumed source: name the rows exactly
        digest = hashlib.sha1(self.indices.tobytes()).hexdigest()[:16]
        return f"_RowsSource({self.rows.origin!r}, n={len(self)}, indices={digest})"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[int(i)])
        if hasattr(self.rows, "record"):
            return self.rows.record(j)
        one = self.rows.take(np.asarray([j]))
        return {k: v[0] for k, v in one.items()}


class _ArraysSource:
    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"make_batch_iterator: fields have different lengths {lengths}")
        self.n = next(iter(lengths.values()))

    def __repr__(self) -> str:
        return f"_ArraysSource(fields={sorted(self.arrays)}, n={self.n})"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[int(i)] for k, v in self.arrays.items()}


class _DecodeRecord(grain.transforms.Map):
    """Decode + resize the image (if any); add weight / corrupt; strings as object arrays.
    Module level so that worker processes can unpickle it."""

    def __init__(self, image_size: int | None, resize: str | None, skip: bool, origin: str):
        self.image_size, self.resize, self.skip, self.origin = image_size, resize, skip, origin

    def map(self, record: dict) -> dict:
        out = dict(record)
        out["weight"], out["corrupt"] = np.float32(1.0), np.int32(0)
        if "image" in record:
            try:
                out["image"] = images.decode_resize(
                    record["image"], self.image_size, self.resize, self.origin
                )
            except images.CorruptImageError:
                if not self.skip:
                    raise
                side = self.image_size or 1
                out["image"] = np.zeros((side, side, 3), np.uint8)
                out["weight"], out["corrupt"] = np.float32(0.0), np.int32(1)
        for k, v in out.items():
            if isinstance(v, str | bytes):
                out[k] = np.asarray(v, dtype=object)
        return out


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """A grain DataLoader iterator with padding of the last batch, a corrupt-image count
    and a JSON-able ``get_state`` / ``set_state``."""

    def __init__(self, loader: Any, local_batch: int, pad: bool, config: dict):
        self._loader, self._local, self._pad, self._config = loader, local_batch, pad, config
        self._it = iter(loader)
        self.skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.skipped += int(np.sum(batch["corrupt"]))
        n = len(batch["weight"])
        if self._pad and n < self._local:
            fill = np.zeros(self._local - n, np.int64)  # copies of row 0, weight 0
            batch = {k: np.concatenate([v, v[fill]]) for k, v in batch.items()}
            batch["weight"][n:] = 0.0
            batch["corrupt"][n:] = 0
        return batch

    def get_state(self) -> dict[str, Any]:
        grain_state = self._it.get_state()
        return {
            "grain": grain_state.decode() if isinstance(grain_state, bytes) else grain_state,
            "skipped": self.skipped,
            "config": self._config,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if dict(state["config"]) != self._config:
            diff = {
                k: (state["config"].get(k), v)
                for k, v in self._config.items()
                if state["config"].get(k) != v
            }
            raise ValueError(
                f"data position saved with other pipeline settings (saved, now): {diff}; "
                "resume with the same settings or start over"
            )
        g = state["grain"]
        self._it.set_state(g.encode() if isinstance(g, str) else g)
        self.skipped = int(state["skipped"])


def _shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        return jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def make_batch_iterator(
    data: Any,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    image_size: int | None = 224,
    resize: str | None = "clip",
    skip_corrupt: bool = False,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_prefetch: int = 64,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> BatchIterator:
    """A checkpointable iterator of fixed-shape batches (see the module docstring).

    ``num_epochs=None`` repeats forever (training); for evaluation use ``num_epochs=1,
    shuffle=False, drop_remainder=False`` (the last batch is padded with weight 0).
    Host memory is bounded by ``worker_count * worker_buffer_size`` decoded batches plus
    ``read_prefetch`` undecoded records per reader.
    """
    if resize not in images.RESIZE_MODES:
        raise ValueError(f"resize {resize!r} not in {images.RESIZE_MODES}")
    if worker_count and not flags.FLAGS.is_parsed():
        # grain's worker start reads absl flags; a program that is not an absl app has
        # not parsed them, so take their defaults (grain would raise UnparsedFlagAccess).
        flags.FLAGS.mark_as_parsed()
    index, count = _shards(shard_index, shard_count)
    if batch_size < count or batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not a multiple of {count} processes")
    local = batch_size // count
    if isinstance(data, Mapping):
        source, origin = _ArraysSource(data), "arrays"
    else:
        source, origin = _RowsSource(data.rows, data.indices), data.origin
    if len(source) // count < 1:
        raise ValueError(f"{origin}: {len(source)} rows cannot be split over {count} processes")
    shard = grain.sharding.ShardOptions(index, count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            _DecodeRecord(image_size, resize, skip_corrupt, origin),
            grain.transforms.Batch(local, drop_remainder=drop_remainder),
        ],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=read_prefetch
        ),
    )
    config = json.loads(
        json.dumps(
            dict(
                n=len(source),
                batch_size=batch_size,
                seed=seed,
                shuffle=shuffle,
                num_epochs=num_epochs,
                drop_remainder=drop_remainder,
                image_size=image_size,
                resize=resize,
                worker_count=worker_count,
                shard=[index, count],
            )
        )
    )
    return BatchIterator(loader, local, pad=not drop_remainder, config=config)
