"""Fusion's building blocks: members (experiment + task vector), shared grid evaluators and
compiled merge programs, each from one bounded cache (``functools.lru_cache``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import forward, fusion
from llora_jax import tree as tree_lib
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion.common import thresholds_of_count
from llora_jax.interop.delta_w import KIND as DELTA_W
from llora_jax.interop.peft_export import meta_scale
from llora_jax.task_vectors import TaskVector, TaskVectorError
from llora_jax.tasks import Experiment
from llora_jax.types import METHODS, AdapterSpec, TaskModel, functions_key

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
    """(base, φ0): φ0 for adapters; θ0 restricted to what trained for full fine-tuning;
    zeros shaped like ΔW for ``delta_w`` (the evaluator adds Σ λ ΔW onto W0)."""
    m0 = members[0]
    if m0.exp.spec.method == "full":
        return forward.full_trainable(m0.exp.tm), None
    if m0.exp.spec.method == DELTA_W:
        return jax.tree.map(jnp.zeros_like, m0.tv.tau), None
    # The exact linearization point the vectors were trained from.
    return m0.tv.phi0, m0.tv.phi0


def spec_for(spec: AdapterSpec, meta: dict) -> AdapterSpec:
    """The adapter spec that evaluates a task vector of ``meta`` on an experiment built with
    ``spec``: ``delta_w`` vectors run W0 + ΔW with no adapter; adapter-space vectors take the
    vector's own mode and LoRA scale (an imported one may differ from the config's α / r)."""
    kind = meta.get("adapter_kind")
    if kind == DELTA_W:
        return AdapterSpec(DELTA_W, spec.lora)
    if kind != "lora":
        return spec
    mode = meta.get("mode", spec.method)
    method = mode if mode in METHODS else spec.method
    if meta.get("scale") is None and not (meta.get("rank") and meta.get("alpha")):
        return AdapterSpec(method, spec.lora)  # no scale recorded: the config's α / r
    scale = meta_scale(meta)
    if isinstance(scale, dict):
        if len(set(scale.values())) != 1:
            raise TaskVectorError(
                f"task vector {meta.get('task')!r} has a different LoRA scale per layer "
                "(PEFT rank_pattern / alpha_pattern), which the fusion evaluator's adapter "
                "spec cannot express; import the adapter as a delta_w task vector instead"
            )
        scale = next(iter(scale.values()))
    lora = spec.lora
    if float(scale) != lora.scale:
        lora = dataclasses.replace(lora, alpha=float(scale) * lora.rank)
    return AdapterSpec(method, lora)


def make_member(exp: Experiment, tv: TaskVector, batch_size: int = 64) -> Member:
    """A fusion member of ``exp`` (built from a config, any method) and a task vector of any
    kind (trained here or imported). A vector without single-task scores in its metadata
    (imported ones) is evaluated alone (λ = 1) on validation and test first, so that
    normalized scores have their denominators."""
    member = Member(exp=dataclasses.replace(exp, spec=spec_for(exp.spec, tv.meta)), tv=tv)
    metrics = tv.meta.get("metrics") or {}
    if f"test/{exp.primary_metric}" in metrics and f"val/{exp.primary_metric}" in metrics:
        return member
    base, phi0 = base_vector([member])
    ev = member.grid(batch_size, 8)
    scores = dict(metrics)
    for split, prefix in (("validation", "val"), ("test", "test")):
        arrays = exp.arrays[split]
        preds = ev.predict(base, phi0, [tv.tau], np.ones((1, 1), np.float32), arrays, exp.tm)
        for k, v in exp.metric_fn(preds[0], arrays).items():
            scores[f"{prefix}/{k}"] = float(v)
    meta = {**tv.meta, "metrics": scores}
    return dataclasses.replace(member, tv=dataclasses.replace(tv, meta=meta))
