"""Which subsets of a study's tasks every fusion (and the multi-task baseline) runs on.

The plan is ``fusion.subsets.plan_subsets`` of the study's tasks: every subset of a size
up to ``exhaustive_up_to`` and ``subsets_per_size`` sampled subsets of each larger size,
drawn with ``subset_seed`` (default: the block's fine-tuning seed, so each seed has its
own sample, shared by every method, rank and fusion of that seed). The defaults
(``exhaustive_up_to=None``, no ``subset_sizes``) give every subset of 2..n (or
2..``max_subset``) in today's order: by size, then ``itertools.combinations`` of the
tasks in the order the study lists them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from llora_jax.fusion.subsets import plan_subsets
from llora_jax.study.spec import StudySpec


def subset_sizes(s: StudySpec, n_tasks: int) -> list[int]:
    """The subset sizes of study ``s`` with ``n_tasks`` tasks (ascending)."""
    if s.subset_sizes:
        return sorted({int(k) for k in s.subset_sizes})
    return list(range(2, (int(s.max_subset) or n_tasks) + 1))


def study_subsets(s: StudySpec, tasks: Sequence[str], seed: int) -> list[tuple[str, ...]]:
    """Every subset the study merges for fine-tuning seed ``seed``, each a tuple of task
    names in the study's task order; the same for every method and fusion."""
    tasks = list(tasks)
    sizes = subset_sizes(s, len(tasks))
    every = max(sizes) if s.exhaustive_up_to is None else int(s.exhaustive_up_to)
    plan_seed = int(seed) if s.subset_seed is None else int(s.subset_seed)
    plan = plan_subsets(
        tasks, sizes, exhaustive_up_to=every, per_size=int(s.subsets_per_size), seed=plan_seed
    )
    position = {t: i for i, t in enumerate(tasks)}
    out: list[tuple[str, ...]] = []
    for k in sizes:
        if k <= every:  # the same set as the plan's, in the study's task order
            out.extend(itertools.combinations(tasks, k))
        else:
            out.extend(tuple(sorted(sub, key=position.get)) for sub in plan if len(sub) == k)
    return out


def first_per_size(subsets: Sequence[Sequence[str]], count: int) -> list[tuple[str, ...]]:
    """The first ``count`` subsets of each size of a plan (the multi-task baseline's)."""
    out: list[tuple[str, ...]] = []
    for k in sorted({len(x) for x in subsets}):
        out.extend(tuple(x) for x in [x for x in subsets if len(x) == k][:count])
    return out
