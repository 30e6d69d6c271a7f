"""The study's subset plan: today's subsets by default, seeded samples above a size."""

import itertools

import pytest

from llora_jax.fusion import search
from llora_jax.fusion.subsets import plan_subsets
from llora_jax.study import plan
from llora_jax.study.spec import StudySpecError, base_study, set_fields

TEXT = ["cola", "mrpc", "qqp", "rte", "sst2", "stsb"]


def _study(**fields):
    s = base_study("t", "configs/minilm.py")
    s.tasks = list(fields.pop("tasks", TEXT))
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def test_defaults_reproduce_every_subset_in_todays_order():
    for tasks in (TEXT, ["sst2", "cola", "qqp"]):  # any listed order is kept
        s = _study(tasks=tasks)
        got = plan.study_subsets(s, tasks, seed=0)
        assert got == search.subsets(tasks, 2, None)
        assert len(got) == 57 if len(tasks) == 6 else 4
    s = _study(max_subset=3)
    assert plan.study_subsets(s, TEXT, 1) == search.subsets(TEXT, 2, 3)


def test_sampled_sizes_follow_plan_subsets_and_the_seed():
    glue7 = ["cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb"]
    s = _study(tasks=glue7, subset_sizes=[2, 4, 7], exhaustive_up_to=2, subsets_per_size=6)
    got = plan.study_subsets(s, glue7, seed=0)
    assert [len(x) for x in got].count(2) == 21 and len(got) == 21 + 6 + 1
    ref = plan_subsets(glue7, [2, 4, 7], exhaustive_up_to=2, per_size=6, seed=0)
    assert {frozenset(x) for x in got} == {frozenset(x) for x in ref}
    # Seed 1 draws other size-4 subsets; a fixed subset_seed gives every seed one plan.
    other = plan.study_subsets(s, glue7, seed=1)
    assert {frozenset(x) for x in other if len(x) == 4} != {
        frozenset(x) for x in got if len(x) == 4
    }
    s.subset_seed = 0
    assert plan.study_subsets(s, glue7, seed=1) == got
    # Every subset keeps the study's task order; the multi-task baseline takes the
    # first two of each size.
    order = {t: i for i, t in enumerate(glue7)}
    assert all(list(x) == sorted(x, key=order.get) for x in got)
    firsts = plan.first_per_size(got, 2)
    assert [len(x) for x in firsts] == [2, 2, 4, 4, 7]
    assert firsts[:2] == list(itertools.combinations(glue7, 2))[:2]


def test_spec_fields_are_checked():
    s = _study()
    set_fields(s, ["exhaustive_up_to=3", "subsets_per_size=4", "merge_space=delta_w"])
    assert (s.exhaustive_up_to, s.subsets_per_size, s.merge_space) == (3, 4, "delta_w")
    with pytest.raises(StudySpecError, match="merge_space"):
        set_fields(s, ["merge_space=weights"])
    with pytest.raises(StudySpecError, match="subsets_per_size"):
        set_fields(_study(), ["subsets_per_size=0"])
    with pytest.raises(ValueError, match="more than limit"):
        plan.study_subsets(
            _study(tasks=[f"t{i}" for i in range(20)]), [f"t{i}" for i in range(20)], 0
        )
