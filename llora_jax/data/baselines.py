"""Majority-class baselines and the "does this task learn?" flag.

A fine-tuned score means little next to nothing: CoLA's accuracy of 0.676 looks fine
until the majority class scores 0.686 on the same split. Every report puts each task's
baseline beside its single-task score and flags a task that does not beat it.

Baseline: predict, for every test example, the most frequent training label (the lowest
label on a tie); for a regression task, the mean training target. Scored with the task's
own metrics (``compute_metrics``). A constant prediction has no rank or linear correlation
with the targets; its Pearson / Spearman (NaN: zero variance) are reported as 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llora_jax.data.glue import as_spec
from llora_jax.data.metrics import compute_metrics

__all__ = ["DEFAULT_MARGIN", "majority_prediction", "majority_baseline", "learns", "learning_table"]

# "Learns" = beats the majority-class baseline by at least 2 points (issue 21).
DEFAULT_MARGIN = 0.02
_CORRELATIONS = ("pearson", "spearman", "matthews")


def majority_prediction(train_labels: Any, regression: bool = False) -> float | int:
    """The constant a majority-class predictor outputs: the most frequent label (lowest on a
    tie) or, for regression, the mean target."""
    labels = np.asarray(train_labels)
    if labels.size == 0:
        raise ValueError("majority_prediction: no training labels")
    if regression:
        return float(np.mean(labels.astype(np.float64)))
    if labels.dtype.kind not in "iub":
        raise ValueError(
            f"class labels must be integers, got dtype {labels.dtype} (regression task?)"
        )
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])  # np.unique sorts: argmax takes the lowest on a tie


def majority_baseline(task: Any, train_labels: Any, test_labels: Any) -> dict[str, float]:
    """The task's metrics (name, TaskSpec or TaskData) of the majority-class predictor on
    ``test_labels`` (e.g. {"accuracy": 0.686, "matthews": 0.0} for CoLA)."""
    spec = as_spec(task)
    const = majority_prediction(train_labels, spec.is_regression)
    test = np.asarray(test_labels)
    out = compute_metrics(spec, np.full(len(test), const), test)
    for name in _CORRELATIONS:
        if name in out and math.isnan(out[name]):
            out[name] = 0.0
    return {k: v for k, v in out.items() if k not in ("num_examples", "num_invalid")}


def learns(score: float, baseline: float, margin: float = DEFAULT_MARGIN) -> bool:
    """True when ``score`` beats ``baseline`` by at least ``margin`` (same metric, same split);
    a NaN score never learns."""
    return bool(np.isfinite(score) and score >= baseline + margin - 1e-12)


def learning_table(
    scores: dict[str, float], baselines: dict[str, float], margin: float = DEFAULT_MARGIN
) -> dict[str, dict[str, Any]]:
    """{task: {"score", "baseline", "margin_over_baseline", "learns"}} for every task of
    ``scores`` (each must have a baseline)."""
    missing = sorted(set(scores) - set(baselines))
    if missing:
        raise ValueError(f"no majority-class baseline for tasks {missing}")
    return {
        t: {
            "score": float(s),
            "baseline": float(baselines[t]),
            "margin_over_baseline": float(s) - float(baselines[t]),
            "learns": learns(s, baselines[t], margin),
        }
        for t, s in scores.items()
    }
