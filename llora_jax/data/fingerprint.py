"""Provenance of a task's data: where each split came from and a hash of its rows.

``task_fingerprint({"train": td, "validation": ..., "test": ...})`` gives a JSON-able
record::

    {"task": "sst2", "source": "local", "digest": "<sha256 of the splits below>",
     "splits": {"test": {"origin": "/data/text/sst2/test.jsonl", "rows": 872,
                         "sha256": "<hash of the rows used>"}, ...}}

The hash is over the rows a split actually uses (after the validation carve), row by row
in each column (dtype, shape and bytes of each numeric row; each string's UTF-8 bytes with
its length, so ``["ab", "c"]`` and ``["a", "bc"]`` differ), then over the column hashes in
name order. Equal rows from
another path or from tfds give the same ``sha256``; the ``origin`` is recorded to say
where each came from. Large image sets are read in chunks of ``chunk`` rows.

``check_same_data(recorded, current)`` refuses to score or normalise against other
data than a run was trained and scored on, naming both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from llora_jax.data.sources import DataError

__all__ = [
    "DataMismatch",
    "check_same_data",
    "file_sha256",
    "split_fingerprint",
    "task_fingerprint",
]


class DataMismatch(DataError):
    """Data that differs from the data a run or task vector was made with."""


def file_sha256(path: Any, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _update_column(h: Any, values: Any) -> None:
    """Hash each row of a column chunk: strings as length + UTF-8 bytes, arrays as
    dtype + shape + bytes (so chunking and ragged image sizes do not change the hash)."""
    for v in values:
        if isinstance(v, str):
            b = v.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        else:
            arr = np.asarray(v)
            if arr.dtype == object:
                raise TypeError(f"cannot fingerprint a row of type {type(v).__name__}")
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())


def split_fingerprint(task_data: Any, chunk: int = 4096) -> dict:
    """``{"origin", "rows", "sha256"}`` of one ``TaskData`` split (rows it actually uses).

    One hash per column, then one over ``name\\0<column hash>`` in name order.
    """
    columns: dict[str, Any] = {}
    n = len(task_data)
    paths = getattr(getattr(task_data, "rows", None), "paths", None)
    if paths is not None:
        # Image files: hash their bytes, never decode them (SUN397's train split decoded
        # would take minutes and GBs); the same files elsewhere give the same hash.
        image = columns["image"] = hashlib.sha256()
        for i in task_data.indices:
            image.update(bytes.fromhex(file_sha256(paths[int(i)])))
        _update_column(columns.setdefault("label", hashlib.sha256()), task_data.labels)
    for lo in range(0, n if paths is None else 0, chunk):
        rows = task_data.take(np.arange(lo, min(lo + chunk, n)))
        for name, values in rows.items():
            _update_column(columns.setdefault(name, hashlib.sha256()), values)
    h = hashlib.sha256()
    for name in sorted(columns):
        h.update(f"{name}\0{columns[name].hexdigest()}".encode())
    return {"origin": str(task_data.origin), "rows": int(n), "sha256": h.hexdigest()}


def task_fingerprint(splits: Mapping[str, Any]) -> dict:
    """The provenance record of a task's splits ({split name: TaskData})."""
    if not splits:
        raise ValueError("task_fingerprint: no splits given")
    first = next(iter(splits.values()))
    per_split = {name: split_fingerprint(td) for name, td in sorted(splits.items())}
    digest = hashlib.sha256(
        json.dumps({k: v["sha256"] for k, v in per_split.items()}, sort_keys=True).encode()
    ).hexdigest()
    return {
        "task": first.name,
        "source": first.source,
        "digest": digest,
        "splits": per_split,
    }


def check_same_data(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    splits: Iterable[str] | None = None,
    recorded_by: str = "the run",
) -> None:
    """Raise ``DataMismatch`` unless ``current`` holds the same rows as ``recorded``.

    ``splits``: the splits that must agree (default: those both records hold; a split
    that only one of them holds is an error when named in ``splits``).
    """
    rec, cur = recorded.get("splits", {}), current.get("splits", {})
    names = sorted(set(rec) & set(cur)) if splits is None else list(splits)
    if not names:
        raise DataMismatch(
            f"task {recorded.get('task')!r}: {recorded_by} and the current data share no "
            "split to compare; re-run with the data it was made with"
        )
    diffs = []
    for name in names:
        a, b = rec.get(name), cur.get(name)
        if a is None or b is None:
            diffs.append(
                f"{name}: {'missing in ' + recorded_by if a is None else 'not loaded now'}"
            )
        elif a["sha256"] != b["sha256"]:
            diffs.append(
                f"{name}: {a['origin']} ({a['rows']} rows, sha256 {a['sha256'][:12]}) vs now "
                f"{b['origin']} ({b['rows']} rows, sha256 {b['sha256'][:12]})"
            )
    if diffs:
        raise DataMismatch(
            f"task {recorded.get('task')!r}: the data differs from the data {recorded_by} was "
            f"made with: {'; '.join(diffs)}. Point LLORA_DATA_DIR (or --config.data.data_dir) "
            "at the data it was made with, or fine-tune again on this data"
        )
