"""Fusion's building blocks: members (experiment + task vector), shared grid evaluators and
compiled merge programs, each from one bounded cache (``functools.lru_cache``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from llora_jax import forward, fusion
from llora_jax import tree as tree_lib
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion.common import thresholds_of_count
from llora_jax.task_vectors import TaskVector
from llora_jax.tasks import Experiment
from llora_jax.types import TaskModel, functions_key

PyTree = Any


@dataclasses.dataclass
class Member:
    """One fine-tuned task: its experiment (task model, arrays) and its task vector."""

    exp: Experiment
    tv: TaskVector

    @property
    def task(self) -> str:
        return self.exp.task

    def single_score(self, split: str = "test") -> float:
        prefix = "test" if split == "test" else "val"
        return float(self.tv.meta["metrics"][f"{prefix}/{self.exp.primary_metric}"])

    def grid(self, batch_size: int, chunk: int) -> grid_eval.GridEvaluator:
        # Not cached on the member: callers may ask for different chunks.
        return shared_evaluator(self.exp.tm, self.exp.spec, batch_size, chunk)


def shared_evaluator(tm: Any, spec: Any, batch_size: int, chunk: int) -> grid_eval.GridEvaluator:
    """One evaluator (and so one set of compiled programs) per distinct model function.

    Members of different seeds — and of different tasks whose readout is the same
    function — evaluate the same program with different arguments; sharing the
    jitted function avoids recompiling it for each of them.
    """
    return _evaluator(*functions_key(tm, spec), batch_size, chunk)


@functools.lru_cache(maxsize=64)
def _evaluator(module, readout, loss, predict, spec, batch_size, chunk) -> grid_eval.GridEvaluator:
    # Weights and heads are not part of the program: every call passes its member's task
    # model (GridEvaluator.start/predict's ``tm``), so the cached evaluator holds none.
    tm = TaskModel(module=module, params=None, readout=readout, loss=loss, predict=predict)
    return grid_eval.GridEvaluator(tm, spec, batch_size, chunk)


def hparam_groups(name: str, grid: Sequence[dict]) -> list[tuple[dict, list[dict]]]:
    """Group grid entries by everything but λ: [(fixed hparams, [entries...])]."""
    out: dict[tuple, tuple[dict, list[dict]]] = {}
    for hp in grid:
        fixed = {k: v for k, v in hp.items() if k != "lam"}
        key = tuple(sorted((k, repr(v)) for k, v in fixed.items()))
        out.setdefault(key, (fixed, []))[1].append(hp)
    return list(out.values())


def program(fn: Any, **static: Any) -> Any:
    """``jax.jit`` of ``fn`` with ``static`` keyword arguments fixed, one per setting.

    Run eagerly, a fusion method is hundreds of small per-leaf operations, each compiled
    for its own shape; compiled whole, it is one program per setting and input shapes.
    """
    return _compiled(fn, tuple(sorted((k, _ByRepr(repr(v), v)) for k, v in static.items())))


@dataclasses.dataclass(frozen=True)
class _ByRepr:
    """A hyper-parameter value compared by its repr (lists and dicts are not hashable)."""

    text: str
    value: Any = dataclasses.field(compare=False, hash=False)


@functools.lru_cache(maxsize=256)
def _compiled(fn: Any, static: tuple) -> Any:
    return jax.jit(functools.partial(fn, **{k: v.value for k, v in static}))


def merge(name: str, taus: list[PyTree], **hparams: Any) -> PyTree:
    """``fusion.get(name)(taus, **hparams)`` as one compiled program over the whole tree."""
    return program(fusion.get(name), **hparams)(list(taus))


def dropped(taus: list[PyTree], p: Any, key: Any) -> PyTree:
    """DARE's drop-and-rescale of every task vector, stacked (n, ...); task i's mask is the
    one ``fusion.dare`` draws for position i. ``p`` is traced: one program for every p."""
    out = fusion.drop_and_rescale(taus, fusion.random_masks(taus, p, key), p)
    return tree_lib.stack(out)


def ties_of_count(taus: list[PyTree], masks: Any, m: Any) -> PyTree:
    """``fusion.ties_subsets`` (λ = 1) keeping each task's ``m`` largest elements."""
    return fusion.ties_subsets(taus, masks, thresholds=thresholds_of_count(taus, m))


def isolation_parts(taus: list[PyTree], masks: Any, p: float) -> PyTree:
    """Every subset's isolation core (S, ...), then its rest (S, ...), on one axis (2S, ...)."""
    core, rest = fusion.isolation_subsets(taus, masks, p)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), core, rest)


def base_vector(members: Sequence[Member]) -> tuple[PyTree, PyTree | None]:
    """(base, φ0): φ0 for adapters; θ0 restricted to what trained for full fine-tuning."""
    m0 = members[0]
    if m0.exp.spec.method == "full":
        return forward.full_trainable(m0.exp.tm), None
    # The exact linearization point the vectors were trained from.
    return m0.tv.phi0, m0.tv.phi0
