"""Study report: a study's ``results.json`` -> ``report.md``, PNG figures, ``results_summary.json``.

``summarize`` is the only function that reads the numbers of a results dict for the tables; the
markdown is rendered from its output, so every number in ``report.md`` is also in
``results_summary.json`` (which the README can quote). Statistics over seeds are mean and sample
standard deviation (ddof=1; omitted for one seed). Where entries are averaged per seed first (tasks
of a row, subsets of one size, pairs), a seed counts only when it has every entry, so that all
seeds average the same things. Any section may be missing; the report says which.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llora_jax.report.figures import make_figures
from llora_jax.report.learning import summarize_learning
from llora_jax.report.markdown import render

__all__ = [
    "SECTIONS",
    "load_results",
    "stat",
    "summarize",
    "render_markdown",
    "write_report",
]

SECTIONS = ("single", "fusion", "cosine", "isolation_overlap", "disentanglement")
HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
INCONCLUSIVE = "inconclusive"  # the difference is within the seed spread
_HEADER_KEYS = ("study", "backbone", "device", "date", "command", "versions", "timings")


def load_results(path: str | os.PathLike) -> dict:
    """Read a study's results.json; raises a clear error when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"results file {p} does not exist; run the study first or pass the path of its "
            "results.json"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); re-run the study to rewrite it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a JSON object at top level, got {type(data).__name__}")
    return data


