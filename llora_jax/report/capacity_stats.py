"""The capacity study's numbers, from its collected blocks (``study.blocks.run_blocks``).

A block is one (arm, rank); within it, per seed and per subset size n:

* merged scores of every fusion (and the multi-task baseline), each averaged over the
  subsets of size n: absolute test score, normalized (merged ÷ single), and
  baseline-normalized ((merged − majority) ÷ (single − majority), over learning tasks
  only: for the others the denominator is about 0 or negative); normalized also over
  learning tasks only (a task learns when its single score beats its majority-class
  baseline by 2 points: ``report.learning``);
* the mean off-diagonal cosine of the subset's task vectors (ΔW; adapter space too where it
  is meaningful) and core overlap (Jaccard at the block's p), from the block's matrices.

Cells are then mean ± sample std over seeds (``report.stat``). Per-subset values are kept
for paired comparisons (``paired_gap``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from llora_jax.interference.similarity import mean_off_diagonal
from llora_jax.report.learning import not_learning, summarize_learning
from llora_jax.report.summary import stat

__all__ = ["block_rows", "capacity_table", "largest_n_above", "paired_gap", "MEASURES"]

MEASURES = ("test", "normalized", "baseline_normalized", "normalized_learning")


def _per_task(r: Mapping, method: str, seed: str, entry: Mapping, skip: set) -> dict:
    """One merged (or multi-task) entry's scores, averaged over its tasks."""
    primary = r.get("primary_metric") or {}
    test, norm, above, norm_l = [], [], [], []
    for task, score in entry["test"].items():
        metric = primary.get(task, "accuracy")
        single = r["single"][method][task][seed]["test"][metric]
        base = (r.get("baseline") or {}).get(task, {}).get(metric)
        test.append(score)
        norm.append(score / max(single, 1e-12))
        if base is not None and task not in skip and single - base > 1e-12:
            above.append((score - base) / (single - base))
        if task not in skip:
            norm_l.append(score / max(single, 1e-12))
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {
        "test": mean(test),
        "normalized": mean(norm),
        "baseline_normalized": mean(above),
        "normalized_learning": mean(norm_l),
    }


def _entries(r: Mapping, method: str) -> dict[str, dict]:
    """{line name: {subset key: {seed: entry}}}: every fusion, then multitask_<budget>."""
    out = dict((r.get("fusion") or {}).get(method) or {})
    for m, by_budget in (r.get("multitask") or {}).items():
        for budget, subs in by_budget.items():
            name = f"multitask_{budget}" + ("" if m == method else f"_{m}")
            out[name] = subs
    for variant, subs in ((r.get("frozen_tuning") or {}).get(method) or {}).items():
        out[f"pipeline+{variant}"] = subs
    return out


def _sub_mean(matrix, tasks: list, subset: str) -> float:
    ix = [tasks.index(t) for t in subset.split("+")]
    return mean_off_diagonal(np.asarray(matrix)[np.ix_(ix, ix)])


