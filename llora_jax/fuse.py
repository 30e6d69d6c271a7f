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
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import evaluate as E
from llora_jax import fusion
from llora_jax import model as M
from llora_jax.experiment import Experiment
from llora_jax.task_vectors import TaskVector, check_compatible

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


_PROGRAMS: dict = {}


def _program(fn: Any, **static: Any) -> Any:
    """``jax.jit`` of ``fn`` with ``static`` keyword arguments fixed, one per setting.

    Run eagerly, a fusion method is hundreds of small per-leaf operations, each compiled
    for its own shape; compiled whole, it is one program per setting and input shapes.
    """
    key = (fn, tuple(sorted((k, repr(v)) for k, v in static.items())))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(fn, **static))
    return _PROGRAMS[key]


def merge(name: str, taus: list[PyTree], **hparams: Any) -> PyTree:
    """``fusion.get(name)(taus, **hparams)`` as one compiled program over the whole tree."""
    return _program(fusion.get(name), **hparams)(list(taus))


def _dropped(taus: list[PyTree], p: float, key: Any) -> PyTree:
    """DARE's drop-and-rescale of every task vector, stacked (n, ...); task i's mask is the
    one ``fusion.dare`` draws for position i."""
    out = fusion.drop_and_rescale(taus, fusion.random_masks(taus, p, key), p)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def _isolation_parts(taus: list[PyTree], masks: Any, p: float) -> PyTree:
    """Every subset's isolation core (S, ...), then its rest (S, ...), on one axis (2S, ...)."""
    core, rest = fusion.isolation_subsets(taus, masks, p)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), core, rest)


# A candidate row: (hparams, {index into the stacked vectors: coefficient}).
Row = tuple[dict, dict[int, float]]


def candidates(
    name: str, taus: list[PyTree], subsets: Sequence[Sequence[int]], fixed: dict, entries: list
) -> list[tuple[PyTree, list[list[Row]]]]:
    """The merged models of one group of settings (``fixed``, λ varying) for every subset.

    Returns [(vectors, rows)]: ``vectors`` stacked on a leading axis on the device, and
    ``rows[s]`` the candidates of subset s (indices into ``taus``), each the merged vector
    Σ_j c_j vectors[j]. Methods linear in per-task vectors (average, task arithmetic, DARE
    on task arithmetic) share one stack across all subsets; TIES and isolation merge every
    subset in one compiled program; any other method merges subset by subset.

    DARE: task i draws the mask that ``fusion.dare`` draws for position i of ``taus``, so a
    task's mask is the same in every subset (for the full set this *is* ``fusion.dare``).
    """
    n_sub = len(subsets)
    masks = np.zeros((n_sub, len(taus)), bool)
    for s, ix in enumerate(subsets):
        masks[s, list(ix)] = True
    scaled = all("lam" in e for e in entries)

    def each_task(vectors, coef):
        return [(vectors, [[(e, {i: coef(e, ix) for i in ix}) for e in entries] for ix in subsets])]

    if name == "average":
        return each_task(E.stack_vectors(taus), lambda e, ix: 1.0 / len(ix))
    if name == "task_arithmetic" and scaled:
        return each_task(E.stack_vectors(taus), lambda e, ix: float(e["lam"]))
    if (
        name == "dare"
        and scaled
        and set(fixed) <= {"p", "key", "base"}
        and fixed.get("base", "task_arithmetic") == "task_arithmetic"
    ):
        dropped = _program(_dropped, p=fixed["p"], key=fixed.get("key", 0))(taus)
        return each_task(dropped, lambda e, ix: float(e["lam"]))
    if name == "ties" and scaled and set(fixed) <= {"k"}:
        merged = _program(fusion.ties_subsets, **fixed, lam=1.0)(taus, masks)
        return [(merged, [[(e, {s: float(e["lam"])}) for e in entries] for s in range(n_sub)])]
    if name == "isolation" and scaled and set(fixed) == {"p"}:
        both = _program(_isolation_parts, **fixed)(taus, masks)
        return [
            (
                both,
                [
                    [(e, {s: 1.0, n_sub + s: float(e["lam"])}) for e in entries]
                    for s in range(n_sub)
                ],
            )
        ]
    out = []  # any other method (or setting): one merged vector per (entry, subset)
    for e in entries:
        vecs = E.stack_vectors([merge(name, [taus[i] for i in ix], **e) for ix in subsets])
        out.append((vecs, [[(e, {s: 1.0})] for s in range(n_sub)]))
    return out


