"""The capacity study's report: ``report.md``, ``capacity_summary.json`` and figures.

Figures (matplotlib, object API on an Agg canvas, as ``report.figures``):

* ``capacity_score_r<r>.png``: normalized merged score vs n, one line per (arm, fusion),
  error bars = std over seeds, a dashed line at 0.9;
* ``capacity_cosine.png``: mean off-diagonal ΔW cosine vs n, a panel per rank, a line per arm;
* ``capacity_overlap.png``: mean core overlap (Jaccard at p) vs n, likewise;
* ``capacity_gap.png``: the shared-A0 gap G(n) = L-LoRA (shared A0) − L-LoRA (per-task A0),
  test score paired on (subset, seed), a line per (rank, fusion), 95% bootstrap interval.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from llora_jax.report.capacity_stats import (
    block_rows,
    capacity_table,
    largest_n_above,
    paired_gap,
    verdict,
)
from llora_jax.report.figures import DPI, LINE_SIZE, save_figure
from llora_jax.report.markdown import fmt_stat, md_table

__all__ = ["write_capacity_report", "summarize_capacity"]

GAP_FUSIONS = ("task_arithmetic", "ties")


def summarize_capacity(collected: Mapping) -> dict:
    """Every number the report shows (JSON-serializable)."""
    table = capacity_table(collected)
    by_rank: dict[int, dict[str, str]] = {}
    for name, b in table.items():
        by_rank.setdefault(int(b["labels"]["rank"]), {})[b["labels"]["arm"]] = name
    gaps: dict = {}
    for r, arms in sorted(by_rank.items()):
        if "l_lora" not in arms or "l_lora_a0" not in arms:
            continue
        rows = {
            a: block_rows(collected["blocks"][arms[a]]["results"], "l_lora")
            for a in ("l_lora", "l_lora_a0")
        }
        for fusion in GAP_FUSIONS:
            a = rows["l_lora"]["per_subset"].get(fusion)
            b = rows["l_lora_a0"]["per_subset"].get(fusion)
            if a and b:
                gaps.setdefault(fusion, {})[r] = paired_gap(a, b)
    ranks = sorted(by_rank)
    verdicts = {
        f: verdict(g.get(ranks[0], {}), g.get(ranks[-1]) if len(ranks) > 1 else None)
        for f, g in gaps.items()
    }
    below = {
        name: {line: largest_n_above(by_n) for line, by_n in b["lines"].items()}
        for name, b in table.items()
    }
    return {
        "study": collected.get("study"),
        **{k: collected.get(k) for k in ("device", "date", "versions", "command")},
        "timings_s": collected.get("timings_s"),
        "blocks": table,
        "largest_n_at_90": below,
        "shared_a0_gap": gaps,
        "shared_a0_verdict": verdicts,
    }


def _lines_figure(summary: Mapping, rank: int, path: Path) -> Path:
    fig = Figure(figsize=LINE_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for b in summary["blocks"].values():
        if int(b["labels"]["rank"]) != rank:
            continue
        for line, by_n in b["lines"].items():
            pts = [(int(n), s["normalized"]) for n, s in by_n.items() if s["normalized"]]
            if pts:
                x, st = zip(*sorted(pts))
                ax.errorbar(
                    x,
                    [s["mean"] for s in st],
                    yerr=[s["std"] or 0 for s in st],
                    marker="o",
                    capsize=3,
                    label=f"{b['labels']['arm']} {line}",
                )
    ax.axhline(0.9, ls="--", color="grey", lw=1)
    ax.set_xlabel("number of tasks merged (n)")
    ax.set_ylabel("normalized score (merged / single)")
    ax.set_title(f"rank {rank}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def _measure_figure(summary: Mapping, key: str, ylabel: str, path: Path) -> Path:
    ranks = sorted({int(b["labels"]["rank"]) for b in summary["blocks"].values()})
    fig = Figure(
        figsize=(LINE_SIZE[0] * 0.8 * len(ranks), LINE_SIZE[1]), dpi=DPI, layout="constrained"
    )
    axes = np.atleast_1d(fig.subplots(1, len(ranks), sharey=True))
    for ax, r in zip(axes, ranks):
        for b in summary["blocks"].values():
            if int(b["labels"]["rank"]) != r or not b[key]:
                continue
            pts = sorted((int(n), s) for n, s in b[key].items() if s)
            ax.errorbar(
                [n for n, _ in pts],
                [s["mean"] for _, s in pts],
                yerr=[s["std"] or 0 for _, s in pts],
                marker="o",
                capsize=3,
                label=b["labels"]["arm"],
            )
        ax.set_title(f"rank {r}", fontsize=10)
        ax.set_xlabel("number of tasks (n)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    return save_figure(fig, path)


def _gap_figure(summary: Mapping, path: Path) -> Path:
    fig = Figure(figsize=LINE_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for fusion, by_rank in summary["shared_a0_gap"].items():
        for r, by_n in by_rank.items():
            keys = sorted(by_n, key=int)
            ns, g = [int(n) for n in keys], [by_n[n] for n in keys]
            lo = [x["mean"] - x["low"] if x["low"] is not None else 0 for x in g]
            hi = [x["high"] - x["mean"] if x["high"] is not None else 0 for x in g]
            ax.errorbar(
                ns,
                [x["mean"] for x in g],
                yerr=[lo, hi],
                marker="o",
                capsize=3,
                label=f"r {r} {fusion}",
            )
    ax.axhline(0.0, ls="--", color="grey", lw=1)
    ax.set_xlabel("number of tasks merged (n)")
    ax.set_ylabel("G = shared A0 − per-task A0 (test score)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _markdown(s: Mapping, figures: list[str]) -> str:
    out = [f"# Capacity study: {s['study']}", ""]
    out += [md_table(["field", "value"], [(k, s.get(k) or "—") for k in ("device", "date")])]
    if s.get("command"):
        out += ["", "Command:", "", "```", str(s["command"]), "```"]
    out += [
        "",
        "Cells: mean ± std over seeds (std omitted for one seed) of the mean over the "
        "subsets of each size n. normalized = merged ÷ single-task test score; "
        "baseline-normalized = (merged − majority) ÷ (single − majority), over learning "
        "tasks only; "
        "'normalized (learning)' leaves out tasks that do not beat their majority "
        "baseline by 2 points (listed per block).",
    ]
    for name, b in s["blocks"].items():
        lab = b["labels"]
        out += ["", f"## {lab['arm']}, rank {lab['rank']} (`{name}`)", ""]
        out += [f"Tasks that do not learn: {', '.join(b['not_learning']) or 'none'}.", ""]
        rows = []
        for line, by_n in b["lines"].items():
            for n, st in by_n.items():
                rows.append(
                    [
                        line,
                        n,
                        fmt_stat(st["test"]),
                        fmt_stat(st["normalized"]),
                        fmt_stat(st["baseline_normalized"]),
                        fmt_stat(st["normalized_learning"]),
                    ]
                )
        out += [
            md_table(
                [
                    "fusion",
                    "n",
                    "test",
                    "normalized",
                    "baseline-normalized",
                    "normalized (learning)",
                ],
                rows,
            )
        ]
        rows = [
            [
                n,
                fmt_stat(b["cosine"].get(n)),
                fmt_stat(b["cosine_adapter"].get(n)),
                fmt_stat(b["overlap"].get(n)),
            ]
            for n in sorted(set(b["cosine"]) | set(b["overlap"]))
        ]
        out += ["", md_table(["n", "cosine ΔW", "cosine (adapter)", "core overlap"], rows)]
        n90 = s["largest_n_at_90"][name]
        out += [
            "",
            "Largest n with normalized ≥ 0.9 at every n up to it: "
            + ", ".join(f"{k} {v if v is not None else '< smallest n'}" for k, v in n90.items()),
        ]
    out += [
        "",
        "## Shared-A0 prediction",
        "",
        "G(n) = test score of L-LoRA (shared A0) − L-LoRA (per-task A0, ΔW space), paired on "
        "(subset, seed), 95% bootstrap interval over the pairs (none with one pair).",
    ]
    rows = []
    for fusion, by_rank in s["shared_a0_gap"].items():
        for r, by_n in by_rank.items():
            for n, g in by_n.items():
                ci = "—" if g["low"] is None else f"[{g['low']:.3f}, {g['high']:.3f}]"
                rows.append([fusion, r, n, f"{g['mean']:.3f}", ci, g["pairs"]])
    out += ["", md_table(["fusion", "rank", "n", "G", "95% interval", "pairs"], rows), ""]
    out += [f"- {f}: **{v}**" for f, v in s["shared_a0_verdict"].items()]
    out += ["", "## Figures", ""] + [f"![{f}](<{f}>)" for f in figures]
    if s.get("timings_s"):
        out += [
            "",
            "## Wall time per block (seconds, this invocation)",
            "",
            md_table(["block", "seconds"], [(k, f"{v:.0f}") for k, v in s["timings_s"].items()]),
        ]
    return "\n".join(out) + "\n"


def write_capacity_report(collected: Mapping, out: str | os.PathLike) -> Path:
    """Write report.md, capacity_summary.json and the figures into ``out``; returns report.md."""
    out = Path(out)
    s = json.loads(json.dumps(summarize_capacity(collected), default=float))  # str keys
    ranks = sorted({int(b["labels"]["rank"]) for b in s["blocks"].values()})
    figures = [_lines_figure(s, r, out / f"capacity_score_r{r}.png").name for r in ranks]
    figures.append(
        _measure_figure(
            s, "cosine", "mean off-diagonal cosine (ΔW)", out / "capacity_cosine.png"
        ).name
    )
    figures.append(
        _measure_figure(
            s, "overlap", "mean core overlap (Jaccard)", out / "capacity_overlap.png"
        ).name
    )
    if s["shared_a0_gap"]:
        figures.append(_gap_figure(s, out / "capacity_gap.png").name)
    for name, text in (
        ("capacity_summary.json", json.dumps(s, indent=1) + "\n"),
        ("report.md", _markdown(s, figures)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out / "report.md"


def main() -> None:
    """``python -m llora_jax.report.capacity RESULTS.json``: rewrite the report beside it."""
    path = Path(sys.argv[1])
    print(write_capacity_report(json.loads(path.read_text()), path.parent))


if __name__ == "__main__":
    main()
