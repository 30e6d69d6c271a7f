"""Does each task learn? Its majority-class baseline beside its single-task score.

A study records ``results["baseline"]``: per task, the task's metrics of a constant
majority-class (regression: mean-target) predictor on the same test rows the models are
scored on (``data.baselines``). Here each method's mean single-task score (primary metric)
is set beside it, and a task that does not beat it by ``DEFAULT_MARGIN`` (2 points) is
flagged: its merged scores mean little, and capacity summaries leave it out.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from llora_jax.data.baselines import DEFAULT_MARGIN, learning_table

__all__ = ["summarize_learning", "render_learning", "not_learning"]


def summarize_learning(results: Mapping) -> dict:
    """{"baseline": {task: value}, "methods": {method: learning_table(...)}} on the primary
    metric, or {} when the results carry no baselines."""
    base = results.get("baseline") or {}
    primary = results.get("primary_metric") or {}
    if not base:
        return {}
    baselines = {t: float(m.get(primary.get(t, "accuracy"), float("nan"))) for t, m in base.items()}
    methods = {}
    for method, by_task in (results.get("single") or {}).items():
        scores = {}
        for task, by_seed in by_task.items():
            metric = primary.get(task, "accuracy")
            values = [e["test"][metric] for e in by_seed.values() if metric in e.get("test", {})]
            if values and task in baselines:
                scores[task] = statistics.fmean(values)
        if scores:
            methods[method] = learning_table(scores, baselines)
    return {"baseline": baselines, "margin": DEFAULT_MARGIN, "methods": methods}


def not_learning(learning: Mapping, method: str) -> list[str]:
    """Tasks whose single-task score under ``method`` does not beat the baseline."""
    table = (learning.get("methods") or {}).get(method) or {}
    return sorted(t for t, row in table.items() if not row["learns"])


def render_learning(learning: Mapping, md_table) -> list[str]:
    """The report section: one row per task, baseline then each method's score (✗ = does
    not beat the baseline by the margin)."""
    if not learning:
        return []
    methods = list(learning["methods"])
    tasks = list(learning["baseline"])
    rows = []
    for t in tasks:
        row = [t, f"{learning['baseline'][t]:.3f}"]
        for m in methods:
            cell = learning["methods"][m].get(t)
            row.append(
                "—" if cell is None else f"{cell['score']:.3f}" + ("" if cell["learns"] else " ✗")
            )
        rows.append(row)
    margin = round(100 * learning["margin"])
    return [
        "",
        "## Majority-class baselines",
        "",
        "Each task's test score of a constant majority-class predictor (regression: the mean "
        "training target; correlations 0) beside the mean single-task test score, primary "
        f"metric. ✗: does not beat the baseline by {margin} points (the task did not learn).",
        "",
        md_table(["task", "majority baseline", *methods], rows),
    ]
