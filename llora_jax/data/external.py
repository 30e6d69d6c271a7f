"""``load_task`` sources beyond local JSONL/npz and tfds: Hugging Face datasets and image
folders, selected by ``source``:

* ``"hf"``: the task's hub id from :data:`llora_jax.data.hf.HUB`;
* ``"hf:<hub id or directory>[#<config>]"``: any dataset (``save_to_disk`` or parquet dir);
* ``"folder:<root>"``: ``<root>/<split>/<class>/*.jpg``.

(An image folder at ``<data dir>/vision/<task>/<split>/<class>/`` is found by
``source="local"`` / ``"auto"`` too.) Class names come from the source (``ClassLabel`` /
folder names). For a registered task they must have the registered number of classes;
when they name the same classes (ignoring case and ``_``) the registered names are kept,
otherwise the source's names are used, so the label ids and names always agree.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

from llora_jax.data import hf, image_folder, vision
from llora_jax.data.sources import DataError
from llora_jax.data.tasks import TEXT_LAYOUTS, TaskSpec, get_task, infer_text_spec

__all__ = ["is_external", "load_external", "folder_spec_rows"]


def is_external(source: str) -> bool:
    return source == "hf" or source.startswith(("hf:", "folder:"))


def _norm(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(n.lower().replace("_", " ").strip() for n in names)


def _vision_spec(name: str, names: Sequence[str], origin: str) -> TaskSpec:
    try:
        spec = get_task(name)
    except KeyError:
        return TaskSpec(
            name=name,
            kind="vision",
            label_names=tuple(n.replace("_", " ") for n in names),
            known=False,
            templates=(vision.PAPER_TEMPLATE,),
        )
    if len(names) != spec.num_classes:
        raise DataError(
            f"{origin}: {len(names)} classes, but task {name!r} has {spec.num_classes}; "
            "point the source at the right dataset"
        )
    if _norm(names) == _norm(spec.label_names):
        return spec
    return dataclasses.replace(spec, label_names=tuple(n.replace("_", " ") for n in names))


def folder_spec_rows(name: str, root: pathlib.Path, split: str, label_names=None):
    """(spec, rows) of one split of an image folder."""
    classes = tuple(label_names) if label_names is not None else image_folder.folder_classes(root)
    rows = image_folder.read_image_folder(root, split, classes)
    return _vision_spec(name, classes, str(root)), rows


def _text_spec(name: str, columns: Sequence[str], names, origin: str) -> TaskSpec:
    try:
        spec = get_task(name)
    except KeyError:
        layout = next((lay for lay in TEXT_LAYOUTS if all(f in columns for f in lay)), None)
        if layout is None:
            raise DataError(
                f"{origin}: no known text layout in columns {sorted(columns)}; expected one of "
                f"{[list(lay) for lay in TEXT_LAYOUTS]}"
            ) from None
        return infer_text_spec(
            name, layout, regression=names is None, label_names=names, num_classes=None
        )
    if names is not None and tuple(names) != spec.label_names:
        raise DataError(
            f"{origin}: ClassLabel names {list(names)} differ from task {name!r}'s "
            f"{list(spec.label_names)}"
        )
    return spec


def _hf_columns(path: str, config: str | None, split: str) -> tuple[list[str], bool]:
    import datasets  # optional dependency

    rows, _ = hf.open_split(path, config, split, fields=(), kind="text", label="label")
    feats = rows.ds.features
    return list(feats), any(isinstance(v, datasets.Image) for v in feats.values())


def load_external(name: str, split: str, source: str, label_names=None):
    """(spec, rows) of one split (our "train" or "test") from an hf or folder source."""
    if source.startswith("folder:"):
        root = pathlib.Path(source[len("folder:") :]).expanduser()
        return folder_spec_rows(name, root, split, label_names)
    if source == "hf":
        if name not in hf.HUB:
            raise DataError(
                f"no Hugging Face hub id is known for task {name!r} (known: {sorted(hf.HUB)}); "
                "use source='hf:<hub id or directory>[#<config>]'"
            )
        route = hf.HUB[name]
        path, config, hsplit, columns = route.path, route.config, route.splits[split], route.columns
    else:
        path, config = hf.parse_source(source)
        hsplit, columns = split, {}
    try:
        spec = get_task(name)
        kind = spec.kind
    except KeyError:
        spec = None
        cols, has_image = _hf_columns(path, config, hsplit)
        kind = "vision" if has_image else "text"
    fields = spec.text_fields if spec is not None else ()
    if spec is None and kind == "text":
        fields = next((lay for lay in TEXT_LAYOUTS if all(f in cols for f in lay)), ())
    rows, names = hf.open_split(
        path, config, hsplit, fields=fields, kind=kind, columns=columns or None
    )
    names = tuple(label_names) if label_names is not None else names
    if kind == "vision":
        if names is None:
            raise DataError(
                f"{rows.origin}: the label column is not a ClassLabel; give label_names"
            )
        return _vision_spec(name, names, rows.origin), rows
    return _text_spec(name, rows.ds.column_names, names, rows.origin), rows
