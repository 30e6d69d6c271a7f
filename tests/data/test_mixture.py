"""Multi-task batches equal single-task batches where they should; per-example heads."""

import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax.data.mixture import (
    mixture_batches,
    mixture_steps,
    select_by_task,
    stack_padded,
    task_schedule,
)
from llora_jax.data.pipeline import batches


def task_arrays(n, t):
    """Rows that name their task and position, so every row can be traced back."""
    ids = np.arange(n)
    return {
        "input_ids": np.stack([ids, np.full(n, t), ids * 7 % 5], axis=1).astype(np.int32),
        "label": (ids % 3).astype(np.int32),
    }


def single(arrays, batch_size, steps, seed):
    it = batches(arrays, batch_size, seed=seed, epochs=None, process_index=0, process_count=1)
    return [next(it) for _ in range(steps)]


def test_mixture_of_one_task_is_that_tasks_batches():
    arrays = task_arrays(23, 0)  # 5 full batches of 4 per epoch: crosses epoch boundaries
    got = list(mixture_batches([arrays], 4, 13, seed=3))
    want = single(arrays, 4, 13, seed=3)
    assert len(got) == len(want) == 13
    for g, w in zip(got, want):
        assert set(g) == set(w) | {"task_id"}
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
        assert np.all(g["task_id"] == 0)


def test_per_task_budget_gives_every_task_its_single_run_rows_in_order():
    sizes, bs, steps, seed = [17, 30, 9], 4, 6, 1
    tasks = [task_arrays(n, t) for t, n in enumerate(sizes)]
    got = list(mixture_batches(tasks, bs, steps, budget="per_task", seed=seed))
    assert len(got) == mixture_steps(3, steps, "per_task") == 18
    for t, arrays in enumerate(tasks):
        mine = np.concatenate([b["input_ids"][b["task_id"] == t] for b in got])
        theirs = np.concatenate([b["input_ids"] for b in single(arrays, bs, steps, seed)])
        np.testing.assert_array_equal(mine, theirs)
        labels = np.concatenate([b["label"][b["task_id"] == t] for b in got])
        np.testing.assert_array_equal(labels, arrays["label"][mine[:, 0]])
    assert all(np.all(b["weight"] == 1) for b in got)


def test_total_budget_splits_one_runs_examples_equally():
    tasks = [task_arrays(40, t) for t in range(3)]
    got = list(mixture_batches(tasks, 8, 5, budget="total", seed=0))
    assert len(got) == 5
    counts = np.bincount(np.concatenate([b["task_id"] for b in got]), minlength=3)
    assert sorted(counts.tolist()) == [13, 13, 14]  # 40 slots over 3 tasks
    for t in range(3):  # a prefix of the task's single-run rows
        mine = np.concatenate([b["input_ids"][b["task_id"] == t] for b in got])
        theirs = np.concatenate([b["input_ids"] for b in single(tasks[t], 8, 5, 0)])
        np.testing.assert_array_equal(mine, theirs[: len(mine)])


def test_schedule_is_seeded_and_resume_continues_exactly():
    np.testing.assert_array_equal(task_schedule(3, 4, 5, 2), task_schedule(3, 4, 5, 2))
    assert not np.array_equal(task_schedule(3, 4, 5, 2), task_schedule(3, 4, 5, 3))
    tasks = [task_arrays(n, t) for t, n in enumerate([11, 25])]
    full = list(mixture_batches(tasks, 4, 5, seed=9))
    resumed = list(mixture_batches(tasks, 4, 5, seed=9, start_step=6))
    for a, b in zip(full[6:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert len(resumed) == len(full) - 6


@pytest.mark.parametrize(
    "tasks,match",
    [
        (
            [
                task_arrays(10, 0),
                {"input_ids": np.zeros((10, 2), np.int32), "label": np.zeros(10, np.int32)},
            ],
            "pad / cast",
        ),
        ([task_arrays(10, 0), {"input_ids": np.zeros((10, 3), np.int32)}], "fields"),
        ([task_arrays(3, 0)], "fewer than batch_size"),
    ],
)
def test_bad_tasks(tasks, match):
    with pytest.raises(ValueError, match=match):
        next(mixture_batches(tasks, 4, 2))


def test_select_by_task_equals_each_heads_on_its_own_examples():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 6)).astype(np.float32)
    heads = [rng.normal(size=(6, c)).astype(np.float32) for c in (2, 3, 1)]  # 1: a regression head
    task_id = np.array([0, 2, 1, 1, 0, 2, 2, 0, 1, 0], np.int32)
    picked = select_by_task(stack_padded([feats @ w for w in heads]), task_id)
    for t, w in enumerate(heads):
        own = task_id == t
        want = feats[own] @ w
        np.testing.assert_allclose(np.asarray(picked)[own][:, : w.shape[1]], want, rtol=1e-6)
        # Padding never wins an argmax and adds nothing to a softmax.
        np.testing.assert_array_equal(np.argmax(np.asarray(picked)[own], -1), np.argmax(want, -1))
        np.testing.assert_allclose(
            np.asarray(jnp.exp(picked[own] - jnp.max(picked[own], -1, keepdims=True)))[
                :, w.shape[1] :
            ],
            0,
        )
    with pytest.raises(ValueError, match="task_id"):
        select_by_task(jnp.zeros((3, 10, 2)), task_id[:4])
