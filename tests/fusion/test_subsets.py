"""Subset plans: exhaustive part = itertools, seeded samples, shared by every method."""

import itertools
import math

import numpy as np
import pytest

from llora_jax.fusion.subsets import plan_counts, plan_subsets, subset_masks

TASKS20 = [f"t{i:02d}" for i in range(20)]


def test_exhaustive_part_equals_itertools():
    tasks = ["sst2", "cola", "mrpc", "rte", "qqp", "stsb"]
    got = plan_subsets(tasks, exhaustive_up_to=6, per_size=3, seed=0)
    want = [c for k in range(2, 7) for c in itertools.combinations(sorted(tasks), k)]
    assert got == want  # the same list (order included) as today's fuse.subsets
    assert len(got) == 57


def test_counts_and_sampled_sizes():
    plan = plan_subsets(TASKS20, [2, 3, 7, 10, 20], exhaustive_up_to=3, per_size=5, seed=1)
    sizes = [len(s) for s in plan]
    counts = {k: sizes.count(k) for k in set(sizes)}
    assert counts == {2: 190, 3: 1140, 7: 5, 10: 5, 20: 1}
    assert counts == plan_counts(20, [2, 3, 7, 10, 20], exhaustive_up_to=3, per_size=5)
    assert len(set(plan)) == len(plan)  # distinct
    assert all(list(s) == sorted(s) and set(s) <= set(TASKS20) for s in plan)


def test_dense_sampling_draws_distinct_subsets():
    # C(6, 3) = 20 <= 2·12: chosen among all of them, without repeats.
    plan = plan_subsets(list("abcdef"), [3], exhaustive_up_to=2, per_size=12, seed=4)
    assert len(plan) == len(set(plan)) == 12
    assert set(plan) <= set(itertools.combinations("abcdef", 3))


def test_deterministic_and_shared_across_methods():
    args = dict(exhaustive_up_to=2, per_size=4, seed=7)
    # Two methods' loops ask for their plans independently, tasks listed in other orders.
    per_method = {
        m: plan_subsets(list(reversed(TASKS20)) if m == "ties" else TASKS20, [2, 5, 9], **args)
        for m in ("task_arithmetic", "ties", "isolation_pipeline")
    }
    first = per_method["task_arithmetic"]
    assert all(p == first for p in per_method.values())
    assert plan_subsets(TASKS20, [2, 5, 9], **{**args, "seed": 8}) != first


def test_a_size_sample_does_not_depend_on_other_sizes():
    a = plan_subsets(TASKS20, [5], exhaustive_up_to=1, per_size=6, seed=3)
    b = plan_subsets(TASKS20, [2, 5, 9], exhaustive_up_to=1, per_size=6, seed=3)
    assert [s for s in b if len(s) == 5] == a


def test_sampling_is_roughly_uniform():
    # Each task should appear in a sampled 5-subset with probability 5/20.
    plan = plan_subsets(TASKS20, [5], exhaustive_up_to=1, per_size=2000, seed=0)
    freq = np.array([sum(t in s for s in plan) for t in TASKS20]) / len(plan)
    assert np.all(np.abs(freq - 0.25) < 0.04)


def test_guard_refuses_two_to_the_twenty():
    with pytest.raises(ValueError, match=r"1,048,555 subsets.*lower exhaustive_up_to"):
        plan_subsets(TASKS20, exhaustive_up_to=20, per_size=1, seed=0)
    n = sum(math.comb(20, k) for k in range(2, 21))
    assert len(plan_subsets(TASKS20[:8], exhaustive_up_to=8, per_size=1, seed=0)) == 247
    assert n == 1_048_555


@pytest.mark.parametrize(
    "tasks,sizes,match",
    [
        (["a", "a", "b"], None, "repeated"),
        ([], None, "no tasks"),
        ("ab", None, "list of task names"),
        (["a", "b"], [3], "sizes must be integers in 1..2"),
    ],
)
def test_bad_input(tasks, sizes, match):
    with pytest.raises(ValueError, match=match):
        plan_subsets(tasks, sizes, exhaustive_up_to=2, per_size=1, seed=0)


def test_subset_masks():
    m = subset_masks(["b", "a", "c"], [("a", "b"), ("c",)])
    assert m.tolist() == [[True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="not in"):
        subset_masks(["a"], [("z",)])
