"""Local text tasks: ``<dir>/text/<task>/{train,test}.jsonl`` and an optional ``info.json``.

``info.json`` (all keys optional)::

    {"label_names": ["world", "sports", ...],     # index = label id
     "descriptions": ["a news story about world politics", ...],  # one per class
     "metric": "accuracy",                          # or matthews / f1 / pearson / spearman
     "fields": ["sentence"]}                         # text fields in encoder order

With ``label_names`` the classes are exactly those (a label outside them is an error; a
class may be absent from train). Without it the classes are inferred from train.jsonl,
strictly: integer labels that are exactly ``0..K-1`` with every class present (in train,
or in test for a folder that only has test), or float
labels (a regression task); anything else is an error naming the file, the line and the
fix. Every reader error is a :class:`DataError` ``"<file>:<line>: <what>; <fix>"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from llora_jax.data.sources import ArrayRows, DataError
from llora_jax.data.tasks import TEXT_LAYOUTS, TaskSpec, infer_text_spec

__all__ = ["TaskInfo", "task_dir", "split_path", "read_info", "infer_spec", "read_split"]

INFO_FILE = "info.json"
METRICS = ("accuracy", "matthews", "f1", "pearson", "spearman")
_LABEL_FIX = "add info.json with label_names (index = label id) to name the classes"


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """The validated content of a task folder's ``info.json``."""

    path: pathlib.Path
    label_names: tuple[str, ...] | None = None
    descriptions: tuple[str, ...] = ()
    metric: str | None = None
    fields: tuple[str, ...] | None = None


def task_dir(root: pathlib.Path | None, name: str) -> pathlib.Path | None:
    """``<root>/text/<name>`` when it exists."""
    if root is None:
        return None
    d = root / "text" / name
    return d if d.is_dir() else None


def split_path(root: pathlib.Path | None, name: str, split: str) -> pathlib.Path | None:
    d = task_dir(root, name)
    p = None if d is None else d / f"{split}.jsonl"
    return p if p is not None and p.is_file() else None


def _strings(path: pathlib.Path, key: str, value: Any, n: int | None = None) -> tuple[str, ...]:
    ok = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
    if not ok or not value:
        raise DataError(f"{path}: {key!r} must be a non-empty list of non-empty strings")
    if n is not None and len(value) != n:
        raise DataError(f"{path}: {key!r} has {len(value)} entries for {n} label_names")
    return tuple(value)


def read_info(directory: pathlib.Path | None) -> TaskInfo | None:
    """The task folder's ``info.json``, validated, or None when there is none."""
    path = None if directory is None else directory / INFO_FILE
    if path is None or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a UTF-8 JSON file ({e}); fix or delete it") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    names = raw.get("label_names")
    if names is not None:
        names = _strings(path, "label_names", names)
        if len(set(names)) != len(names):
            raise DataError(f"{path}: label_names has duplicates {list(names)}")
    descriptions = raw.get("descriptions")
    if descriptions is not None:
        if names is None:
            raise DataError(f"{path}: 'descriptions' needs 'label_names' (one per class)")
        descriptions = _strings(path, "descriptions", descriptions, len(names))
    metric = raw.get("metric")
    if metric is not None and metric not in METRICS:
        raise DataError(f"{path}: metric {metric!r} is not one of {list(METRICS)}")
    if metric == "f1" and (names is None or len(names) != 2):
        raise DataError(f"{path}: metric 'f1' is binary F1: it needs exactly 2 label_names")
    fields = raw.get("fields")
    if fields is not None:
        fields = _strings(path, "fields", fields)
        if len(fields) > 2:
            raise DataError(f"{path}: 'fields' has {len(fields)} entries; at most 2 (a pair)")
    return TaskInfo(path, names, descriptions or (), metric, fields)


