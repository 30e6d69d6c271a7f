"""Merge task vectors, choose hyper-parameters on validation, score on test.

For every subset of tasks and every fusion method, each hyper-parameter
setting becomes a merged task vector; all settings that differ only in λ are
evaluated as one batched grid (TIES(k)·λ, DARE(p)·λ, TA·λ, isolation: core + λ·rest),
on the validation split of every task in the subset. The setting with the
best mean validation score is then scored once on test. Normalized score =
merged test score ÷ the task's own fine-tuned model's test score (same
fine-tuning method, same seed), as the paper reports.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from llora_jax import evaluate as E
from llora_jax import fusion
from llora_jax import model as M
from llora_jax import tree as T
from llora_jax.experiment import Experiment
from llora_jax.task_vectors import TaskVector, check_compatible

PyTree = Any

# Methods whose merged vector is λ · m(other hparams): one vector per group, λ as coefficient.
_SCALED = ("task_arithmetic", "ties", "dare")


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

    def grid(self, batch_size: int, chunk: int) -> E.GridEvaluator:
        # Not cached on the member: callers may ask for different chunks.
        return shared_evaluator(self.exp.tm, self.exp.spec, batch_size, chunk)


_EVALUATORS: dict = {}


def shared_evaluator(tm: Any, spec: Any, batch_size: int, chunk: int) -> E.GridEvaluator:
    """One evaluator (and so one set of compiled programs) per distinct model function.

    Members of different seeds — and of different tasks whose readout is the same
    function — evaluate the same program with different arguments; sharing the
    jitted function avoids recompiling it for each of them.
    """
    key = (*M.functions_key(tm, spec), batch_size, chunk)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = E.GridEvaluator(tm, spec, batch_size, chunk)
    return _EVALUATORS[key]


def _groups(name: str, grid: Sequence[dict]) -> list[tuple[dict, list[dict]]]:
    """Group grid entries by everything but λ: [(fixed hparams, [entries...])]."""
    out: dict[tuple, tuple[dict, list[dict]]] = {}
    for hp in grid:
        fixed = {k: v for k, v in hp.items() if k != "lam"}
        key = tuple(sorted((k, repr(v)) for k, v in fixed.items()))
        out.setdefault(key, (fixed, []))[1].append(hp)
    return list(out.values())


_MERGES: dict = {}


def merge(name: str, taus: list[PyTree], **hparams: Any) -> PyTree:
    """``fusion.get(name)(taus, **hparams)`` as one compiled program over the whole tree.

    The hyper-parameters are static (one program per setting and number of tasks). Run
    eagerly, a method is hundreds of small per-leaf operations, each compiled for its
    own shape; a study that merges every subset would spend minutes compiling them.
    """
    key = (name, tuple(sorted((k, repr(v)) for k, v in hparams.items())))
    if key not in _MERGES:
        fn = fusion.get(name)
        _MERGES[key] = jax.jit(lambda ts: fn(ts, **hparams))
    return _MERGES[key](list(taus))


def candidates(name: str, taus: list[PyTree], grid: Sequence[dict]):
    """Yield (vectors, rows) where rows = [(hparams, coefficients over vectors)]."""
    for fixed, entries in _groups(name, grid):
        if name == "average":
            yield [merge(name, taus)], [({}, [1.0])]
        elif name in _SCALED and all("lam" in e for e in entries):
            m = merge(name, taus, **fixed, lam=1.0)
            yield [m], [(e, [float(e["lam"])]) for e in entries]
        elif name == "isolation" and all("lam" in e for e in entries):
            core = merge(name, taus, **fixed, lam=0.0)
            rest = T.sub(merge(name, taus, **fixed, lam=1.0), core)
            yield [core, rest], [(e, [1.0, float(e["lam"])]) for e in entries]
        else:  # any other registered method: one merged vector per entry
            vecs = [merge(name, taus, **e) for e in entries]
            yield vecs, [(e, list(np.eye(len(vecs))[i])) for i, e in enumerate(entries)]


def _primary(member: Member, preds: np.ndarray, split: str) -> float:
    arr = member.exp.arrays[split]
    return float(member.exp.metric_fn(preds, arr)[member.exp.primary_metric])


def _scores(members, base, phi0, vectors, rows, split, bs, chunk, stacks=None) -> np.ndarray:
    """(K, n_tasks) primary scores of each row's merged model on each member's split.

    ``stacks``: a dict kept by a caller that scores the same ``vectors`` many times
    (LoraHub), so they are stacked on the device once, not once per call."""
    lam = np.asarray([r for _, r in rows], np.float32)
    out = np.zeros((len(rows), len(members)))
    stacks = {} if stacks is None else stacks  # one device copy per evaluator, not per member
    pending = []
    for m in members:
        ev = m.grid(bs, chunk)
        if id(ev) not in stacks:
            stacks[id(ev)] = ev.stack(vectors)
        pending.append(ev.start(base, phi0, stacks[id(ev)], lam, m.exp.arrays[split], m.exp.tm))
    # Every task's evaluation is dispatched before the first is read back.
    for j, (m, get) in enumerate(zip(members, pending)):
        out[:, j] = [_primary(m, p, split) for p in get()]
    return out


def _base(members: Sequence[Member]) -> tuple[PyTree, PyTree | None]:
    """(base, φ0): φ0 for adapters; θ0 restricted to what trained for full fine-tuning."""
    m0 = members[0]
    if m0.exp.spec.method == "full":
        return M.full_trainable(m0.exp.tm), None
    # The exact linearization point the vectors were trained from.
    return m0.tv.phi0, m0.tv.phi0


def fuse_subset(
    members: Sequence[Member],
    name: str,
    *,
    grid: Sequence[dict] | None = None,
    batch_size: int = 64,
    chunk: int = 8,
    lorahub_budget: int = 40,
    seed: int = 0,
) -> dict:
    """Choose ``name``'s hyper-parameters on validation for these tasks, score on test."""
    check_compatible([m.tv for m in members])
    taus = [m.tv.tau for m in members]
    base, phi0 = _base(members)
    tasks = [m.task for m in members]
    if name == "lorahub":
        return _lorahub(members, taus, base, phi0, batch_size, chunk, lorahub_budget, seed)
    grid = list(grid if grid is not None else fusion.hparam_grid(name))
    best = None
    for vectors, rows in candidates(name, taus, grid):
        val = _scores(members, base, phi0, vectors, rows, "validation", batch_size, chunk)
        means = np.nan_to_num(val.mean(axis=1), nan=-np.inf)  # an undefined score never wins
        k = int(np.argmax(means))
        if best is None or means[k] > best[0]:
            best = (float(means[k]), vectors, rows[k], val[k])
    _, vectors, row, val_scores = best
    test = _scores(members, base, phi0, vectors, [row], "test", batch_size, chunk)[0]
    return _record(members, tasks, row[0], val_scores, test)