def block_rows(r: Mapping, method: str) -> dict:
    """{"lines": {line: {n: {seed: {measure: value}}}}, "per_subset": {line: {subset:
    {seed: {measure: value}}}}, "cosine"/"cosine_adapter"/"overlap": {n: {seed: value}}}."""
    learning = summarize_learning(r)
    skip = set(not_learning(learning, method)) if learning else set()
    lines, per_subset = {}, {}
    subsets_by_seed: dict[str, set] = {}
    for line, subs in _entries(r, method).items():
        for key, by_seed in subs.items():
            n = len(key.split("+"))
            for seed, entry in by_seed.items():
                row = _per_task(r, method, seed, entry, skip)
                per_subset.setdefault(line, {}).setdefault(key, {})[seed] = row
                lines.setdefault(line, {}).setdefault(n, {}).setdefault(seed, []).append(row)
                if not line.startswith(("multitask", "pipeline+")):
                    subsets_by_seed.setdefault(seed, set()).add(key)
    for line in lines:
        for by_seed in lines[line].values():
            for seed, rows in by_seed.items():
                by_seed[seed] = {m: _mean([x[m] for x in rows]) for m in MEASURES}
    out = {"lines": lines, "per_subset": per_subset, "not_learning": sorted(skip)}
    for name, section, key in (
        ("cosine", "cosine", "delta_w_matrix"),
        ("cosine_adapter", "cosine", "matrix"),
        ("overlap", "isolation_overlap", "matrix"),
    ):
        table: dict = {}
        for seed, e in ((r.get(section) or {}).get(method) or {}).items():
            if e.get(key) is None or (
                name == "cosine_adapter" and r.get("merge_space") == "delta_w"
            ):
                continue
            by_n: dict = {}
            for sub in subsets_by_seed.get(seed, ()):
                by_n.setdefault(len(sub.split("+")), []).append(_sub_mean(e[key], e["tasks"], sub))
            for n, vals in by_n.items():
                table.setdefault(n, {})[seed] = float(np.mean(vals))
        out[name] = table
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def capacity_table(collected: Mapping) -> dict:
    """{block: {"labels", "lines": {line: {n: {measure: stat}}}, "cosine"...: {n: stat},
    "not_learning"}}: seeds aggregated."""
    out = {}
    for name, block in collected["blocks"].items():
        rows = block_rows(block["results"], block["labels"]["method"])
        lines = {
            line: {
                n: {m: stat(v[m] for v in by_seed.values()) for m in MEASURES}
                for n, by_seed in sorted(by_n.items())
            }
            for line, by_n in rows["lines"].items()
        }
        out[name] = {
            "labels": dict(block["labels"]),
            "lines": lines,
            "not_learning": rows["not_learning"],
            **{
                k: {n: stat(v.values()) for n, v in sorted(rows[k].items())}
                for k in ("cosine", "cosine_adapter", "overlap")
            },
        }
    return out


def largest_n_above(by_n: Mapping, measure: str = "normalized", level: float = 0.9) -> int | None:
    """The largest n up to which the mean ``measure`` stays >= ``level`` at every n (None
    when it is below already at the smallest n)."""
    best = None
    for n in sorted(by_n):
        s = by_n[n].get(measure)
        if s is None or s["mean"] < level:
            break
        best = n
    return best


def paired_gap(
    a: Mapping, b: Mapping, measure: str = "test", n_boot: int = 2000, seed: int = 0
) -> dict:
    """Mean of a − b over (subset, seed) pairs both have, per subset size n, with a 95%
    bootstrap interval over the pairs (None with fewer than 2 pairs): {n: {"mean", "low",
    "high", "pairs"}}. ``a``, ``b``: ``block_rows(...)["per_subset"][line]``."""
    rng = np.random.default_rng(seed)
    by_n: dict[int, list] = {}
    for key, by_seed in a.items():
        for sd, row in by_seed.items():
            other = (b.get(key) or {}).get(sd)
            if other is not None and row[measure] is not None and other[measure] is not None:
                by_n.setdefault(len(key.split("+")), []).append(row[measure] - other[measure])
    out = {}
    for n, d in sorted(by_n.items()):
        d = np.asarray(d)
        low = high = None
        if len(d) >= 2:
            boots = rng.choice(d, size=(n_boot, len(d)), replace=True).mean(axis=1)
            low, high = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
        out[n] = {"mean": float(d.mean()), "low": low, "high": high, "pairs": len(d)}
    return out


def verdict(gap_small: Mapping, gap_large: Mapping | None) -> str:
    """The shared-A0 prediction's verdict from the paired gaps G(n) = shared − per-task at
    the smallest rank (and the largest): holds / refuted / inconclusive (docs/notes/
    capacity.md). Intervals need at least 2 pairs at n_max."""
    if not gap_small:
        return "not measured"
    n_max = max(gap_small)
    g = gap_small[n_max]
    if g["low"] is None:
        return "inconclusive (one (subset, seed) pair at the largest n: no interval)"
    ns = sorted(gap_small)
    slope = np.polyfit(np.log(ns), [gap_small[n]["mean"] for n in ns], 1)[0] if len(ns) > 1 else 0
    larger = gap_large.get(n_max) if gap_large else None
    if g["high"] < 0 and slope < 0 and larger is not None and abs(g["mean"]) > abs(larger["mean"]):
        return "holds"
    if g["low"] >= 0:
        return "refuted"
    return "inconclusive"
