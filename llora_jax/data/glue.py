"""GLUE formats: text-to-text for T5 and sentence(-pair) for encoders.

T5 inputs follow T5's GLUE preprocessing: ``"{task} {field}: {text} ..."`` with the fields
in sorted-name order (``"mnli hypothesis: {h} premise: {p}"``), targets are the label
words of :class:`~llora_jax.data.tasks.TaskSpec` (index = tfds label id). STS-B targets are
the score rounded to the nearest 0.2 (``round(5 * y) / 5`` in float32, round half to
even, as ``tf.round`` in T5's preprocessing) written as ``"{:.1f}"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llora_jax.data.tasks import TaskSpec, get_task

__all__ = [
    "as_spec",
    "stsb_round",
    "format_score",
    "t5_format",
    "t5_targets",
    "encoder_format",
    "parse_predictions",
]


def as_spec(task: Any) -> TaskSpec:
    """Accept a task name, a :class:`TaskSpec`, or anything with a ``.spec`` (TaskData)."""
    if isinstance(task, TaskSpec):
        return task
    if hasattr(task, "spec") and isinstance(task.spec, TaskSpec):
        return task.spec
    if isinstance(task, str):
        return get_task(task)
    raise TypeError(f"expected a task name, TaskSpec or TaskData, got {type(task).__name__}")


def stsb_round(scores: np.ndarray | Sequence[float]) -> np.ndarray:
    """Round similarity scores to the nearest 0.2 (T5's STS-B target grid).

    In float32 like T5 on tfds' float32 labels: ``1.7 -> 8.5 -> 8 -> 1.6`` there (half to
    even), whereas float64 arithmetic would give 1.8.
    """
    x = np.asarray(scores, np.float32)
    return np.round(x * np.float32(5.0)) / np.float32(5.0)


def format_score(score: float) -> str:
    """The T5 string of one (already rounded) STS-B score, e.g. ``3.8 -> "3.8"``."""
    return f"{float(score):.1f}"


def _columns(examples: Mapping[str, Any], fields: Sequence[str], task: str) -> list[Sequence]:
    missing = [f for f in fields if f not in examples]
    if missing:
        raise KeyError(f"task {task!r} needs fields {list(fields)}; missing {missing}")
    return [examples[f] for f in fields]


def t5_targets(task: Any, labels: np.ndarray | Sequence) -> list[str]:
    """Label ids (or scores) -> T5 target strings."""
    spec = as_spec(task)
    labels = np.asarray(labels)
    if spec.is_regression:
        return [format_score(s) for s in stsb_round(labels)]
    words = spec.label_names
    bad = (labels < 0) | (labels >= len(words))
    if np.any(bad):
        raise ValueError(
            f"task {spec.name!r}: label {labels[bad][0]} outside 0..{len(words) - 1} "
            f"(label words {list(words)})"
        )
    return [words[int(i)] for i in labels]


def t5_format(task: Any, examples: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Examples (columns with tfds GLUE field names and ``label``) -> (inputs, targets)."""
    spec = as_spec(task)
    if spec.kind != "text":
        raise ValueError(f"t5_format needs a text task, {spec.name!r} is {spec.kind}")
    cols = _columns(examples, spec.prompt_fields, spec.name)
    inputs = [
        " ".join([spec.prompt_prefix] + [f"{f}: {v}" for f, v in zip(spec.prompt_fields, vals)])
        for vals in zip(*cols)
    ]
    targets = t5_targets(spec, examples["label"]) if "label" in examples else []
    return inputs, targets


def encoder_format(task: Any, examples: Mapping[str, Any]) -> dict[str, Any]:
    """Examples -> ``{"text_a": list[str], "text_b": list[str] | None, "label": array}``.

    ``label`` is int64 class ids, or float32 scores for regression (unrounded).
    """
    spec = as_spec(task)
    if spec.kind != "text":
        raise ValueError(f"encoder_format needs a text task, {spec.name!r} is {spec.kind}")
    cols = _columns(examples, spec.text_fields, spec.name)
    out: dict[str, Any] = {
        "text_a": [str(v) for v in cols[0]],
        "text_b": [str(v) for v in cols[1]] if len(cols) > 1 else None,
    }
    if "label" in examples:
        dtype = np.float32 if spec.is_regression else np.int64
        out["label"] = np.asarray(examples["label"], dtype)
    return out


def parse_predictions(task: Any, strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Generated strings -> (values, invalid mask).

    Classification: the index of the label word (surrounding whitespace ignored, case kept),
    ``-1`` when the string is not a label word. Regression: the float value, ``nan`` when
    it does not parse as a finite number.
    """
    spec = as_spec(task)
    strings = [str(s).strip() for s in strings]
    if spec.is_regression:
        vals = np.full(len(strings), np.nan)
        for i, s in enumerate(strings):
            try:
                vals[i] = float(s)
            except ValueError:
                pass
        vals[~np.isfinite(vals)] = np.nan
        return vals, np.isnan(vals)
    index = {w: i for i, w in enumerate(spec.label_names)}
    ids = np.array([index.get(s, -1) for s in strings], np.int64)
    return ids, ids < 0
