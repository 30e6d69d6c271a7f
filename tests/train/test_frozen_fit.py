"""Frozen-core fine-tuning through the one train loop: frozen elements keep their bits; the
sequential control's batches are each task's single-run batches, one task after another."""

import dataclasses

import jax
import numpy as np
import pytest

from llora_jax import forward, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.data import batches as single_batches
from llora_jax.tasks.multitask import sequential_batches
from llora_jax.train import loop
from llora_jax.train.optim import OptimConfig
from llora_jax.types import AdapterSpec
from tests.fixtures import toy
from tests.train.test_multitask import head_readout

SPEC = AdapterSpec("lora", LoraConfig(rank=2, alpha=4.0, targets=("query", "value")))
OC = OptimConfig(optimizer="adamw", learning_rate=3e-2, weight_decay=0.5, total_steps=8)
LC = loop.LoopConfig(
    total_steps=8,
    batch_size=8,
    seed=1,
    log_every=4,
    ckpt_every=0,
    progress=False,
    tensorboard=False,
)


def test_frozen_elements_keep_their_bits_and_the_rest_trains(tmp_path):
    tm = toy.toy_task_model()
    tm = dataclasses.replace(
        tm, readout=head_readout, head={"scale": np.float32(1.0), "bias": np.zeros(3, np.float32)}
    )
    _, phi0 = forward.init_trainable(tm, SPEC, forward.init_key(LC.seed, "a", SPEC))
    leaves, treedef = jax.tree.flatten(phi0)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    start = jax.tree.unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    rng = np.random.default_rng(0)
    frozen = jax.tree.map(lambda x: rng.random(x.shape) < 0.4, start)
    arrays = toy.toy_task(seed=3, n=40)
    run = loop.Run(
        workdir=tmp_path / "r",
        seed=LC.seed,
        learning_rate=OC.learning_rate,
        head=tm.head,
        train_arrays=arrays,
        meta={"task": "a"},
        start=start,
        frozen=frozen,
    )
    loop.fit(tm, SPEC, OC, LC, [run])
    tv = task_vectors.load(tmp_path / "r" / "task_vector")
    final = tree_lib.flatten(tree_lib.add(tv.phi0, tv.tau))
    start_f, mask_f = tree_lib.flatten(start), tree_lib.flatten(frozen)
    moved = 0
    for k, x in final.items():
        x, s, m = np.asarray(x, np.float32), np.asarray(start_f[k], np.float32), mask_f[k]
        # φ0 + τ re-adds in float32: compare the exported τ against start − φ0 exactly.
        tau = np.asarray(tree_lib.flatten(tv.tau)[k])
        want = s - np.asarray(tree_lib.flatten(tv.phi0)[k])
        assert np.array_equal(tau[m].view(np.uint32), want[m].view(np.uint32)), k
        moved += int(np.sum(x[~m] != s[~m]))
        assert np.all(x[~m] != s[~m]), k
    assert moved > 0


def test_sequential_batches_are_each_tasks_single_batches_in_order():
    tasks = [toy.toy_task(seed=s, n=24) for s in (1, 2, 3)]
    got = list(sequential_batches(tasks, 8, 2, order=[2, 0, 1], seed=4))
    assert [int(b["task_id"][0]) for b in got] == [2, 2, 0, 0, 1, 1]
    assert all(len(set(b["task_id"].tolist())) == 1 for b in got)
    for t in (2, 0, 1):
        want = single_batches(tasks[t], 8, seed=4, epochs=None)
        mine = [b for b in got if b["task_id"][0] == t]
        for b in mine:
            ref = next(want)
            np.testing.assert_array_equal(b["x"], ref["x"])
            np.testing.assert_array_equal(b["label"], ref["label"])
    resumed = list(sequential_batches(tasks, 8, 2, order=[2, 0, 1], seed=4, start_step=3))
    assert len(resumed) == 3
    for a, b in zip(resumed, got[3:]):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_groups_refuse_runs_with_a_start_or_frozen_elements(tmp_path):
    tm = toy.toy_task_model()
    arrays = toy.toy_task(seed=3, n=40)
    runs = [
        loop.Run(
            workdir=tmp_path / f"r{i}",
            seed=i,
            learning_rate=1e-2,
            head=None,
            train_arrays=arrays,
            meta={"task": "a"},
            frozen={},
        )
        for i in range(2)
    ]
    with pytest.raises(ValueError, match="trains alone"):
        loop.fit(tm, SPEC, OC, LC, runs)
