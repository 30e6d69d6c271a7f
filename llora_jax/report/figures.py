"""PNG figures of a study report.

Uses matplotlib's object API on an Agg canvas: no display, no pyplot state, no backend switch
for the rest of the process. Figures have fixed pixel sizes (``size * DPI``), no tight bbox.

* ``disentangle_<method>_<pair>.png``: ξ(λ1, λ2) averaged over seeds; rows λ1, columns λ2. One
  figure per method and pair; all methods of one pair share the colour scale, so the report puts
  them side by side in a table.
* ``cosine_<method>.png``: task × task cosine matrix averaged over seeds (flattened τ; a second
  panel for ΔW when present).
* ``isolation_<method>.png``: overlap of isolation masks, averaged over seeds.
* ``score_vs_tasks_<fusion>.png``: normalized score vs number of tasks merged, a line per method,
  error bars = std over seeds.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "HEATMAP_SIZE",
    "LINE_SIZE",
    "MATRIX_PANEL_SIZE",
    "safe_name",
    "save_figure",
    "mean_xi",
    "mean_matrix",
    "plot_disentanglement",
    "plot_matrices",
    "plot_score_vs_tasks",
    "make_figures",
]

DPI = 100
HEATMAP_SIZE = (5.2, 4.4)  # inches (width, height)
LINE_SIZE = (5.6, 4.0)
MATRIX_PANEL_SIZE = (4.8, 4.2)  # per panel


def safe_name(s: str) -> str:
    """A file-name-safe version of a method / pair / fusion name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(s))


def save_figure(fig: Figure, path: Path) -> Path:
    """Render ``fig`` on an Agg canvas into ``path`` (PNG), atomically."""
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


def _seeds(by_seed: Mapping) -> list:
    return [
        by_seed[k]
        for k in sorted(
            by_seed, key=lambda s: (0, int(s)) if str(s).lstrip("-").isdigit() else (1, s)
        )
    ]