def _primary(member: Member, preds: np.ndarray, split: str) -> float:
    arr = member.exp.arrays[split]
    return float(member.exp.metric_fn(preds, arr)[member.exp.primary_metric])


def _evaluate(members, subsets, base, phi0, bs, chunk, vectors, rows, split) -> list[np.ndarray]:
    """Per subset s, the (len(rows[s]), len(subsets[s])) primary scores of its rows' merged
    models on the ``split`` of each of its tasks.

    One grid per task: every row of every subset that contains the task, over the stacked
    vectors those rows use; all tasks are dispatched before the first is read back.
    """
    n_vec = jax.tree.leaves(vectors)[0].shape[0]
    pending = []
    for t, m in enumerate(members):
        subs = [s for s, ix in enumerate(subsets) if t in ix and rows[s]]
        if not subs:
            continue
        used = sorted({j for s in subs for _, coef in rows[s] for j in coef})
        lam = np.asarray(
            [[coef.get(j, 0.0) for j in used] for s in subs for _, coef in rows[s]], np.float32
        )
        vecs = vectors if len(used) == n_vec else _take(vectors, np.asarray(used))
        get = m.grid(bs, chunk).start(base, phi0, vecs, lam, m.exp.arrays[split], m.exp.tm)
        pending.append((t, subs, get))
    out = [np.full((len(r), len(ix)), np.nan) for r, ix in zip(rows, subsets)]
    for t, subs, get in pending:
        preds = iter(get())
        for s in subs:
            j = list(subsets[s]).index(t)
            for k in range(len(rows[s])):
                out[s][k, j] = _primary(members[t], next(preds), split)
    return out


@jax.jit
def _take(vectors: PyTree, index: jax.Array) -> PyTree:
    return jax.tree.map(lambda v: v[index], vectors)


def _base(members: Sequence[Member]) -> tuple[PyTree, PyTree | None]:
    """(base, φ0): φ0 for adapters; θ0 restricted to what trained for full fine-tuning."""
    m0 = members[0]
    if m0.exp.spec.method == "full":
        return M.full_trainable(m0.exp.tm), None
    # The exact linearization point the vectors were trained from.
    return m0.tv.phi0, m0.tv.phi0


def fuse_subset(members: Sequence[Member], name: str, **kwargs: Any) -> dict:
    """Choose ``name``'s hyper-parameters on validation for these tasks, score on test.

    ``fuse_subsets`` with the one subset of all ``members``; same keyword arguments."""
    tasks = [m.task for m in members]
    return fuse_subsets(members, name, [tasks], **kwargs)[subset_key(tasks)]


def fuse_subsets(
    members: Sequence[Member],
    name: str,
    subsets: Sequence[Sequence[str]] | None = None,
    *,
    grid: Sequence[dict] | None = None,
    batch_size: int = 64,
    chunk: int = 8,
    lorahub_budget: int = 40,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """For every subset of the members' tasks, choose ``name``'s hyper-parameters on
    validation and score the choice on test: {subset_key: record}.

    All subsets are searched together: each task evaluates, in one grid, every candidate
    of every subset that contains it (one grid per group of settings that differ only in
    λ), so a study's 57 subsets of 6 tasks cost a few large dispatches, not thousands of
    small ones. ``subsets``: lists of task names (default: the one subset of all members).
    """
    from tqdm.auto import tqdm

    check_compatible([m.tv for m in members])
    tasks = [m.task for m in members]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"members must be distinct tasks, got {tasks}")
    subsets = [list(s) for s in (subsets if subsets is not None else [tasks])]
    for sub in subsets:
        unknown = [t for t in sub if t not in tasks]
        if not sub or unknown or len(set(sub)) != len(sub):
            raise ValueError(
                f"subset {sub} must be a non-empty set of the members' tasks {tasks}"
                + (f" (unknown: {unknown})" if unknown else "")
            )
    index = [sorted(tasks.index(t) for t in sub) for sub in subsets]
    taus = [m.tv.tau for m in members]
    base, phi0 = _base(members)
    evaluate = functools.partial(_evaluate, members, index, base, phi0, batch_size, chunk)
    if name == "lorahub":
        budget = lorahub_budget
        bar = tqdm(total=budget, desc=f"{name} ({len(index)} subsets)", disable=not progress)
        found = _lorahub(evaluate, members, index, taus, budget, seed, bar)
    else:
        groups = _groups(name, list(grid if grid is not None else fusion.hparam_grid(name)))
        bar = tqdm(total=len(groups), desc=f"{name} ({len(index)} subsets)", disable=not progress)
        found = _search(evaluate, index, taus, name, groups, bar)
    bar.close()
    out = {}
    for sub, ix, (hp, val, test) in zip(subsets, index, found):
        key = subset_key(sub)
        out[key] = _record([members[i] for i in ix], [tasks[i] for i in ix], hp, val, test)
    return out


