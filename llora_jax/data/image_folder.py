"""Image folders: ``<root>/<split>/<class>/*.{jpg,png,...}``; class names = folder names.

Classes are the sorted sub-folders of ``<root>/train`` (or of the split itself when the
root has no train folder) unless the caller gives them (a task's ``label_names``, or an
``info.json`` with ``label_names`` in ``<root>``, whose entries must be the folder
names). Files are listed in sorted order, so the row order is deterministic. Images are
decoded lazily: ``record(i)`` returns the path (decoded by the pipeline's workers),
``take`` decodes at native size.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from llora_jax.data import images, local_text
from llora_jax.data.sources import DataError, DataNotFoundError

__all__ = ["IMAGE_SUFFIXES", "FileRows", "folder_classes", "read_image_folder", "is_image_folder"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


class FileRows:
    """Image files + int64 labels; picklable (paths only), for worker processes."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, origin: str):
        self.paths, self.origin = list(paths), origin
        self.columns = {"label": np.asarray(labels, np.int64)}

    def __len__(self) -> int:
        return len(self.paths)

    def record(self, i: int) -> dict[str, Any]:
        return {"image": self.paths[int(i)], "label": self.columns["label"][int(i)]}

    def take(self, indices: np.ndarray) -> dict[str, Any]:
        idx = np.asarray(indices, np.int64)
        decoded = [np.asarray(images.open_rgb(self.paths[i])) for i in idx]
        return {"image": decoded, "label": self.columns["label"][idx]}


def is_image_folder(root: pathlib.Path) -> bool:
    return root.is_dir() and any((root / s).is_dir() for s in ("train", "test"))


def _class_dirs(split_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_classes(root: pathlib.Path) -> tuple[str, ...]:
    """Class names of an image folder: info.json ``label_names``, else train's folders."""
    info = local_text.read_info(root) if root.is_dir() else None  # validated
    if info is not None and info.label_names is not None:
        return info.label_names
    if not root.is_dir():
        raise DataNotFoundError(f"{root}: the image folder does not exist")
    split_dir = root / "train" if (root / "train").is_dir() else root / "test"
    if not split_dir.is_dir():
        raise DataNotFoundError(f"{root}: no train/ or test/ folder (expected <split>/<class>/)")
    classes = tuple(p.name for p in _class_dirs(split_dir))
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.jpg)")
    return classes


def read_image_folder(
    root: pathlib.Path, split: str, class_names: Sequence[str] | None = None
) -> FileRows:
    """Rows of ``<root>/<split>``; errors name the missing split, an empty or unknown
    class folder (with the class list)."""
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataNotFoundError(
            f"{split_dir}: split {split!r} does not exist (the folder has {have}); expected "
            f"{root}/<split>/<class>/*.jpg"
        )
    classes = tuple(class_names) if class_names is not None else folder_classes(root)
    label_of = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for d in _class_dirs(split_dir):
        if d.name not in label_of:
            raise DataError(
                f"{d}: class folder {d.name!r} is not in the class list {list(classes)[:20]}"
                f"{'...' if len(classes) > 20 else ''}; rename or remove it, or add it to the "
                "task's label_names"
            )
        files = sorted(
            str(f) for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(
                f"{d}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} files); add "
                "its images or remove the folder"
            )
        paths += files
        labels += [label_of[d.name]] * len(files)
    if not paths:
        raise DataError(f"{split_dir}: no class folders with images")
    return FileRows(paths, np.asarray(labels, np.int64), str(split_dir))