def stat(values: Iterable[float | None]) -> dict | None:
    """{"mean", "std" (sample, None for one value), "n", "values"}; None when there are no values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals), "values": vals}


# ----------------------------------------------------------------------------- input access


def _mapping(obj: Any, where: str) -> Mapping:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ValueError(f"results.json: {where} must be an object, got {type(obj).__name__}")
    return obj


def _seed_items(by_seed: Any, where: str) -> list[tuple[str, Mapping]]:
    """(seed, entry) pairs in numeric seed order."""
    items = _mapping(by_seed, where).items()

    def key(kv):
        return (0, int(kv[0]), "") if str(kv[0]).lstrip("-").isdigit() else (1, 0, str(kv[0]))

    return [(str(s), _mapping(e, f"{where}.{s}")) for s, e in sorted(items, key=key)]


def _ordered(preferred: Iterable[str], found: Iterable[str]) -> list[str]:
    """Names in `found`, in the order of `preferred` first, then in order of appearance."""
    found = list(dict.fromkeys(found))
    return [p for p in preferred if p in found] + [f for f in found if f not in preferred]


def _primary(results: Mapping, task: str, metrics: Mapping, where: str) -> float:
    name = _mapping(results.get("primary_metric"), "primary_metric").get(task)
    if name is None:
        if len(metrics) == 1:
            return next(iter(metrics.values()))
        if "accuracy" in metrics:
            return metrics["accuracy"]
        raise ValueError(
            f"results.json: no primary_metric for task '{task}' and {where} has metrics "
            f'{sorted(metrics)}; add "primary_metric": {{"{task}": <one of them>}}'
        )
    if name not in metrics:
        raise ValueError(
            f"results.json: {where} lacks primary metric '{name}' of task '{task}' "
            f"(has {sorted(metrics)})"
        )
    return metrics[name]


def _offdiag_mean(matrix: Any) -> float | None:
    if not matrix:
        return None
    n = len(matrix)
    vals = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    return statistics.fmean(vals) if vals else None


def _value(entry: Mapping, key: str, per_task_key: str) -> float | None:
    """entry[key], or the mean of entry[per_task_key] when only the per-task scores are there."""
    if entry.get(key) is not None:
        return entry[key]
    per_task = entry.get(per_task_key)
    return statistics.fmean(per_task.values()) if per_task else None


def _seedwise(table: Mapping[str, Mapping[str, float | None]], keys: list[str]) -> dict | None:
    """Per seed, the mean over `keys` of table[key][seed] (seeds having every key); stat over seeds."""
    if not keys:
        return None
    seed_sets = [{s for s, v in table.get(k, {}).items() if v is not None} for k in keys]
    seeds = set.intersection(*seed_sets)
    seeds = sorted(seeds, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    return stat(statistics.fmean(table[k][s] for k in keys) for s in seeds)


# ----------------------------------------------------------------------------- summary


def _summarize_single(results: Mapping, methods: list[str], tasks: list[str]) -> dict:
    single = _mapping(results.get("single"), "single")
    out = {}
    for m in methods:
        if m not in single:
            continue
        by_task = _mapping(single[m], f"single.{m}")
        table = {}
        for t in tasks:
            where = f"single.{m}.{t}"
            table[t] = {
                s: _primary(
                    results, t, _mapping(e["test"], f"{where}.{s}.test"), f"{where}.{s}.test"
                )
                for s, e in _seed_items(by_task.get(t), where)
                if e.get("test")
            }
        out[m] = {
            "tasks": {t: stat(table[t].values()) for t in tasks},
            "average": _seedwise(table, tasks),
        }
    return out


def _fusion_tables(results: Mapping) -> dict:
    """{fusion: {method: {subset_key: {seed: entry}}}}, re-keyed from method-first to fusion-first."""
    fusion = _mapping(results.get("fusion"), "fusion")
    out: dict[str, dict] = {}
    for m, by_f in fusion.items():
        for f, by_subset in _mapping(by_f, f"fusion.{m}").items():
            subsets = _mapping(by_subset, f"fusion.{m}.{f}")
            out.setdefault(f, {})[m] = {
                k: dict(_seed_items(v, f"fusion.{m}.{f}.{k}")) for k, v in subsets.items()
            }
    return out


def _summarize_fusion(results: Mapping, methods: list[str]) -> tuple[dict, dict]:
    tables = _fusion_tables(results)
    sizes_all = [len(k.split("+")) for f in tables.values() for d in f.values() for k in d]
    n_full = max(sizes_all, default=0)
    out, best = {}, {}
    for f, by_method in tables.items():
        if not any(by_method.values()):
            continue  # a fusion name with no subsets at all: nothing to show
        sizes = sorted({len(k.split("+")) for d in by_method.values() for k in d})
        keys_full = sorted(
            k for d in by_method.values() for k in d if len(k.split("+")) == sizes[-1]
        )
        full_key = keys_full[0] if keys_full else None
        entry = {"sizes": sizes, "full_subset": full_key, "absolute": {}, "normalized": {}}
        entry["hparams_full"] = {}
        for m in _ordered(methods, by_method):
            subsets = by_method[m]
            for name, key, per_task in (
                ("absolute", "avg_test", "test"),
                ("normalized", "avg_normalized", "test_normalized"),
            ):
                table = {
                    k: {s: _value(e, key, per_task) for s, e in v.items()}
                    for k, v in subsets.items()
                }
                entry[name][m] = {
                    str(n): _seedwise(table, [k for k in subsets if len(k.split("+")) == n])
                    for n in sizes
                }
            if full_key in subsets:
                entry["hparams_full"][m] = {
                    s: e.get("hparams") for s, e in subsets[full_key].items()
                }
        out[f] = entry
    for m in methods:
        cands = []
        for f, entry in out.items():
            norm = entry["normalized"].get(m, {}).get(str(n_full))
            absolute = entry["absolute"].get(m, {}).get(str(n_full))
            score = norm or absolute
            if score is not None:
                cands.append((score["mean"], f, absolute, norm))
        if cands:
            _, f, absolute, norm = max(cands, key=lambda c: c[0])
            best[m] = {"fusion": f, "size": n_full, "avg_test": absolute, "avg_normalized": norm}
    return out, best


def _summarize_cosine(results: Mapping, methods: list[str]) -> tuple[dict, dict]:
    cosine = _mapping(results.get("cosine"), "cosine")
    out = {}
    for m in _ordered(methods, cosine):
        seeds = _seed_items(cosine[m], f"cosine.{m}")
        param = [e.get("mean_off_diagonal") for _, e in seeds]
        param = [
            p if p is not None else _offdiag_mean(e.get("matrix"))
            for p, (_, e) in zip(param, seeds)
        ]
        dw = [e.get("delta_w_mean_off_diagonal") for _, e in seeds]
        dw = [
            d if d is not None else _offdiag_mean(e.get("delta_w_matrix"))
            for d, (_, e) in zip(dw, seeds)
        ]
        out[m] = {"param": stat(param), "delta_w": stat(dw)}
    overlap = _mapping(results.get("isolation_overlap"), "isolation_overlap")
    iso = {}
    for m in _ordered(methods, overlap):
        seeds = _seed_items(overlap[m], f"isolation_overlap.{m}")
        iso[m] = {
            "p": seeds[0][1].get("p") if seeds else None,
            "mean_off_diagonal": stat(_offdiag_mean(e.get("matrix")) for _, e in seeds),
        }
    return out, iso


def _xi_table(results: Mapping, method: str) -> dict[str, dict[str, float | None]]:
    dis = _mapping(results.get("disentanglement"), "disentanglement")
    table = {}
    for pair, by_seed in _mapping(dis.get(method), f"disentanglement.{method}").items():
        table[pair] = {}
        for s, e in _seed_items(by_seed, f"disentanglement.{method}.{pair}"):
            v = e.get("mean_xi")
            if v is None and e.get("xi"):
                v = statistics.fmean(x for row in e["xi"] for x in row)
            table[pair][s] = v
    return table


def _summarize_disentanglement(results: Mapping, methods: list[str]) -> dict:
    dis = _mapping(results.get("disentanglement"), "disentanglement")
    out = {}
    for m in _ordered(methods, dis):
        table = _xi_table(results, m)
        out[m] = {
            "pairs": {p: stat(v.values()) for p, v in table.items()},
            "mean": _seedwise(table, list(table)),
        }
    return out


def _verdict(
    claim: str, base: str, lin: str, a: dict | None, b: dict | None, lower: bool, why: str
) -> dict:
    """Compare the means of the linearized (b) and baseline (a) methods."""
    v = {"claim": claim, "baseline": base, "linearized": lin, base: a, lin: b}
    if a is None or b is None:
        missing = " and ".join(m for m, x in ((base, a), (lin, b)) if x is None)
        return {**v, "verdict": NOT_MEASURED, "detail": f"no usable results for {missing}"}
    better = b["mean"] < a["mean"] if lower else b["mean"] > a["mean"]
    stds = [s["std"] for s in (a, b) if s["std"] is not None]
    diff = abs(b["mean"] - a["mean"])
    if stds and diff < max(stds):
        detail = f"; the difference ({diff:.4g}) is smaller than the seed std ({max(stds):.4g})"
        lean = "leans towards the claim" if better else "leans against the claim"
        return {**v, "verdict": INCONCLUSIVE, "detail": f"{why}{detail}, {lean}"}
    return {**v, "verdict": HOLDS if better else FAILS, "detail": why}


def _verdicts(results: Mapping, summary: dict, base: str, lin: str) -> dict:
    cos = summary["cosine"]
    out = {}
    for key, label in (("param", "cosine"), ("delta_w", "cosine_delta_w")):
        what = "flattened task vectors" if key == "param" else "ΔW = s·A·B products"
        a, b = (cos.get(m, {}).get(key) for m in (base, lin))
        claim = f"L-LoRA's ({lin}) mean off-diagonal cosine similarity ({what}) is lower than LoRA's ({base})"
        out[label] = _verdict(
            claim, base, lin, a, b, True, f"mean over seeds of the mean off-diagonal ({what})"
        )
    tables = _fusion_tables(results)
    usable = [f for f, d in tables.items() if base in d and lin in d]
    fusion = "task_arithmetic" if "task_arithmetic" in usable else (usable[0] if usable else None)
    a = b = None
    if fusion is not None:
        common = [k for k in tables[fusion][base] if k in tables[fusion][lin]]
        a, b = (
            _seedwise(
                {
                    k: {
                        s: _value(e, "avg_normalized", "test_normalized")
                        for s, e in tables[fusion][m][k].items()
                    }
                    for k in common
                },
                common,
            )
            for m in (base, lin)
        )
    claim = f"L-LoRA's ({lin}) normalized merged score is higher than LoRA's ({base})"
    why = f"fusion '{fusion}', mean over all subsets both methods have"
    out["fusion_normalized"] = {**_verdict(claim, base, lin, a, b, False, why), "fusion": fusion}
    a = b = None
    dis = _mapping(results.get("disentanglement"), "disentanglement")
    if base in dis and lin in dis:
        ta, tb = _xi_table(results, base), _xi_table(results, lin)
        common = [p for p in ta if p in tb]
        a, b = _seedwise(ta, common), _seedwise(tb, common)
    claim = f"L-LoRA's ({lin}) mean disentanglement error is lower than LoRA's ({base})"
    out["disentanglement"] = _verdict(
        claim, base, lin, a, b, True, "mean ξ over the pairs both methods have"
    )
    return out


def summarize(results: Mapping, baseline: str = "lora", linearized: str = "l_lora") -> dict:
    """The numbers the report shows, as a JSON-serializable dict (see the module docstring)."""
    results = _mapping(results, "the top level")
    found_methods = [m for s in SECTIONS for m in _mapping(results.get(s), s)]
    methods = _ordered(results.get("methods") or [], found_methods)
    single = _mapping(results.get("single"), "single")
    found_tasks = [t for m in single.values() for t in _mapping(m, "single.<method>")]
    tasks = _ordered(results.get("tasks") or [], found_tasks)
    single_tasks = [t for t in tasks if t in found_tasks]
    summary = {k: results.get(k) for k in _HEADER_KEYS}
    if not summary["timings"] and isinstance(results.get("timings_s"), Mapping):
        # A study's wall seconds: fine-tuning per method and analysis per (method, seed); the
        # per-fusion-method split stays in results.json.
        summary["timings"] = {
            k: v for k, v in results["timings_s"].items() if k.split("/")[0] != "fusion"
        }
    summary.update(tasks=tasks, methods=methods, seeds=results.get("seeds"))
    summary["primary_metric"] = {
        t: _mapping(results.get("primary_metric"), "primary_metric").get(t) for t in tasks
    }
    summary["single_tasks"] = single_tasks
    summary["single"] = _summarize_single(results, methods, single_tasks)
    summary["fusion"], summary["best_fusion"] = _summarize_fusion(results, methods)
    summary["cosine"], summary["isolation_overlap"] = _summarize_cosine(results, methods)
    summary["disentanglement"] = _summarize_disentanglement(results, methods)
    summary["learning"] = summarize_learning(results)
    summary["missing_sections"] = [s for s in SECTIONS if not results.get(s)]
    summary["verdicts"] = _verdicts(results, summary, baseline, linearized)
    return summary


def render_markdown(summary: Mapping, figures: Mapping | None = None) -> str:
    """report.md text from `summarize`'s output and the figure file names of `make_figures`."""

    return render(summary, figures or {})


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(results: Mapping, out_dir: str | os.PathLike) -> Path:
    """Write report.md, results_summary.json and the PNG figures into out_dir; return report.md."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    figures = make_figures(results, summary, out)
    _atomic_write(out / "results_summary.json", json.dumps(summary, indent=2) + "\n")
    path = out / "report.md"
    _atomic_write(path, render_markdown(summary, figures))
    return path
