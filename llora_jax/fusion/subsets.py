"""Which subsets of tasks a study merges: all of them up to a size, a seeded sample above.

With n tasks there are 2^n subsets (a million at n = 20), so a study that scales in the
number of tasks enumerates every subset of a small size exhaustively and samples S
subsets of each larger size. The plan is a pure function of (task names, sizes,
``exhaustive_up_to``, ``per_size``, ``seed``): every fusion method and every fine-tuning
method of a study that passes the same arguments merges exactly the same subsets, so
their scores are paired.

Canonical form: task names are sorted first, so listing the same tasks in another order
gives the same plan; each subset is a tuple of names in sorted order; subsets come by
size, then in ``itertools.combinations`` order (exhaustive sizes) or in sampled order.
Each sampled size draws from its own generator ``numpy.random.default_rng([seed, size])``,
so adding or removing a size never changes the subsets of another.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["DEFAULT_LIMIT", "plan_counts", "plan_subsets", "subset_masks"]

# A plan larger than this is refused unless the caller raises ``limit`` on purpose.
DEFAULT_LIMIT = 5000


def _canonical(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a list of task names (strings), got {tasks!r}")
    dupes = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if dupes:
        raise ValueError(f"task names must be distinct; repeated: {dupes}")
    if len(tasks) == 0:
        raise ValueError("no tasks given: name the study's tasks explicitly")
    return sorted(tasks)


def _sizes(sizes: Iterable[int] | None, n: int) -> list[int]:
    out = sorted(set(range(2, n + 1) if sizes is None else sizes))
    bad = [k for k in out if isinstance(k, bool) or not isinstance(k, (int, np.integer))]
    bad += [k for k in out if k not in bad and not 1 <= k <= n]
    if bad:
        raise ValueError(
            f"subset sizes must be integers in 1..{n} (the number of tasks), got {bad}"
        )
    return [int(k) for k in out]


def plan_counts(
    n: int, sizes: Iterable[int] | None, *, exhaustive_up_to: int, per_size: int
) -> dict[int, int]:
    """{size: number of subsets the plan holds}, computed without enumerating anything.

    A size k <= ``exhaustive_up_to`` holds all C(n, k) subsets; a larger size holds
    min(``per_size``, C(n, k)) (all of them when there are no more than S).
    """
    if isinstance(per_size, bool) or not isinstance(per_size, int) or per_size < 1:
        raise ValueError(
            f"per_size (S, sampled subsets per size) must be an int >= 1, got {per_size!r}"
        )
    if isinstance(exhaustive_up_to, bool) or not isinstance(exhaustive_up_to, int):
        raise ValueError(f"exhaustive_up_to must be an int, got {exhaustive_up_to!r}")
    return {
        k: math.comb(n, k) if k <= exhaustive_up_to else min(per_size, math.comb(n, k))
        for k in _sizes(sizes, n)
    }


def _sample(tasks: list[str], k: int, count: int, seed: int) -> list[tuple[str, ...]]:
    """``count`` distinct k-subsets, seeded by (seed, k), in draw order."""
    rng = np.random.default_rng([seed, k])
    total = math.comb(len(tasks), k)
    if count >= total:
        return list(itertools.combinations(tasks, k))
    if total <= 2 * count:  # dense: choose among all of them (few, as total <= 2·count)
        every = list(itertools.combinations(tasks, k))
        return [every[i] for i in rng.choice(total, size=count, replace=False)]
    # Sparse: rejection of repeats; each draw is new with probability >= 1/2.
    seen: dict[tuple[str, ...], None] = {}
    while len(seen) < count:
        pick = tuple(tasks[i] for i in sorted(rng.choice(len(tasks), size=k, replace=False)))
        seen.setdefault(pick, None)
    return list(seen)


def plan_subsets(
    tasks: Sequence[str],
    sizes: Iterable[int] | None = None,
    *,
    exhaustive_up_to: int,
    per_size: int,
    seed: int,
    limit: int = DEFAULT_LIMIT,
) -> list[tuple[str, ...]]:
    """The subsets a study merges: every subset of size <= ``exhaustive_up_to``, and
    ``per_size`` (S) distinct subsets sampled uniformly (seed ``[seed, size]``) of each
    larger size. ``sizes``: which subset sizes (default 2..n).

    Raises ``ValueError`` before enumerating anything when the plan would hold more than
    ``limit`` subsets (e.g. every subset of 20 tasks, about a million), naming the count
    and how to shrink it.
    """
    names = _canonical(tasks)
    counts = plan_counts(len(names), sizes, exhaustive_up_to=exhaustive_up_to, per_size=per_size)
    total = sum(counts.values())
    if total > limit:
        worst = max(counts, key=counts.get)
        raise ValueError(
            f"the subset plan for {len(names)} tasks holds {total:,} subsets (size {worst}: "
            f"{counts[worst]:,}), more than limit={limit:,}: lower exhaustive_up_to "
            f"(now {exhaustive_up_to}) so that larger sizes are sampled (per_size={per_size} "
            "each), name fewer tasks or sizes, or raise limit if you mean it"
        )
    out: list[tuple[str, ...]] = []
    for k, count in counts.items():
        if k <= exhaustive_up_to:
            out.extend(itertools.combinations(names, k))
        else:
            out.extend(_sample(names, k, count, seed))
    return out


def subset_masks(tasks: Sequence[str], subsets: Sequence[Sequence[str]]) -> np.ndarray:
    """Boolean (S, n) masks: row s marks which of ``tasks`` (in the given order) subset s holds."""
    col = {t: i for i, t in enumerate(tasks)}
    masks = np.zeros((len(subsets), len(tasks)), bool)
    for s, sub in enumerate(subsets):
        unknown = [t for t in sub if t not in col]
        if unknown:
            raise ValueError(f"subset {list(sub)} names tasks not in {list(tasks)}: {unknown}")
        masks[s, [col[t] for t in sub]] = True
    return masks
