"""Hugging Face ``datasets`` as a task source: a hub id (+ config), or a local directory
written by ``save_to_disk`` or holding parquet files.

Class names come from the label column's ``ClassLabel``; images from the first ``Image``
column (read undecoded, so the pipeline's workers decode them); text fields are mapped
to the task's layout (``columns`` renames dataset columns to task fields). ``HUB`` maps
the paper's eight vision tasks and seven GLUE tasks to hub ids (see docs/notes/data.md
for which were checked and how).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from llora_jax.data import images
from llora_jax.data.sources import DataError, DataNotFoundError

__all__ = ["HubRoute", "HUB", "HFRows", "open_split", "parse_source"]


@dataclasses.dataclass(frozen=True)
class HubRoute:
    """Where a task lives on the hub: id, config, our split -> the dataset's split."""

    path: str
    config: str | None = None
    splits: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"train": "train", "test": "test"}
    )
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)  # dataset -> task


def _glue(config: str, test: str = "validation") -> HubRoute:
    # GLUE test labels are hidden (-1): our "test" is the labelled validation split
    return HubRoute("nyu-mll/glue", config, {"train": "train", "test": test})


HUB: dict[str, HubRoute] = {
    "sun397": HubRoute("tanganke/sun397"),
    "cars": HubRoute("tanganke/stanford_cars"),
    "resisc45": HubRoute("tanganke/resisc45"),
    "eurosat": HubRoute("tanganke/eurosat"),
    "svhn": HubRoute("ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": HubRoute("tanganke/gtsrb"),
    "mnist": HubRoute("ylecun/mnist"),
    "dtd": HubRoute("tanganke/dtd"),
    **{t: _glue(t) for t in ("cola", "mrpc", "qqp", "rte", "sst2", "stsb")},
    "mnli": _glue("mnli", "validation_matched"),
}


def parse_source(source: str) -> tuple[str, str | None]:
    """``"hf:<id or dir>[#<config>]"`` -> (path, config)."""
    rest = source[len("hf:") :]
    path, _, config = rest.partition("#")
    if not path:
        raise ValueError(f"source {source!r}: give hf:<hub id or directory>[#<config>]")
    return path, config or None


def _load(path: str, config: str | None, split: str) -> Any:
    # Imported here: `datasets` is optional (the GPU image does not ship it).
    import datasets  # Hugging Face datasets (~100 MB with pyarrow): HF sources only

    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataNotFoundError(
                        f"{local}: split {split!r} does not exist (has {sorted(ds)})"
                    )
                return ds[split]
            return ds
        files = sorted(local.glob(f"**/{split}*.parquet")) or sorted(
            local.glob(f"**/{split}/*.parquet")
        )
        if not files:
            have = sorted({p.name.split("-")[0] for p in local.glob("**/*.parquet")})
            raise DataNotFoundError(
                f"{local}: no parquet files for split {split!r} (expected {split}-*.parquet or "
                f"{split}/*.parquet; found splits {have})"
            )
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    try:
        return datasets.load_dataset(path, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise DataNotFoundError(
            f"Hugging Face dataset {path!r} (config {config!r}) split {split!r} could not be "
            f"loaded ({type(e).__name__}: {e}); check the id, config and split, or download "
            "it and pass its local directory (hf:<dir>)"
        ) from e


class HFRows:
    """Random access to a Hugging Face dataset in the task's layout (picklable)."""

    def __init__(self, ds: Any, fields: tuple[str, ...], label: str, image: str | None, origin):
        self.ds, self.fields, self.label, self.image, self.origin = ds, fields, label, image, origin
        self.columns = {"label": np.asarray(ds[label])}

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, i: int) -> dict[str, Any]:
        r = self.ds[int(i)]
        out = {"label": r[self.label]}
        if self.image is not None:
            out["image"] = r[self.image]
        for f in self.fields:
            out[f] = r[f]
        return out

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        idx = np.asarray(indices, np.int64)
        sub = self.ds.select(idx.tolist()) if len(idx) else self.ds.select([])
        out: dict[str, Any] = {"label": self.columns["label"][idx]}
        if self.image is not None:
            where = self.origin
            out["image"] = [np.asarray(images.open_rgb(v, where)) for v in sub[self.image]]
        for f in self.fields:
            out[f] = np.asarray(sub[f], dtype=object)
        return out


def _image_column(ds: Any) -> str | None:
    import datasets  # Hugging Face datasets (~100 MB with pyarrow): HF sources only

    return next((k for k, v in ds.features.items() if isinstance(v, datasets.Image)), None)


def open_split(
    path: str,
    config: str | None,
    split: str,
    *,
    fields: tuple[str, ...],
    kind: str,
    columns: Mapping[str, str] | None = None,
    label: str = "label",
) -> tuple[HFRows, tuple[str, ...] | None]:
    """(rows, ClassLabel names or None) of one split, columns checked against the task."""
    import datasets  # Hugging Face datasets (~100 MB with pyarrow): HF sources only

    ds = _load(path, config, split)
    if columns:
        ds = ds.rename_columns(dict(columns))
    origin = f"hf:{path}{'#' + config if config else ''}[{split}]"
    have = sorted(ds.column_names)
    needed = (label, *fields)
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{origin}: no column {missing[0]!r} (columns: {have}); the task needs "
            f"{list(needed)}: rename the dataset's columns (columns={{'<theirs>': "
            f"'{missing[0]}'}}) or pick another dataset"
        )
    image = None
    if kind == "vision":
        image = _image_column(ds)
        if image is None:
            raise DataError(f"{origin}: no Image column (columns: {have}); a vision task needs one")
        ds = ds.cast_column(image, datasets.Image(decode=False))  # workers decode
    feature = ds.features[label]
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    rows = HFRows(ds, fields, label, image, origin)
    labels = rows.columns["label"]
    if names is not None and labels.size:
        bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
        if bad.size:
            raise DataError(
                f"{origin} row {int(bad[0])}: label {labels[bad[0]]} outside the ClassLabel "
                f"names 0..{len(names) - 1} (an unlabelled test split? use the validation split)"
            )
    return rows, names
