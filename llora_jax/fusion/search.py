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

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from llora_jax import fusion
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion import isolation_pipeline as pipeline
from llora_jax.fusion import pipeline_grid, programs
from llora_jax.fusion.common import keep_count, num_elements
from llora_jax.fusion.dare import check_p as dare_check_p
from llora_jax.fusion.lorahub import quiet as lorahub_quiet
from llora_jax.fusion.programs import Member
from llora_jax.fusion.ties import DEFAULT_K as TIES_DEFAULT_K
from llora_jax.task_vectors import check_compatible

PyTree = Any


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
        return each_task(grid_eval.stack_vectors(taus), lambda e, ix: 1.0 / len(ix))
    if name == "task_arithmetic" and scaled:
        return each_task(grid_eval.stack_vectors(taus), lambda e, ix: float(e["lam"]))
    if (
        name == "dare"
        and scaled
        and set(fixed) <= {"p", "key", "base"}
        and fixed.get("base", "task_arithmetic") == "task_arithmetic"
    ):
        dare_check_p(fixed["p"])  # p is traced below: checked here
        dropped = programs.program(programs.dropped, key=fixed.get("key", 0))(
            taus, np.float32(fixed["p"])
        )
        return each_task(dropped, lambda e, ix: float(e["lam"]))
    if name == "ties" and scaled and set(fixed) <= {"k"}:
        k = fixed.get("k", TIES_DEFAULT_K)
        m = keep_count(k, num_elements(taus[0]), "k")  # traced: one program for every k
        merged = programs.program(programs.ties_of_count)(taus, masks, np.int32(m))
        return [(merged, [[(e, {s: float(e["lam"])}) for e in entries] for s in range(n_sub)])]
    if name == "isolation" and scaled and set(fixed) == {"p"}:
        both = programs.program(programs.isolation_parts, **fixed)(taus, masks)
        return [
            (
                both,
                [
                    [(e, {s: 1.0, n_sub + s: float(e["lam"])}) for e in entries]
                    for s in range(n_sub)
                ],
            )
        ]
    if name == pipeline.NAME:
        if not scaled or set(fixed) != {"p", "threshold"}:
            raise ValueError(
                f"{pipeline.NAME} grid entries need exactly p, threshold and lam, got "
                f"{sorted(fixed) + (['lam'] if scaled else [])}"
            )
        both, _ = pipeline_grid.pipeline_subsets(taus, subsets, fixed["p"], fixed["threshold"])
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
        vecs = grid_eval.stack_vectors(
            [programs.merge(name, [taus[i] for i in ix], **e) for ix in subsets]
        )
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
    return _start_evaluation(members, subsets, base, phi0, bs, chunk, vectors, rows, split)()


def _start_evaluation(
    members, subsets, base, phi0, bs, chunk, vectors, rows, split
) -> Callable[[], list[np.ndarray]]:
    """``_evaluate``, dispatched: returns the function that reads back and scores."""
    n_vec = jax.tree.leaves(vectors)[0].shape[0]
    pending, padded = [], {}
    for t, m in enumerate(members):
        subs = [s for s, ix in enumerate(subsets) if t in ix and rows[s]]
        if not subs:
            continue
        ev = m.grid(bs, chunk)
        used = sorted({j for s in subs for _, coef in rows[s] for j in coef})
        size = ev.stack_size(len(used))  # padded: one compiled program for every grid
        col = {j: q for q, j in enumerate(used)}
        lam = np.zeros((sum(len(rows[s]) for s in subs), size), np.float32)
        for r, coef in enumerate(coef for s in subs for _, coef in rows[s]):
            for j, c in coef.items():
                lam[r, col[j]] = c
        if used == list(range(n_vec)) and size == n_vec:
            vecs = vectors
        elif used == list(range(n_vec)) and size in padded:  # every task's: padded once
            vecs = padded[size]
        else:
            index = np.zeros(size, np.int32)
            index[: len(used)] = used
            vecs = _take(vectors, index, np.arange(size) < len(used))
            if used == list(range(n_vec)):
                padded[size] = vecs
        # Identical rows (e.g. λ = 0 of every subset: the base model) are evaluated once.
        uniq, again = np.unique(lam, axis=0, return_inverse=True)
        get = ev.start(base, phi0, vecs, uniq, m.exp.arrays[split], m.exp.tm)
        pending.append((t, subs, get, again.reshape(-1)))

    def finish() -> list[np.ndarray]:
        out = [np.full((len(r), len(ix)), np.nan) for r, ix in zip(rows, subsets)]
        for t, subs, get, again in pending:
            preds = iter(get()[again])
            for s in subs:
                j = list(subsets[s]).index(t)
                for k in range(len(rows[s])):
                    out[s][k, j] = _primary(members[t], next(preds), split)
        return out

    return finish