def _search(evaluate, index, taus, name, groups, bar) -> list[tuple]:
    """Validation selection over the groups; then test scores of each subset's choice."""
    best: list = [None] * len(index)  # (mean val, (group, candidate), row, val scores)
    for g, (fixed, entries) in enumerate(groups):
        for c, (vectors, rows) in enumerate(candidates(name, taus, index, fixed, entries)):
            val = evaluate(vectors, rows, "validation")
            for s, v in enumerate(val):
                means = np.nan_to_num(v.mean(axis=1), nan=-np.inf)  # undefined never wins
                k = int(np.argmax(means))
                if best[s] is None or means[k] > best[s][0]:
                    best[s] = (float(means[k]), (g, c), rows[s][k], v[k])
        bar.update()
    tests: list = [None] * len(index)
    for g, (fixed, entries) in enumerate(groups):  # rebuilt: one group's vectors at a time
        chosen = [s for s in range(len(index)) if best[s][1][0] == g]
        if not chosen:
            continue
        for c, (vectors, _) in enumerate(candidates(name, taus, index, fixed, entries)):
            rows = [
                [best[s][2]] if s in chosen and best[s][1][1] == c else []
                for s in range(len(index))
            ]
            if any(rows):
                test = evaluate(vectors, rows, "test")
                for s in range(len(index)):
                    if rows[s]:
                        tests[s] = test[s][0]
    return [(b[2][0], b[3], t) for b, t in zip(best, tests)]


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


def _lorahub(evaluate, members, index, taus, budget, seed, bar) -> list[tuple]:
    """One LoraHub search per subset, run in lockstep: each round evaluates every search's
    proposal in one grid per task. Each search is still the sequential one of
    ``fusion.lorahub`` (its own seeded optimizer, one proposal at a time)."""
    names = [m.task for m in members]
    vectors = E.stack_vectors(taus)
    searches = [fusion.LorahubSearch(len(ix), budget=budget, seed=seed) for ix in index]
    scores: list[list[np.ndarray]] = [[] for _ in index]
    try:
        for _ in range(budget):
            rows = [[({}, dict(zip(ix, map(float, x.ask()))))] for ix, x in zip(index, searches)]
            val = evaluate(vectors, rows, "validation")
            for x, v, kept in zip(searches, val, scores):
                x.tell(1.0 - float(np.mean(v[0])))
                kept.append(v[0])
            bar.update()
    finally:
        for x in searches:
            x.close()
    best = [x.best_index() for x in searches]
    weights = [x.history[b]["weights"] for x, b in zip(searches, best)]
    rows = [[({}, dict(zip(ix, map(float, w))))] for ix, w in zip(index, weights)]
    test = evaluate(vectors, rows, "test")
    return [
        ({f"w_{names[i]}": float(wi) for i, wi in zip(ix, w)}, kept[b], t[0])
        for ix, w, kept, b, t in zip(index, weights, scores, best, test)
    ]


def subsets(tasks: Sequence[str], min_size: int = 2, max_size: int | None = None) -> list[tuple]:
    """Every subset of ``tasks`` with min_size..max_size elements, in a stable order."""
    max_size = max_size or len(tasks)
    return [c for r in range(min_size, max_size + 1) for c in itertools.combinations(tasks, r)]


def subset_key(tasks: Sequence[str]) -> str:
    return "+".join(sorted(tasks))
