"""Fusion of task vectors: one small module per method, a registry by name.

Every method is a pure function ``(taus: list[PyTree], **hparams) -> PyTree``
returning the merged task vector τ (add it to φ0 to get the merged adapter).
Exceptions: ``lorahub`` also needs an ``objective`` callable and returns
``(τ, best_weights, history)``; ``weighted`` needs one coefficient per task.

``hparam_grid(name)`` gives the default grid that validation-set selection
sweeps; for every name in ``GRID_METHODS``, ``get(name)(taus, **hp)`` runs as is
for each ``hp`` in the grid (DARE's entries carry an int seed as ``key``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from llora_jax.fusion.average import average
from llora_jax.fusion.common import COARSE_LAMBDA_GRID, LAMBDA_GRID, check_taus
from llora_jax.fusion.dare import dare, drop_and_rescale, random_masks
from llora_jax.fusion.isolation import core_masks, core_overlap, isolation, isolation_subsets
from llora_jax.fusion.lorahub import LorahubSearch, lorahub
from llora_jax.fusion.task_arithmetic import task_arithmetic, weighted
from llora_jax.fusion.ties import ties, ties_subsets

FUSION_METHODS: dict[str, Callable] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "weighted": weighted,
    "ties": ties,
    "dare": dare,
    "isolation": isolation,
    "lorahub": lorahub,
}

# Methods whose default grid entries are complete keyword sets (no extra argument needed).
GRID_METHODS: tuple[str, ...] = ("average", "task_arithmetic", "ties", "dare", "isolation")

TIES_K_GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
DARE_P_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
ISOLATION_P_GRID: tuple[float, ...] = (0.05, 0.1, 0.2)


def _check_name(name: str) -> None:
    if name not in FUSION_METHODS:
        raise ValueError(
            f"unknown fusion method {name!r}; valid names: {', '.join(sorted(FUSION_METHODS))}"
        )


def get(name: str) -> Callable:
    """The fusion function registered under ``name`` (ValueError listing valid names otherwise)."""
    _check_name(name)
    return FUSION_METHODS[name]


def hparam_grid(name: str) -> list[dict]:
    """Default hyper-parameter grid of a method, as a fresh list of keyword dicts.

    average: one entry. task_arithmetic: λ ∈ LAMBDA_GRID (0..1 step 0.05, 21).
    ties: k ∈ {0.25, 0.5, 0.75, 1} × LAMBDA_GRID (84). dare: p ∈ {0.1, 0.3, 0.5,
    0.7, 0.9} × λ ∈ 0..1 step 0.1 (55; coarser λ to bound the sweep), task
    arithmetic base, seed 0. isolation: p ∈ {0.05, 0.1, 0.2} × LAMBDA_GRID (63).
    lorahub: its default search settings (one entry; pass ``objective`` too).
    weighted has no default grid (one free coefficient per task: use lorahub).
    """
    _check_name(name)
    if name == "average":
        return [{}]
    if name == "task_arithmetic":
        return [{"lam": lam} for lam in LAMBDA_GRID]
    if name == "ties":
        return [{"k": k, "lam": lam} for k, lam in itertools.product(TIES_K_GRID, LAMBDA_GRID)]
    if name == "dare":
        return [
            {"p": p, "lam": lam, "base": "task_arithmetic", "key": 0}
            for p, lam in itertools.product(DARE_P_GRID, COARSE_LAMBDA_GRID)
        ]
    if name == "isolation":
        return [{"p": p, "lam": lam} for p, lam in itertools.product(ISOLATION_P_GRID, LAMBDA_GRID)]
    if name == "lorahub":
        return [{"bounds": 1.5, "l1": 0.05, "budget": 40, "seed": 0}]
    raise ValueError(
        f"fusion method {name!r} has no default grid: it takes one coefficient per task "
        "(search them with 'lorahub', or pass your own lams)"
    )


def default_grid(name: str) -> list[dict]:
    """Alias of :func:`hparam_grid` (e.g. ``default_grid("task_arithmetic")`` is the λ grid)."""
    return hparam_grid(name)


__all__ = [
    "FUSION_METHODS",
    "GRID_METHODS",
    "LAMBDA_GRID",
    "COARSE_LAMBDA_GRID",
    "TIES_K_GRID",
    "DARE_P_GRID",
    "ISOLATION_P_GRID",
    "get",
    "hparam_grid",
    "default_grid",
    "check_taus",
    "average",
    "task_arithmetic",
    "weighted",
    "ties",
    "ties_subsets",
    "dare",
    "random_masks",
    "drop_and_rescale",
    "isolation",
    "isolation_subsets",
    "core_masks",
    "core_overlap",
    "lorahub",
    "LorahubSearch",
]
