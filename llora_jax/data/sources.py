"""Readers: local JSONL / npz files and tensorflow-datasets ArrayRecord sources.

Local layout (``data_dir`` argument or the ``LLORA_DATA_DIR`` environment variable)::

    <dir>/text/<task>/{train,test}.jsonl   one JSON object per line, tfds GLUE field names
    <dir>/vision/<name>.npz                train_images/train_labels/test_images/test_labels
    <dir>/vision/<name>_<split>.npz        images/labels (e.g. mnist_test.npz, test only)

Images are uint8 HWC (a grayscale [N, H, W] array gets a channel axis). tfds is read
through ``tfds.data_source`` (ArrayRecord, numpy records): TensorFlow is never imported.
Every reader returns a *rows* object with ``__len__`` and ``take(indices) -> dict``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llora_jax.data.tasks import TaskSpec
from llora_jax.errors import UserError

__all__ = [
    "ENV_VAR",
    "DataError",
    "DataNotFoundError",
    "ArrayRows",
    "TfdsRows",
    "resolve_data_dir",
    "layout_help",
    "local_vision_path",
    "read_npz",
    "tfds_source",
    "read_tfds_text",
]

ENV_VAR = "LLORA_DATA_DIR"


class DataError(UserError, ValueError):
    """A malformed data file: the message names the file and line (or record)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset that is neither in the local directory nor available through tfds."""


def layout_help(name: str, kind: str) -> str:
    """How to provide ``name`` locally; ``kind`` is "text", "vision" or "any"."""
    text = (
        f"<dir>/text/{name}/train.jsonl and test.jsonl (JSONL rows with tfds GLUE fields + label)"
    )
    image = (
        f"<dir>/vision/{name}.npz (train_images, train_labels, test_images, test_labels) "
        f"or <dir>/vision/{name}_<split>.npz (images, labels), uint8 HWC images"
    )
    files = {"text": text, "vision": image}.get(kind, f"{text}, or for images {image}")
    now = os.environ.get(ENV_VAR) or "<unset>"
    return f"Provide it locally: set {ENV_VAR} (now {now}) or pass data_dir=<dir>, with {files}."


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """``data_dir`` if given, else ``$LLORA_DATA_DIR``, else None; a named directory
    that does not exist is an error (not a silent switch to tfds)."""
    d = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None
    if d is None:
        return None
    path = pathlib.Path(d).expanduser()
    if not path.is_dir():
        how = "data_dir" if data_dir is not None else f"${ENV_VAR}"
        raise DataNotFoundError(
            f"data directory {str(path)!r} (from {how}) does not exist; fix the path, or "
            f"unset {ENV_VAR} to read registered tasks from tfds"
        )
    return path


# ---------------------------------------------------------------------------------------
# rows


class ArrayRows:
    """In-memory columns (numpy arrays with a common first axis)."""

    def __init__(self, columns: Mapping[str, np.ndarray], origin: str):
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{origin}: columns of different lengths {lengths}")
        self.columns = dict(columns)
        self.origin = origin
        self._n = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._n

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        return {k: v[idx] for k, v in self.columns.items()}


def _get_records(ds: Any, idx: Sequence[int]) -> list:
    try:  # batched read when the source supports it (the tfds mock source does not)
        return list(ds.__getitems__([int(i) for i in idx]))
    except (AttributeError, TypeError):
        return [ds[int(i)] for i in idx]


def _stack(values: list) -> np.ndarray | list:
    arrs = [np.asarray(v) for v in values]
    if arrs and all(a.shape == arrs[0].shape for a in arrs):
        return np.stack(arrs)
    return arrs  # variable-size images: a list, to be fixed by an image transform


class TfdsRows:
    """Lazy random access to a tfds ArrayRecord source (images decoded on ``take``)."""

    def __init__(self, ds: Any, origin: str, fields: Sequence[str], num_classes: int):
        self.ds, self.origin, self.fields, self.num_classes = ds, origin, tuple(fields), num_classes

    def __len__(self) -> int:
        return len(self.ds)

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        idx = np.asarray(indices, np.int64)
        recs = _get_records(self.ds, idx)
        out = {f: _stack([r[f] for r in recs]) for f in self.fields}
        labels = np.asarray(out["label"], np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            i = bad[0]
            raise DataError(
                f"{self.origin} record {idx[i]}: label {labels[i]} outside 0..{self.num_classes - 1}"
            )
        out["label"] = labels
        return out


# ---------------------------------------------------------------------------------------
# local vision


def local_vision_path(
    root: pathlib.Path | None, name: str, split: str
) -> tuple[pathlib.Path, str] | None:
    """(file, key prefix) holding ``split`` of ``name``, or None."""
    if root is None:
        return None
    single = root / "vision" / f"{name}_{split}.npz"
    if single.is_file():
        return single, ""
    combined = root / "vision" / f"{name}.npz"
    if combined.is_file():
        with np.load(combined) as z:
            if f"{split}_images" in z.files:
                return combined, f"{split}_"
    return None


def read_npz(path: pathlib.Path, prefix: str, num_classes: int | None) -> ArrayRows:
    """Images (uint8 [N, H, W, C]) and int64 labels from an npz, validated."""
    ik, lk = f"{prefix}images", f"{prefix}labels"
    with np.load(path) as z:
        for key in (ik, lk):
            if key not in z.files:
                raise DataError(f"{path}: missing key {key!r} (has {z.files})")
        images, labels = z[ik], z[lk]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{path}: {ik!r} must be uint8 [N, H, W(, C)], got {images.dtype} {images.shape}"
        )
    if images.ndim == 3:
        images = images[..., None]
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {lk!r} must be integer [{len(images)}], got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    hi = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((labels < 0) | (labels >= hi))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: {lk}[{i}] = {labels[i]} outside 0..{hi - 1}")
    return ArrayRows({"image": images, "label": labels}, f"{path}:{prefix}")


# ---------------------------------------------------------------------------------------
# tfds


def tfds_source(
    tfds_name: str, split: str, *, tfds_data_dir: str | None = None, download: bool = False
) -> Any:
    """``tfds.data_source`` without TensorFlow; a clear error when the data is absent."""
    import tensorflow_datasets as tfds  # tfds (~230 MB with pyarrow) is slow to import; tfds sources only

    if tfds_name.startswith("glue/"):
        import tensorflow_datasets.text.glue  # noqa: F401  (registers the GLUE builders)
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=tfds_data_dir, download=download)
    except Exception as e:  # tfds raises several unrelated types for "not prepared"
        where = tfds_data_dir or "the default tfds data dir (TFDS_DATA_DIR)"
        raise DataNotFoundError(
            f"tfds dataset {tfds_name!r} split {split!r} is not prepared in ArrayRecord format "
            f"in {where} ({type(e).__name__}, see the chained error). Prepare it with "
            f"`tfds build {tfds_name} --file_format=array_record` (or download=True), or read "
            f"it from local files."
        ) from e


def _text(v: Any) -> str:
    v = v.item() if isinstance(v, np.ndarray) else v
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_tfds_text(ds: Any, spec: TaskSpec, origin: str, chunk: int = 4096) -> ArrayRows:
    """Materialise a GLUE tfds source into columns (small enough to hold in memory)."""
    n = len(ds)
    cols: dict[str, list] = {f: [] for f in (*spec.text_fields, "label", "idx")}
    for start in range(0, n, chunk):
        for r in _get_records(ds, range(start, min(n, start + chunk))):
            for f in spec.text_fields:
                cols[f].append(_text(r[f]))
            cols["label"].append(np.asarray(r["label"]).item())
            cols["idx"].append(int(np.asarray(r.get("idx", len(cols["idx"])))))
    labels = np.asarray(cols["label"], np.float32 if spec.is_regression else np.int64)
    if not spec.is_regression:
        bad = np.flatnonzero((labels < 0) | (labels >= spec.num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{origin} record {i}: label {labels[i]} outside 0..{spec.num_classes - 1}"
                " (GLUE test splits are unlabelled: use 'validation')"
            )
    out: dict[str, np.ndarray] = {"idx": np.asarray(cols["idx"], np.int64)}
    for f in spec.text_fields:
        out[f] = np.asarray(cols[f], dtype=object)
    out["label"] = labels
    return ArrayRows(out, origin)