def mean_xi(by_seed: Mapping, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(grid, ξ averaged over the seeds sharing the first seed's grid, number of those seeds)."""
    grid, stack = None, []
    for e in _seeds(by_seed):
        if not e.get("xi"):
            continue
        g, xi = np.asarray(e["grid"], float), np.asarray(e["xi"], float)
        if xi.shape != (len(g), len(g)):
            raise ValueError(
                f"results.json: {where}: xi has shape {xi.shape}, expected ({len(g)}, {len(g)}) "
                "(len(grid) x len(grid), rows = lambda1)"
            )
        if grid is None:
            grid = g
        if g.shape == grid.shape and np.allclose(g, grid):
            stack.append(xi)
    if grid is None:
        return np.zeros(0), np.zeros((0, 0)), 0
    return grid, np.mean(stack, axis=0), len(stack)


def mean_matrix(by_seed: Mapping, key: str) -> tuple[list[str], np.ndarray | None, int]:
    """(tasks, matrix averaged over seeds, n): seeds are re-ordered to the first seed's tasks."""
    tasks, stack = None, []
    for e in _seeds(by_seed):
        if not e.get(key):
            continue
        t, m = list(e["tasks"]), np.asarray(e[key], float)
        if tasks is None:
            tasks = t
        if sorted(t) != sorted(tasks):
            continue
        idx = [t.index(x) for x in tasks]
        stack.append(m[np.ix_(idx, idx)])
    if not stack:
        return [], None, 0
    return tasks, np.mean(stack, axis=0), len(stack)


def _ticks(grid: np.ndarray, max_ticks: int = 11) -> tuple[np.ndarray, list[str]]:
    step = max(1, math.ceil(len(grid) / max_ticks))
    idx = np.arange(0, len(grid), step)
    return idx, [f"{round(float(grid[i]), 2) + 0.0:g}" for i in idx]  # + 0.0: no "-0"


def plot_disentanglement(
    grid: np.ndarray,
    xi: np.ndarray,
    title: str,
    path: Path,
    vmax: float | None = None,
    pair: str = "",
) -> Path:
    """Heatmap of ξ with λ1 on the vertical axis (increasing upward) and λ2 horizontal."""
    fig = Figure(figsize=HEATMAP_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    vmax = float(np.max(xi)) if vmax is None else vmax
    im = ax.imshow(
        xi, origin="lower", cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-12), aspect="auto"
    )
    idx, labels = _ticks(grid)
    ax.set_xticks(idx, labels, rotation=90)
    ax.set_yticks(idx, labels)
    names = pair.split("+")
    t1, t2 = (f" ({names[0]})", f" ({names[1]})") if len(names) == 2 else ("", "")
    ax.set_xlabel(f"λ2{t2}")
    ax.set_ylabel(f"λ1{t1}")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="disentanglement error ξ")
    return _save(fig, path)


def plot_matrices(
    panels: list[tuple[str, np.ndarray]],
    tasks: list[str],
    title: str,
    path: Path,
    vmin: float,
    vmax: float,
    cmap: str,
) -> Path:
    """Task × task matrices side by side, values written in the cells for up to 12 tasks."""
    w, h = MATRIX_PANEL_SIZE
    fig = Figure(figsize=(w * len(panels), h), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, m) in zip(axes, panels):
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title(name, fontsize=10)
        if len(tasks) <= 12:
            for i in range(len(tasks)):
                for j in range(len(tasks)):
                    dark = (m[i, j] - vmin) / max(vmax - vmin, 1e-12) > 0.6
                    color = "white" if dark else "black"
                    ax.text(
                        j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color
                    )
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_score_vs_tasks(
    normalized: Mapping[str, Mapping[str, Mapping | None]], title: str, path: Path
) -> Path:
    """normalized = {method: {str(n_tasks): stat}}; a line per method with std error bars."""
    fig = Figure(figsize=LINE_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    methods = [m for m, d in normalized.items() if any(v is not None for v in d.values())]
    sizes = set()
    for i, m in enumerate(methods):
        pts = sorted((int(n), v) for n, v in normalized[m].items() if v is not None)
        # Small horizontal offsets keep overlapping error bars readable.
        x = np.array([n for n, _ in pts]) + 0.06 * (i - (len(methods) - 1) / 2)
        y = [v["mean"] for _, v in pts]
        err = [v["std"] or 0.0 for _, v in pts]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=m)
        sizes.update(n for n, _ in pts)
    ax.set_xticks(sorted(sizes))
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalized score (merged / individual)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if methods:
        ax.legend()
    return _save(fig, path)


def make_figures(results: Mapping, summary: Mapping, out_dir: Path) -> dict[str, dict]:
    """Write every figure the results allow; returns file names (relative to out_dir) by kind."""
    out: dict[str, dict] = {
        "disentanglement": {},
        "cosine": {},
        "isolation": {},
        "score_vs_tasks": {},
    }
    dis = results.get("disentanglement") or {}
    by_pair: dict[str, dict] = {}
    for m, pairs in dis.items():
        for p, by_seed in (pairs or {}).items():
            grid, xi, n = mean_xi(by_seed or {}, f"disentanglement.{m}.{p}")
            if n:
                by_pair.setdefault(p, {})[m] = (grid, xi, n)
    for p, per_method in by_pair.items():
        vmax = max(float(np.max(xi)) for _, xi, _ in per_method.values())
        for m, (grid, xi, n) in per_method.items():
            name = f"disentangle_{safe_name(m)}_{safe_name(p)}.png"
            title = f"ξ(λ1, λ2): {m}, {p}\nmean of {n} seed(s); mean ξ = {xi.mean():.3f}"
            plot_disentanglement(grid, xi, title, out_dir / name, vmax=vmax, pair=p)
            out["disentanglement"].setdefault(m, {})[p] = name
    for m, by_seed in (results.get("cosine") or {}).items():
        tasks, param, n = mean_matrix(by_seed or {}, "matrix")
        if param is None:
            continue
        panels = [("flattened τ", param)]
        t2, dw, n2 = mean_matrix(by_seed, "delta_w_matrix")
        if dw is not None and t2 == tasks:
            panels.append(("ΔW", dw))
        lo = min(0.0, float(min(np.min(x) for _, x in panels)))
        name = f"cosine_{safe_name(m)}.png"
        title = f"cosine similarity of task vectors: {m} (mean of {n} seed(s))"
        plot_matrices(panels, tasks, title, out_dir / name, lo, 1.0, "RdBu_r" if lo < 0 else "Reds")
        out["cosine"][m] = name
    for m, by_seed in (results.get("isolation_overlap") or {}).items():
        tasks, mat, n = mean_matrix(by_seed or {}, "matrix")
        if mat is None:
            continue
        name = f"isolation_{safe_name(m)}.png"
        title = f"isolation mask overlap: {m} (mean of {n} seed(s))"
        plot_matrices([("overlap", mat)], tasks, title, out_dir / name, 0.0, 1.0, "viridis")
        out["isolation"][m] = name
    for f, e in (summary.get("fusion") or {}).items():
        if not any(v is not None for d in e["normalized"].values() for v in d.values()):
            continue
        name = f"score_vs_tasks_{safe_name(f)}.png"
        plot_score_vs_tasks(
            e["normalized"], f"{f}: normalized score vs number of tasks", out_dir / name
        )
        out["score_vs_tasks"][f] = name
    return out