def _record(members, tasks, hparams, val_scores, test_scores) -> dict:
    norm = [t / max(m.single_score("test"), 1e-12) for t, m in zip(test_scores, members)]
    return {
        "hparams": {
            k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
            for k, v in hparams.items()
        },
        "val": dict(zip(tasks, map(float, val_scores))),
        "test": dict(zip(tasks, map(float, test_scores))),
        "test_normalized": dict(zip(tasks, map(float, norm))),
        "avg_test": float(np.mean(test_scores)),
        "avg_normalized": float(np.mean(norm)),
    }


def _lorahub(members, taus, base, phi0, bs, chunk, budget, seed) -> dict:
    tasks = [m.task for m in members]
    stacks: dict = {}  # the same vectors in every evaluation: stacked once

    def objective(w: np.ndarray) -> float:
        row = [({}, list(w))]
        val = _scores(members, base, phi0, taus, row, "validation", bs, chunk, stacks)[0]
        return 1.0 - float(np.mean(val))

    # Scored from the weights: the merged τ itself is never needed here.
    _, weights, _ = fusion.lorahub(taus, objective, budget=budget, seed=seed, merge=False)
    row = ({f"w_{t}": float(w) for t, w in zip(tasks, weights)}, list(map(float, weights)))
    val = _scores(members, base, phi0, taus, [row], "validation", bs, chunk, stacks)[0]
    test = _scores(members, base, phi0, taus, [row], "test", bs, chunk, stacks)[0]
    return _record(members, tasks, row[0], val, test)


def subsets(tasks: Sequence[str], min_size: int = 2, max_size: int | None = None) -> list[tuple]:
    """Every subset of ``tasks`` with min_size..max_size elements, in a stable order."""
    max_size = max_size or len(tasks)
    return [c for r in range(min_size, max_size + 1) for c in itertools.combinations(tasks, r)]


def subset_key(tasks: Sequence[str]) -> str:
    return "+".join(sorted(tasks))