def iter_rows(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; errors name the file and line."""
    seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: byte {raw[e.start]:#04x} at column {e.start + 1} is not "
                    "UTF-8; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            seen = True
            yield lineno, row
    if not seen:
        raise DataError(f"{path}: the file is empty; write one JSON object per line, or delete it")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(path: pathlib.Path, lineno: int, row: dict) -> int | float:
    if "label" not in row:
        raise DataError(f"{path}:{lineno}: missing field 'label'")
    lab = row["label"]
    if isinstance(lab, str):
        raise DataError(
            f"{path}:{lineno}: label {lab!r} is a string; write the number without quotes "
            "(class labels are integer ids, scores are floats)"
        )
    if not (_is_int(lab) or isinstance(lab, float)) or not math.isfinite(lab):
        raise DataError(f"{path}:{lineno}: label {lab!r} is not a finite number")
    return lab


def _layout(path: pathlib.Path, lineno: int, row: dict, info: TaskInfo | None) -> tuple[str, ...]:
    if info is not None and info.fields is not None:
        return info.fields
    layout = next((lay for lay in TEXT_LAYOUTS if all(f in row for f in lay)), None)
    if layout is None:
        raise DataError(
            f"{path}:{lineno}: no known field layout in {sorted(row)}; expected one of "
            f"{[list(lay) for lay in TEXT_LAYOUTS]} plus 'label', or list the text fields "
            "in info.json 'fields'"
        )
    return layout


def _check_classes(path: pathlib.Path, labels: dict[int | float, int]) -> int:
    """K for integer labels that are exactly 0..K-1, all present (``labels``: id -> line)."""
    k = max(labels) + 1
    missing = sorted(set(range(k)) - set(labels))
    if min(labels) < 0 or missing:
        worst = min(labels) if min(labels) < 0 else max(labels)
        raise DataError(
            f"{path}:{labels[worst]}: label {worst}: the label ids {sorted(labels)} are not "
            f"exactly 0..{len(labels) - 1} with every class present in train (missing "
            f"{missing[:10]}); fix the mistyped labels, or {_LABEL_FIX}"
        )
    return k


def infer_spec(root: pathlib.Path, name: str, label_names: Sequence[str] | None = None) -> TaskSpec:
    """Spec of an unregistered local text task from ``info.json`` and train.jsonl."""
    directory = root / "text" / name
    info = read_info(directory)
    names = info.label_names if info is not None else None
    if label_names is not None:
        if names is not None and tuple(label_names) != names:
            raise ValueError(
                f"task {name!r}: label_names {list(label_names)} differ from {info.path}'s "
                f"{list(names)}; drop one of them"
            )
        names = tuple(label_names)
    # Classes are inferred from train (test only for a test-only folder, e.g. evaluation).
    train = directory / "train.jsonl"
    source = train if train.is_file() else directory / "test.jsonl"
    if not source.is_file():
        raise DataError(f"{directory}: neither train.jsonl nor test.jsonl; add them")
    layout, first_int, first_float = None, None, None
    labels: dict[int | float, int] = {}
    for lineno, row in iter_rows(source):
        layout = layout or _layout(source, lineno, row, info)
        lab = _number(source, lineno, row)
        if _is_int(lab):
            first_int = first_int or (lineno, lab)
        else:
            first_float = first_float or (lineno, lab)
        labels.setdefault(lab, lineno)
    if names is None and first_int and first_float:
        (li, vi), (lf, vf) = first_int, first_float
        raise DataError(
            f"{source}:{max(li, lf)}: mixed label types: line {li} has integer {vi}, line {lf} "
            f"has float {vf}; write every label as an integer class id (classification) or "
            "every one as a float score (regression, e.g. 3.0)"
        )
    metric = info.metric if info is not None else None
    descriptions = info.descriptions if info is not None else ()
    if names is None and first_float:
        if metric in ("accuracy", "matthews", "f1"):
            raise DataError(f"{info.path}: metric {metric!r} needs classes; this task has scores")
        return infer_text_spec(name, layout, regression=True, metric=metric)
    k = len(names) if names is not None else _check_classes(source, labels)
    return infer_text_spec(
        name,
        layout,
        regression=False,
        label_names=names,
        num_classes=k,
        descriptions=descriptions,
        metric=metric,
    )


def _label(path: pathlib.Path, lineno: int, row: dict, spec: TaskSpec) -> int | float:
    lab = _number(path, lineno, row)
    if spec.is_regression:
        lo, hi = spec.label_range or (-math.inf, math.inf)
        if not lo <= lab <= hi:
            raise DataError(
                f"{path}:{lineno}: label {lab!r} is not a score in [{lo}, {hi}] (task {spec.name!r})"
            )
        return float(lab)
    k = spec.num_classes
    if not _is_int(lab):
        raise DataError(
            f"{path}:{lineno}: label {lab!r} is a float; task {spec.name!r} has classes: write "
            f"an integer id 0..{k - 1}"
        )
    if not 0 <= lab < k:
        fix = _LABEL_FIX if not spec.known else "fix the row"
        raise DataError(
            f"{path}:{lineno}: label {lab} outside 0..{k - 1} (task {spec.name!r}, labels "
            f"{list(spec.label_names)}); {fix}"
        )
    return lab


def read_split(path: pathlib.Path, spec: TaskSpec) -> ArrayRows:
    """Read and validate one JSONL split against ``spec`` (fields, text, label type/range)."""
    fields = spec.text_fields
    texts: dict[str, list[str]] = {f: [] for f in fields}
    labels: list[float] = []
    idx: list[int] = []
    for lineno, row in iter_rows(path):
        for f in fields:
            if f not in row:
                raise DataError(
                    f"{path}:{lineno}: missing field {f!r} (task {spec.name!r} needs "
                    f"{list(fields)} + 'label')"
                )
            if not isinstance(row[f], str):
                raise DataError(f"{path}:{lineno}: field {f!r} must be a string, got {row[f]!r}")
            if not row[f].strip():
                raise DataError(
                    f"{path}:{lineno}: field {f!r} is empty; drop the row or fill in the text"
                )
            texts[f].append(row[f])
        labels.append(_label(path, lineno, row, spec))
        idx.append(row["idx"] if _is_int(row.get("idx")) else len(idx))
    cols: dict[str, np.ndarray] = {"idx": np.asarray(idx, np.int64)}
    for f in fields:
        cols[f] = np.asarray(texts[f], dtype=object)
    cols["label"] = np.asarray(labels, np.float32 if spec.is_regression else np.int64)
    return ArrayRows(cols, str(path))


def apply_info(spec: TaskSpec, root: pathlib.Path | None) -> TaskSpec:
    """A registered text spec with its local ``info.json`` applied (descriptions), after
    checking that the info's label names and fields agree with the registry."""
    info = read_info(task_dir(root, spec.name))
    if info is None:
        return spec
    if info.label_names is not None and info.label_names != spec.label_names:
        raise DataError(
            f"{info.path}: label_names {list(info.label_names)} differ from registered task "
            f"{spec.name!r}'s {list(spec.label_names)}; fix info.json (index = label id)"
        )
    if info.fields is not None and set(info.fields) != set(spec.text_fields):
        raise DataError(
            f"{info.path}: fields {list(info.fields)} differ from registered task "
            f"{spec.name!r}'s {list(spec.text_fields)}"
        )
    return dataclasses.replace(spec, descriptions=info.descriptions or spec.descriptions)
