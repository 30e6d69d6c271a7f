"""``load_task``: one split of one task, from local files or tfds, as a :class:`TaskData`.

Splits: ``"train"`` (train minus validation), ``"validation"`` (carved from train with
``numpy.random.default_rng(seed)``; fusion coefficients are chosen here), ``"test"``,
and ``"train_full"`` (all training rows, as the reference code used). The validation
size is ``val_size`` if given, else ``min(len(train) // 10, val_max)``. Carved index sets
are sorted, so rows keep source order. For GLUE via tfds, ``"test"`` is the labelled
tfds validation split (MNLI: validation_matched), since GLUE test labels are hidden.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from llora_jax.data import external, image_folder, local_text, sources
from llora_jax.data.sources import DataNotFoundError, layout_help
from llora_jax.data.tasks import TaskSpec, canonical_name, get_task

__all__ = ["SPLITS", "TaskData", "load_task", "carve"]

SPLITS = ("train", "validation", "test", "train_full")
_TEST_CARVE_SEED = 0  # fixed: the test set never depends on the user's seed


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """One split of a task: ``spec`` + random-access ``rows`` restricted to ``indices``.

    ``examples`` materialises every row as a dict of numpy arrays (text: object arrays of
    ``str`` per field, ``label``, ``idx``; vision: ``image`` uint8 [N, H, W, C] or a list
    when sizes vary, ``label``). For large image sets use ``take`` / ``batches`` instead.
    """

    spec: TaskSpec
    split: str
    rows: Any  # ArrayRows | TfdsRows | image_folder.FileRows | hf.HFRows
    indices: np.ndarray
    source: str  # "local" | "tfds" | "hf" | "folder"
    origin: str  # file or tfds split the rows come from

    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    label_names = property(lambda self: self.spec.label_names)
    num_classes = property(lambda self: self.spec.num_classes)
    is_regression = property(lambda self: self.spec.is_regression)
    metrics = property(lambda self: self.spec.metrics)

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, positions: np.ndarray | Sequence[int]) -> dict[str, Any]:
        """Rows at ``positions`` (0..len-1 within this split)."""
        return self.rows.take(self.indices[np.asarray(positions, np.int64)])

    @property
    def examples(self) -> dict[str, Any]:
        return self.take(np.arange(len(self)))

    @property
    def labels(self) -> np.ndarray:
        columns = getattr(self.rows, "columns", {})  # in memory: no image decoding
        if "label" in columns:
            return columns["label"][self.indices]
        return self.examples["label"]

    def __repr__(self) -> str:
        return (
            f"TaskData({self.name!r}, split={self.split!r}, n={len(self)}, origin={self.origin!r})"
        )


def carve(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(n)`` into (carved, rest), both sorted."""
    if not 0 <= size <= n:
        raise ValueError(f"cannot carve {size} rows out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:size]), np.sort(perm[size:])


def _default_val_size(n: int, val_size: int | None, val_max: int) -> int:
    if val_size is None:
        return min(n // 10, val_max)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size} must be in [0, {n}) (train has {n} rows)")
    return val_size


def _unknown_spec(name: str, root: pathlib.Path | None, label_names) -> TaskSpec:
    """Spec for a task that is only in the local directory (text: info.json + train)."""
    if local_text.task_dir(root, name) is not None:
        return local_text.infer_spec(root, name, label_names)
    for split in ("train", "test"):
        if (hit := sources.local_vision_path(root, name, split)) is not None:
            labels = sources.read_npz(hit[0], hit[1], None).columns["label"]
            k = len(label_names) if label_names else int(labels.max()) + 1
            names = tuple(label_names) if label_names else tuple(f"class_{i}" for i in range(k))
            return TaskSpec(name=name, kind="vision", label_names=names, known=False)
    raise DataNotFoundError(
        f"unknown task {name!r}: not registered and not found under "
        f"{root if root is not None else '(no data dir)'}. {layout_help(name, 'any')}"
    )


def _has_local(spec: TaskSpec, root: pathlib.Path | None) -> bool:
    """Whether the local directory holds any split of this task."""
    if root is None:
        return False
    if spec.kind == "text":
        return local_text.task_dir(root, spec.name) is not None
    vision = root / "vision"
    return (vision / f"{spec.name}.npz").is_file() or any(vision.glob(f"{spec.name}_*.npz"))


def _missing_split_message(spec: TaskSpec, root: pathlib.Path | None, split: str) -> str:
    where = root if root is not None else "(none given)"
    msg = f"task {spec.name!r} split {split!r} not found in the local data directory {where}"
    if _has_local(spec, root):
        missing = (
            root / "text" / spec.name / f"{split}.jsonl"
            if spec.kind == "text"
            else root / "vision" / f"{spec.name}_{split}.npz"
        )
        tfds = ", or read every split from tfds with source='tfds'" if spec.tfds_name else ""
        return f"{msg}: {missing} is missing while other splits are there; add it{tfds}."
    return f"{msg}. {layout_help(spec.name, spec.kind)}"


def _local_rows(spec: TaskSpec, root, split: str):
    if spec.kind == "text":
        p = local_text.split_path(root, spec.name, split)
        return None if p is None else local_text.read_split(p, spec)
    hit = sources.local_vision_path(root, spec.name, split)
    return None if hit is None else sources.read_npz(hit[0], hit[1], spec.num_classes)


def _tfds_rows(spec: TaskSpec, base: str, tfds_data_dir, download: bool):
    """(rows, indices) of our train/test from tfds, carving test where tfds has none."""
    if spec.tfds_name is None:
        raise DataNotFoundError(
            f"{spec.name!r} is not a tensorflow-datasets dataset; it is read from local files "
            f"only. {layout_help(spec.name, spec.kind)}"
        )
    carve_test = base == "test" and "test" not in spec.tfds_splits
    tsplit = spec.tfds_splits["train" if carve_test else base]
    ds = sources.tfds_source(spec.tfds_name, tsplit, tfds_data_dir=tfds_data_dir, download=download)
    origin = f"tfds:{spec.tfds_name}[{tsplit}]"
    if spec.kind == "text":
        rows = sources.read_tfds_text(ds, spec, origin)
    else:
        rows = sources.TfdsRows(ds, origin, ("image", "label"), spec.num_classes)
    idx = np.arange(len(rows))
    if spec.test_carve:
        test, rest = carve(len(rows), round(spec.test_carve * len(rows)), _TEST_CARVE_SEED)
        idx = test if base == "test" else rest
    return rows, idx


def _local_or_tfds(cname, base, source, data_dir, label_names, tfds_data_dir, download):
    """(spec, rows, indices, source name) from the local directory or tfds."""
    root = sources.resolve_data_dir(data_dir) if source != "tfds" else None
    folder = _image_folder(root, cname)
    if source != "tfds" and folder is not None:
        spec, rows = external.folder_spec_rows(cname, folder, base, label_names)
        return spec, rows, np.arange(len(rows)), "local"
    try:
        spec = get_task(cname)
    except KeyError:
        if source == "tfds":
            raise
        spec = _unknown_spec(cname, root, label_names)
    if label_names is not None and spec.known and tuple(label_names) != spec.label_names:
        raise ValueError(f"task {cname!r} is registered; its labels are {list(spec.label_names)}")
    if spec.known and spec.kind == "text" and source != "tfds":
        spec = local_text.apply_info(spec, root)
    if source in ("auto", "local"):
        rows = _local_rows(spec, root, base)
        if rows is not None:
            return spec, rows, np.arange(len(rows)), "local"
        if source == "local" or not spec.known or _has_local(spec, root):
            # Never mix sources silently: a task present locally is read locally only.
            raise DataNotFoundError(_missing_split_message(spec, root, base))
    try:
        rows, idx = _tfds_rows(spec, base, tfds_data_dir, download)
    except DataNotFoundError as e:
        msg = str(e)
        if "LLORA_DATA_DIR" not in msg:
            msg += " " + layout_help(cname, spec.kind)
        raise DataNotFoundError(msg) from e.__cause__
    return spec, rows, idx, "tfds"


def _image_folder(root: pathlib.Path | None, name: str) -> pathlib.Path | None:
    """``<root>/vision/<name>/`` when it is an image folder (``<split>/<class>/``)."""
    d = None if root is None else root / "vision" / name
    return d if d is not None and image_folder.is_image_folder(d) else None


def load_task(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    val_size: int | None = None,
    val_max: int = 1000,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    tfds_data_dir: str | None = None,
    download: bool = False,
) -> TaskData:
    """Load one split of a task.

    ``source``: ``"local"`` (``data_dir`` or ``$LLORA_DATA_DIR``), ``"tfds"``
    (``tfds.data_source``, ArrayRecord; ``download=False`` never touches the network),
    ``"auto"``: local when the directory holds this task, else tfds (never a mix of the
    two across splits); ``"hf"`` / ``"hf:<hub id or dir>[#<config>]"`` (Hugging Face
    datasets) or ``"folder:<root>"`` (image folders), see :mod:`llora_jax.data.external`.
    ``label_names`` names the classes of a task that is not registered. ``seed`` only
    chooses the validation carve.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    if source not in ("auto", "local", "tfds") and not external.is_external(source):
        raise ValueError(
            f"source {source!r} not in ('auto', 'local', 'tfds', 'hf', 'hf:<hub id or dir>"
            "[#<config>]', 'folder:<root>')"
        )
    cname = canonical_name(name)
    base = "test" if split == "test" else "train"
    if external.is_external(source):
        spec, rows = external.load_external(cname, base, source, label_names)
        idx, src = np.arange(len(rows)), source.split(":")[0]
    else:
        spec, rows, idx, src = _local_or_tfds(
            cname, base, source, data_dir, label_names, tfds_data_dir, download
        )
    if split in ("train", "validation"):
        v = _default_val_size(len(idx), val_size, val_max)
        val, rest = carve(len(idx), v, seed)
        idx = idx[val] if split == "validation" else idx[rest]
    return TaskData(spec, split, rows, idx, src, rows.origin)
