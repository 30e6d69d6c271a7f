"""The seven-task cosine test's report: is L-LoRA's mean off-diagonal cosine lower than LoRA's?

Per block (the main test and each ablation) and per space (flattened adapter parameters,
ΔW): the per-seed difference d_s = cos(L-LoRA) − cos(LoRA), both on the same seed, data and
budget, then its mean, sample std and a 95% Student-t interval over seeds (the seed is the
unit of replication: the 21 pairs of one seed are not independent). The claim "L-LoRA's
cosine is lower" is *refuted* when the interval lies above 0, *supported* when it lies
below 0, *inconclusive* otherwise (and with one seed). Beside it: normalized task
arithmetic (mean over every subset), mean ξ per pair and the tasks that do not learn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from llora_jax.report.learning import not_learning, summarize_learning
from llora_jax.report.markdown import md_table

__all__ = ["paired_seeds", "summarize_cosine_test", "write_cosine_report"]

BASE, LINEAR = "lora", "l_lora"
SPACES = {"adapter": "mean_off_diagonal", "delta_w": "delta_w_mean_off_diagonal"}


def paired_seeds(a: Mapping[str, float], b: Mapping[str, float]) -> dict:
    """a − b over the seeds both have: per-seed values, mean, std, 95% t interval, verdict."""
    seeds = sorted(set(a) & set(b), key=int)
    d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
    out = {"per_seed": dict(zip(seeds, d.tolist())), "seeds": len(d)}
    if len(d) == 0:
        return out | {
            "mean": None,
            "std": None,
            "low": None,
            "high": None,
            "verdict": "not measured",
        }
    mean = float(d.mean())
    if len(d) < 2:
        return out | {
            "mean": mean,
            "std": None,
            "low": None,
            "high": None,
            "verdict": "inconclusive (one seed)",
        }
    std = float(d.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.975, len(d) - 1)) * std / np.sqrt(len(d))
    low, high = mean - half, mean + half
    verdict = "refuted" if low > 0 else "supported" if high < 0 else "inconclusive"
    return out | {"mean": mean, "std": std, "low": low, "high": high, "verdict": verdict}


def _cosines(r: Mapping, method: str, key: str) -> dict[str, float]:
    by_seed = (r.get("cosine") or {}).get(method) or {}
    return {s: float(e[key]) for s, e in by_seed.items() if e.get(key) is not None}


def _ta(r: Mapping, method: str) -> dict[str, float]:
    subs = ((r.get("fusion") or {}).get(method) or {}).get("task_arithmetic") or {}
    per_seed: dict[str, list] = {}
    for by_seed in subs.values():
        for s, e in by_seed.items():
            per_seed.setdefault(s, []).append(e["avg_normalized"])
    return {s: float(np.mean(v)) for s, v in per_seed.items()}


def summarize_cosine_test(collected: Mapping) -> dict:
    blocks = {}
    for name, block in collected["blocks"].items():
        r = block["results"]
        space_of_matrix = "delta_w" if r.get("merge_space") == "delta_w" else "adapter"
        entry = {"labels": block["labels"], "cosine": {}, "task_arithmetic": {}, "xi": {}}
        for space, key in SPACES.items():
            if space == "adapter" and space_of_matrix == "delta_w":
                continue  # adapter coordinates of different A0 are not comparable
            a, b = _cosines(r, LINEAR, key), _cosines(r, BASE, key)
            entry["cosine"][space] = {LINEAR: a, BASE: b, "difference": paired_seeds(a, b)}
        for m in (BASE, LINEAR):
            entry["task_arithmetic"][m] = _ta(r, m)
            for pair, by_seed in ((r.get("disentanglement") or {}).get(m) or {}).items():
                entry["xi"].setdefault(pair, {})[m] = float(
                    np.mean([e["mean_xi"] for e in by_seed.values()])
                )
        learning = summarize_learning(r)
        entry["not_learning"] = {m: not_learning(learning, m) for m in (BASE, LINEAR)}
        entry["learning"] = learning
        blocks[name] = entry
    return {
        "study": collected.get("study"),
        "date": collected.get("date"),
        "device": collected.get("device"),
        "timings_s": collected.get("timings_s"),
        "blocks": blocks,
    }


def _f(x, digits=4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _markdown(s: Mapping) -> str:
    out = [
        f"# Seven-task cosine test: {s['study']}",
        "",
        f"Device: {s.get('device') or '—'}; date: {s.get('date') or '—'}.",
        "",
        "d = cos(L-LoRA) − cos(LoRA), mean off-diagonal cosine, paired per seed; 95% "
        "Student-t interval over seeds. The claim 'L-LoRA's cosine is lower' is refuted "
        "when the interval lies above 0.",
    ]
    rows = []
    for name, b in s["blocks"].items():
        for space, c in b["cosine"].items():
            d = c["difference"]
            ci = "—" if d["low"] is None else f"[{d['low']:.4f}, {d['high']:.4f}]"
            rows.append(
                [
                    name,
                    space,
                    _f(np.mean(list(c[BASE].values())) if c[BASE] else None),
                    _f(np.mean(list(c[LINEAR].values())) if c[LINEAR] else None),
                    _f(d["mean"]),
                    ci,
                    d["seeds"],
                    f"**{d['verdict']}**",
                ]
            )
    out += [
        "",
        md_table(["block", "space", "LoRA", "L-LoRA", "d", "95% interval", "seeds", "claim"], rows),
    ]
    rows = []
    for name, b in s["blocks"].items():
        ta = b["task_arithmetic"]
        rows.append(
            [name]
            + [_f(np.mean(list(ta[m].values())) if ta[m] else None, 3) for m in (BASE, LINEAR)]
            + [", ".join(b["not_learning"][m]) or "none" for m in (BASE, LINEAR)]
        )
    out += [
        "",
        "Normalized task arithmetic (mean over every subset and seed) and the tasks "
        "whose single-task score does not beat the majority baseline by 2 points:",
        "",
        md_table(
            ["block", "TA LoRA", "TA L-LoRA", "not learning (LoRA)", "not learning (L-LoRA)"], rows
        ),
    ]
    xi = [
        [name, pair, _f(v.get(BASE)), _f(v.get(LINEAR))]
        for name, b in s["blocks"].items()
        for pair, v in b["xi"].items()
    ]
    if xi:
        out += [
            "",
            "Mean disentanglement error ξ:",
            "",
            md_table(["block", "pair", "LoRA", "L-LoRA"], xi),
        ]
    out += [
        "",
        "Each block's own report (single scores beside baselines, cosine matrices, "
        "every subset) is `<block>/report.md`.",
    ]
    return "\n".join(out) + "\n"


def write_cosine_report(collected: Mapping, out: str | os.PathLike) -> Path:
    out = Path(out)
    s = summarize_cosine_test(collected)
    for name, text in (
        ("cosine_test_summary.json", json.dumps(s, indent=1, default=float) + "\n"),
        ("report.md", _markdown(s)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out / "report.md"
