"""Markdown rendering of a study summary (the output of ``report.summarize``).

Only formatting lives here: every number printed comes from the summary dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llora_jax.report.learning import render_learning

__all__ = ["fmt_stat", "md_table", "render"]

_MISSING_TEXT = {
    "single": "single-task scores",
    "fusion": "fusion results",
    "cosine": "cosine similarities of task vectors",
    "isolation_overlap": "isolation mask overlaps",
    "disentanglement": "disentanglement errors",
}


def fmt_stat(s: Mapping | None, digits: int = 3) -> str:
    """ "mean ± std" (std omitted for one seed), "—" when there is nothing."""
    if s is None:
        return "—"
    if s.get("std") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _img(name: str, alt: str) -> str:
    # Angle brackets keep names with '+' or spaces intact in CommonMark links.
    return f"![{alt}](<{name}>)"


def _n_seeds(stats: list[Mapping | None]) -> str:
    ns = sorted({s["n"] for s in stats if s is not None})
    return "/".join(str(n) for n in ns) if ns else "0"


def _header(s: Mapping) -> list[str]:
    out = [f"# Study report: {s.get('study') or '(unnamed study)'}", ""]
    versions = s.get("versions") or {}
    rows = [
        ("backbone", s.get("backbone")),
        ("device", s.get("device")),
        ("date", s.get("date")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
        ("tasks", ", ".join(s.get("tasks") or []) or None),
        ("methods", ", ".join(s.get("methods") or []) or None),
        ("seeds", ", ".join(str(x) for x in s.get("seeds") or []) or None),
    ]
    out += [md_table(["field", "value"], [(k, v if v not in (None, "") else "—") for k, v in rows])]
    if s.get("command"):
        out += ["", "Command:", "", "```", str(s["command"]), "```"]
    out += [
        "",
        "Cells are mean ± sample std (ddof=1) over seeds; the std is omitted for one seed. "
        "Where a cell averages several entries (tasks, subsets, pairs), each seed is averaged "
        "first and a seed counts only when it has all of them.",
    ]
    return out


def _single(s: Mapping) -> list[str]:
    out = ["", "## Single-task test scores", ""]
    if not s["single"]:
        return out + ["_Not measured: results.json has no `single` section._"]
    tasks = s["single_tasks"]
    metrics = ", ".join(f"{t}: {s['primary_metric'].get(t) or 'its only metric'}" for t in tasks)
    out += [f"Individually fine-tuned models, test split, primary metric ({metrics}).", ""]
    rows = []
    for m, d in s["single"].items():
        stats = list(d["tasks"].values())
        rows.append(
            [m]
            + [fmt_stat(d["tasks"][t]) for t in tasks]
            + [fmt_stat(d["average"]), _n_seeds(stats)]
        )
    return out + [md_table(["method", *tasks, "average", "seeds"], rows)]


def _hparams(h: Mapping | None) -> str:
    if not h:
        return "—"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())


def _fusion(s: Mapping, figures: Mapping) -> list[str]:
    out = ["", "## Fusion", ""]
    if not s["fusion"]:
        return out + ["_Not measured: results.json has no `fusion` section._"]
    out += [
        "Merged models scored on the test split of each merged task (primary metric). *Absolute*: "
        "mean score over the merged tasks; *normalized*: each task's merged score divided by the "
        "individually fine-tuned model's score (same method and seed), then averaged. Columns: "
        "number of tasks merged (each cell averages all subsets of that size)."
    ]
    for f, e in s["fusion"].items():
        cols = [f"{n} tasks" for n in e["sizes"]]
        out += ["", f"### {f}", ""]
        for kind in ("absolute", "normalized"):
            rows = [
                [m] + [fmt_stat(by_n.get(str(n))) for n in e["sizes"]]
                for m, by_n in e[kind].items()
            ]
            out += [
                f"{kind.capitalize()} average test score:",
                "",
                md_table(["method", *cols], rows),
                "",
            ]
        if f in figures.get("score_vs_tasks", {}):
            out += [
                _img(figures["score_vs_tasks"][f], f"normalized score vs number of tasks, {f}"),
                "",
            ]
        if e["hparams_full"]:
            seeds = list(dict.fromkeys(x for h in e["hparams_full"].values() for x in h))
            rows = [[m] + [_hparams(h.get(x)) for x in seeds] for m, h in e["hparams_full"].items()]
            out += [
                f"Hyper-parameters chosen on validation for `{e['full_subset']}`:",
                "",
                md_table(["method", *[f"seed {x}" for x in seeds]], rows),
            ]
    if s["best_fusion"]:
        n = next(iter(s["best_fusion"].values()))["size"]
        out += ["", f"### Best fusion per method ({n} tasks merged)", ""]
        out += [
            "Chosen by the mean normalized score (absolute when no normalized score exists).",
            "",
        ]
        rows = [
            [m, b["fusion"], fmt_stat(b["avg_test"]), fmt_stat(b["avg_normalized"])]
            for m, b in s["best_fusion"].items()
        ]
        out += [md_table(["method", "best fusion", "absolute", "normalized"], rows)]
    return out


def _interference(s: Mapping, figures: Mapping) -> list[str]:
    out = ["", "## Interference", "", "### Cosine similarity of task vectors", ""]
    if s["cosine"]:
        out += [
            "Mean off-diagonal cosine similarity between the task vectors of different tasks: "
            "over the flattened adapter parameters τ, and over the per-layer ΔW = s·A·B products.",
            "",
        ]
        rows = [
            [m, fmt_stat(d["param"], 4), fmt_stat(d["delta_w"], 4), _n_seeds([d["param"]])]
            for m, d in s["cosine"].items()
        ]
        out += [md_table(["method", "cosine (flattened τ)", "cosine (ΔW)", "seeds"], rows)]
        imgs = figures.get("cosine", {})
        if imgs:
            out += [""] + [_img(name, f"cosine matrix, {m}") for m, name in imgs.items()]
    else:
        out += ["_Not measured: results.json has no `cosine` section._"]
    if s["isolation_overlap"]:
        out += ["", "### Overlap of isolation masks", ""]
        rows = [
            [m, d["p"] if d["p"] is not None else "—", fmt_stat(d["mean_off_diagonal"], 4)]
            for m, d in s["isolation_overlap"].items()
        ]
        out += [md_table(["method", "p", "mean off-diagonal overlap"], rows)]
        imgs = figures.get("isolation", {})
        if imgs:
            out += [""] + [_img(name, f"isolation overlap, {m}") for m, name in imgs.items()]
    out += ["", "### Claims of the paper, checked on these results", ""]
    for v in s["verdicts"].values():
        if v["verdict"] != "not measured":
            b, lin = v["baseline"], v["linearized"]
            nums = f" ({lin} {fmt_stat(v[lin], 4)} vs {b} {fmt_stat(v[b], 4)}; {v['detail']})"
        else:
            nums = f" ({v['detail']})" if v.get("detail") else ""
        out.append(f"- {v['claim']}: **{v['verdict']}**{nums}.")
    return out


def _disentanglement(s: Mapping, figures: Mapping) -> list[str]:
    out = ["", "## Disentanglement error", ""]
    if not s["disentanglement"]:
        return out + ["_Not measured: results.json has no `disentanglement` section._"]
    pairs = list(dict.fromkeys(p for d in s["disentanglement"].values() for p in d["pairs"]))
    out += [
        "Mean of ξ(λ1, λ2) over the λ grid (lower = the two task vectors interfere less).",
        "",
    ]
    rows = [
        [m] + [fmt_stat(d["pairs"].get(p), 4) for p in pairs] + [fmt_stat(d["mean"], 4)]
        for m, d in s["disentanglement"].items()
    ]
    out += [md_table(["method", *pairs, "mean"], rows)]
    imgs = figures.get("disentanglement", {})
    if imgs:
        methods = list(imgs)
        out += [
            "",
            "Heatmaps of ξ averaged over seeds (rows λ1, columns λ2; one colour scale per pair):",
            "",
        ]
        rows = [
            [p] + [_img(imgs[m][p], f"xi {m} {p}") if p in imgs[m] else "—" for m in methods]
            for p in pairs
        ]
        out += [md_table(["pair", *methods], rows)]
    return out


def render(s: Mapping, figures: Mapping) -> str:
    """The whole report.md."""
    out = _header(s) + _single(s) + render_learning(s.get("learning") or {}, md_table)
    out += _fusion(s, figures) + _interference(s, figures)
    out += _disentanglement(s, figures)
    if s.get("timings"):
        rows = [
            [k, f"{v:.1f}" if isinstance(v, (int, float)) else v] for k, v in s["timings"].items()
        ]
        out += ["", "## Timings", "", md_table(["step", "seconds"], rows)]
    if s["missing_sections"]:
        out += ["", "## Not in this results file", ""]
        out += [f"- `{x}`: {_MISSING_TEXT.get(x, x)}" for x in s["missing_sections"]]
    return "\n".join(out) + "\n"