def _rows_axis(mask: jax.Array, like: jax.Array) -> jax.Array:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


@jax.jit
def _take(vectors: PyTree, index: jax.Array, keep: jax.Array) -> PyTree:
    """vectors[index], with zero vectors where ``keep`` is False."""
    return jax.tree.map(lambda v: jnp.where(_rows_axis(keep, v), v[index], 0), vectors)


@jax.jit
def _combine(vectors: PyTree, coef: jax.Array) -> PyTree:
    """(S, ...) merged vectors Σ_j coef[s, j] vectors[j]."""
    return jax.tree.map(
        lambda v: jnp.tensordot(coef, v.astype(jnp.float32), axes=1).astype(v.dtype), vectors
    )


@jax.jit
def _replace(old: PyTree, new: PyTree, which: jax.Array) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(_rows_axis(which, a), b, a), old, new)


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
    timings: dict | None = None,
) -> dict[str, dict]:
    """For every subset of the members' tasks, choose ``name``'s hyper-parameters on
    validation and score the choice on test: {subset_key: record}.

    All subsets are searched together: each task evaluates, in one grid, every candidate
    of every subset that contains it (one grid per group of settings that differ only in
    λ), so a study's 57 subsets of 6 tasks cost a few large dispatches, not thousands of
    small ones. ``subsets``: lists of task names (default: the one subset of all members).
    ``timings``: a dict that receives "merging_s", the seconds spent building merged vectors
    (compiles included; the rest is evaluation and host work).
    """

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
    base, phi0 = programs.base_vector(members)
    args = (members, index, base, phi0, batch_size, chunk)
    evaluate = functools.partial(_evaluate, *args)
    if name == "lorahub":
        budget = lorahub_budget
        bar = tqdm(total=budget, desc=f"{name} ({len(index)} subsets)", disable=not progress)
        start = functools.partial(_start_evaluation, *args)
        found = _lorahub(start, members, index, taus, budget, seed, bar)
    else:
        groups = programs.hparam_groups(
            name, list(grid if grid is not None else default_grid(name))
        )
        bar = tqdm(total=len(groups), desc=f"{name} ({len(index)} subsets)", disable=not progress)
        found = _search(evaluate, index, taus, name, groups, bar, timings)
    bar.close()
    out = {}
    for sub, ix, (hp, val, test) in zip(subsets, index, found):
        key = subset_key(sub)
        out[key] = _record([members[i] for i in ix], [tasks[i] for i in ix], hp, val, test)
    return out


