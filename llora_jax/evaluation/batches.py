"""Evaluation batches: fixed-size batches of a dataset, packed or trimmed, kept on the device.

Token inputs are packed several to a row for models whose readout takes packed rows
(``packing``), otherwise sorted by length with each batch trimmed to its longest row.
The batches of the last few datasets stay on the device (a merge search scores many
models on one validation split), in one bounded cache.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

from llora_jax.evaluation import packing

# Padded token sequences of an encoder input: trimmed together to a batch's longest row.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def iterate_batches(arrays: dict[str, np.ndarray], batch_size: int, trim: bool = False):
    """Yield fixed-size batches in order; the last is padded and carries weight 0 there.

    ``trim``: cut the padded token sequences (``SEQUENCE_KEYS``, right-padded, with an
    ``attention_mask``) of each batch to the smallest power of two (at least 16, at most
    the stored length) that holds its longest row. Exact for models that mask padding;
    sort the examples by length first (``by_length``) so that batches are short.
    """
    n = len(next(iter(arrays.values())))
    width = _trim_widths(arrays, batch_size) if trim else None
    for b, start in enumerate(range(0, n, batch_size)):
        idx = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(idx)
        full = np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx
        batch = {k: np.asarray(v)[full] for k, v in arrays.items()}
        if width is not None:
            batch.update({k: batch[k][:, : width[b]] for k in SEQUENCE_KEYS if k in batch})
        batch["weight"] = np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.float32)
        yield batch, len(idx)


def _token_mask(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The (N, L) attention mask of padded token inputs, or None (e.g. images)."""
    mask = arrays.get("attention_mask")
    return None if mask is None or np.ndim(mask) != 2 else np.asarray(mask)


def _trim_widths(arrays: dict[str, np.ndarray], batch_size: int) -> list[int] | None:
    mask = _token_mask(arrays)
    if mask is None:
        return None
    stored = mask.shape[1]
    if any(np.shape(arrays[k])[:2] != mask.shape for k in SEQUENCE_KEYS if k in arrays):
        return None
    # The last nonzero position + 1 of each row (0 for an all-padding row).
    ends = np.where(mask.any(1), stored - np.argmax(mask[:, ::-1] > 0, axis=1), 0)
    out = []
    for start in range(0, len(mask), batch_size):
        need = int(ends[start : start + batch_size].max())
        out.append(min(stored, max(16, 1 << max(need - 1, 0).bit_length())))
    return out


def by_length(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(arrays sorted shortest first, the inverse permutation) — or (arrays, None) when
    they hold no padded token sequences. ``preds[..., inverse]`` restores the order."""
    mask = _token_mask(arrays)
    if mask is None:
        return arrays, None
    order = np.argsort(mask.sum(1), kind="stable")
    return {k: np.asarray(v)[order] for k, v in arrays.items()}, np.argsort(order)


_BATCHES: dict = {}
_BATCHES_MAX = 32  # datasets kept on the device
_BATCHES_MAX_BYTES = 256 << 20  # larger datasets (e.g. image test sets) are not kept
_BATCHES_LOCK = threading.Lock()


def device_batches(
    arrays: dict[str, np.ndarray], batch_size: int, pack: bool = False
) -> tuple[list[tuple[dict, np.ndarray]], int]:
    """([(batch on the device, slots)], N) for the N examples of ``arrays``.

    ``slots`` holds the dataset position of each of the batch's predictions (-1 =
    padding); ``gather`` puts predictions back in the dataset's order. With ``pack``
    (a model whose readout takes packed rows, ``TaskModel.packable``), right-padded token
    inputs are packed several to a row of the stored width (``llora_jax.evaluation.packing``), and a
    batch is ``batch_size`` packed rows: one program shape for every dataset, and about
    the real tokens' cost. Otherwise token inputs are sorted by length and each batch
    trimmed to its longest row (``iterate_batches(trim=True)``). The batches of the last
    few datasets (up to 256 MB each) stay on the device, so a merge search that scores
    many models on one validation split transfers and packs it once; the arrays are
    treated as immutable.
    """
    with _BATCHES_LOCK:  # a study fine-tunes in a thread while it evaluates merges
        return _device_batches(arrays, batch_size, pack)


def _device_batches(arrays, batch_size, pack):
    key = (id(arrays), batch_size, pack)
    hit = _BATCHES.get(key)
    if hit is not None and hit[0] is arrays:
        return hit[1], hit[2]
    n = len(next(iter(arrays.values())))
    lengths = packing.lengths_if_packable(arrays) if pack else None
    if lengths is not None:
        host = list(packing.packed_batches(packing.pack(arrays, lengths), batch_size))
    else:
        ordered, inverse = by_length(arrays)
        order = np.arange(n) if inverse is None else np.argsort(inverse)
        host = []
        for start, (b, k) in zip(
            range(0, n, batch_size), iterate_batches(ordered, batch_size, trim=True)
        ):
            slots = np.full(batch_size, -1, np.int64)
            slots[:k] = order[start : start + k]
            host.append((b, slots))
    batches = [(jax.device_put(b), slots) for b, slots in host]
    if sum(np.asarray(v).nbytes for v in arrays.values()) > _BATCHES_MAX_BYTES:
        return batches, n
    if len(_BATCHES) >= _BATCHES_MAX:
        _BATCHES.pop(next(iter(_BATCHES)))
    _BATCHES[key] = (arrays, batches, n)  # holds ``arrays``: its id stays unique
    return batches, n


def gather(outs: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Predictions (..., N) in the dataset's order from per-batch outputs (..., *slots.shape)
    and their ``slots`` (``device_batches``)."""
    first, slots0 = outs[0]
    lead = first.shape[: first.ndim - slots0.ndim]
    out = np.zeros((*lead, n), first.dtype)
    for o, slots in outs:
        flat = slots.reshape(-1)
        keep = flat >= 0
        out[..., flat[keep]] = o.reshape(*lead, -1)[..., keep]
    return out
