"""Task metrics in numpy: accuracy, Matthews correlation, binary F1, Pearson, Spearman.

Predictions may be class ids / scores, or generated strings (T5). Invalid predictions
(a string that is not a label word, an STS-B string that is not a number) are counted
in ``num_invalid`` and handled so that they can never help:

* classification: an invalid prediction is wrong for accuracy, and for F1 / Matthews it
  is replaced by a wrong class (``(label + 1) % k``, i.e. the other class when binary);
* regression: accuracy counts it wrong; Pearson / Spearman are computed over the valid
  predictions only (NaN when fewer than 2) - read them together with ``num_invalid``.

Regression accuracy: for strings, exact match with the target string
(``"{:.1f}"`` of the score rounded to 0.2); for numbers, equality after rounding both to
the 0.2 grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llora_jax.data.glue import as_spec, format_score, parse_predictions, stsb_round

__all__ = [
    "accuracy",
    "matthews_corrcoef",
    "f1_binary",
    "pearson",
    "spearman",
    "rankdata",
    "compute_metrics",
]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float(np.mean(preds == labels)) if labels.size else float("nan")


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K); 0.0 when undefined, as sklearn."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes, inv = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    y, p = inv[:n], inv[n:]
    conf = np.zeros((k, k), np.float64)
    np.add.at(conf, (y, p), 1.0)
    t, q = conf.sum(axis=1), conf.sum(axis=0)  # true / predicted counts per class
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - t @ q) / denom) if denom > 0 else 0.0


def f1_binary(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there is no positive prediction nor label."""
    preds, labels = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = np.sum(preds & labels)
    denom = 2 * tp + np.sum(preds & ~labels) + np.sum(~preds & labels)
    return float(2 * tp / denom) if denom > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant.

    A constant side leaves the correlation undefined (scipy: NaN). A model that predicts one
    value for every pair says nothing about similarity, so it scores 0: a merge that collapses
    to one output then ranks below any informative one instead of breaking means and
    validation-based selection. Fewer than 2 points: NaN.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(x.size, np.float64)
    ranks[order] = avg[np.cumsum(new) - 1]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def _is_strings(preds: Any) -> bool:
    if isinstance(preds, np.ndarray):
        return preds.dtype.kind in "USO"
    return len(preds) > 0 and isinstance(preds[0], str)


def compute_metrics(
    task: Any,
    preds: Sequence | np.ndarray,
    labels: Sequence | np.ndarray,
    *,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """The task's metrics (``spec.metrics``) plus ``num_examples`` and ``num_invalid``.

    ``task``: a name, TaskSpec or TaskData. ``preds``: class ids, scores, or generated
    strings. ``mask`` (optional, bool or 0/1 weights) drops padded examples first.
    """
    spec = as_spec(task)
    labels = np.asarray(labels)
    strings = _is_strings(preds)
    preds = np.asarray(list(preds) if strings else preds, dtype=object if strings else None)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        preds, labels = preds[keep], labels[keep]

    out: dict[str, float] = {"num_examples": float(len(labels))}
    if spec.is_regression:
        if strings:
            values, invalid = parse_predictions(spec, preds)
            targets = [format_score(s) for s in stsb_round(labels)]
            correct = np.array([str(p).strip() == t for p, t in zip(preds, targets)], bool)
        else:
            values = np.asarray(preds, np.float64)
            invalid = ~np.isfinite(values)
            correct = ~invalid & (stsb_round(np.where(invalid, 0, values)) == stsb_round(labels))
        valid = ~invalid
        results = {
            "accuracy": float(np.mean(correct)) if labels.size else float("nan"),
            "pearson": pearson(values[valid], labels[valid]),
            "spearman": spearman(values[valid], labels[valid]),
        }
    else:
        k = spec.num_classes
        if strings:
            ids, invalid = parse_predictions(spec, preds)
        else:
            ids = np.asarray(preds).astype(np.int64)
            invalid = (ids < 0) | (ids >= k) if k else ids < 0
        labels = labels.astype(np.int64)
        # An invalid prediction becomes a wrong class, so it cannot raise F1 or MCC.
        forced = np.where(invalid, (labels + 1) % max(k or 2, 2), ids)
        results = {
            "accuracy": accuracy(forced, labels),
            "matthews": matthews_corrcoef(forced, labels),
            "f1": f1_binary(forced, labels),
        }
    out.update({m: results[m] for m in spec.metrics})
    out["num_invalid"] = float(np.sum(invalid))
    return out