def _search(evaluate, index, taus, name, groups, bar, timings=None) -> list[tuple]:
    """Validation selection over the groups; then test scores of each subset's choice.

    Each subset's best merged vector so far is kept on the device (S, ...), so the test
    split is scored once, in one grid per task, whatever group each choice came from."""
    n_sub = len(index)
    best: list = [None] * n_sub  # (mean val, row, val scores)
    chosen = None  # (S, ...): the merged vector of each subset's best row
    merging = 0.0
    for fixed, entries in groups:
        t0 = time.perf_counter()
        built = candidates(name, taus, index, fixed, entries)
        jax.block_until_ready([v for v, _ in built])
        merging += time.perf_counter() - t0
        for vectors, rows in built:
            val = evaluate(vectors, rows, "validation")
            coef = np.zeros((n_sub, jax.tree.leaves(vectors)[0].shape[0]), np.float32)
            better = np.zeros(n_sub, bool)
            for s, v in enumerate(val):
                means = np.nan_to_num(v.mean(axis=1), nan=-np.inf)  # undefined never wins
                k = int(np.argmax(means))
                if best[s] is None or means[k] > best[s][0]:
                    best[s] = (float(means[k]), rows[s][k], v[k])
                    better[s] = True
                    for j, c in rows[s][k][1].items():
                        coef[s, j] = c
            new = _combine(vectors, coef)
            chosen = new if chosen is None else _replace(chosen, new, better)
        bar.update()
    if timings is not None:
        timings["merging_s"] = merging
    test = evaluate(chosen, [[({}, {s: 1.0})] for s in range(n_sub)], "test")
    return [(b[1][0], b[2], t[0]) for b, t in zip(best, test)]


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


def _lorahub(start, members, index, taus, budget, seed, bar) -> list[tuple]:
    """One LoraHub search per subset, run in lockstep: each round evaluates every search's
    proposal in one grid per task. Each search is still the sequential one of
    ``fusion.lorahub`` (its own seeded optimizer, one proposal at a time).

    The searches run in two interleaved halves: while the device evaluates one half's
    proposals, the host tells the other half its scores and asks its next proposals
    (nevergrad's optimizers cost host time comparable to the models' device time).
    Every search sees the same sequence as alone, so the results do not change."""
    names = [m.task for m in members]
    vectors = grid_eval.stack_vectors(taus)
    searches = [fusion.LorahubSearch(len(ix), budget=budget, seed=seed) for ix in index]
    scores: list[list[np.ndarray]] = [[] for _ in index]
    halves = [h for h in (range(0, len(index), 2), range(1, len(index), 2)) if len(h)]

    def ask(half) -> Callable[[], list[np.ndarray]]:
        rows: list[list[Row]] = [[] for _ in index]
        for s in half:
            rows[s] = [({}, dict(zip(index[s], map(float, searches[s].ask()))))]
        return start(vectors, rows, "validation")

    try:
        with lorahub_quiet():
            pending = [ask(h) for h in halves]
            for r in range(budget):
                for i, half in enumerate(halves):
                    val = pending[i]()
                    for s in half:
                        searches[s].tell(1.0 - float(np.mean(val[s][0])))
                        scores[s].append(val[s][0])
                    if r + 1 < budget:
                        pending[i] = ask(half)
                bar.update()
    finally:
        for x in searches:
            x.close()
    best = [x.best_index() for x in searches]
    weights = [x.history[b]["weights"] for x, b in zip(searches, best)]
    rows = [[({}, dict(zip(ix, map(float, w))))] for ix, w in zip(index, weights)]
    test = start(vectors, rows, "test")()
    return [
        ({f"w_{names[i]}": float(wi) for i, wi in zip(ix, w)}, kept[b], t[0])
        for ix, w, kept, b, t in zip(index, weights, scores, best, test)
    ]


def default_grid(name: str) -> list[dict]:
    """A fusion method's default grid (the registry's, or the isolation pipeline's)."""
    return pipeline.hparam_grid() if name == pipeline.NAME else fusion.hparam_grid(name)


def subsets(tasks: Sequence[str], min_size: int = 2, max_size: int | None = None) -> list[tuple]:
    """Every subset of ``tasks`` with min_size..max_size elements, in a stable order."""
    max_size = max_size or len(tasks)
    return [c for r in range(min_size, max_size + 1) for c in itertools.combinations(tasks, r)]


def subset_key(tasks: Sequence[str]) -> str:
    return "+".join(sorted(tasks))
