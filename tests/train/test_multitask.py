"""Multi-task runs through the one train loop: a mixture of one task is the single run; each
example of a mixture is read out by its own task's head."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.data.mixture import mixture_batches
from llora_jax.tasks.multitask import by_task, multitask_model, shared_fields
from llora_jax.train import loop
from llora_jax.train.optim import OptimConfig
from llora_jax.types import AdapterSpec
from tests.fixtures import toy

SPEC = AdapterSpec("lora", LoraConfig(rank=2, alpha=4.0, targets=("query", "value")))
OC = OptimConfig(optimizer="adamw", learning_rate=1e-2, weight_decay=0.01, total_steps=12)
LC = loop.LoopConfig(
    total_steps=12,
    batch_size=8,
    seed=3,
    log_every=4,
    ckpt_every=0,
    progress=False,
    tensorboard=False,
)


def head_readout(call, batch, head, train):
    return {"logits": call(batch["x"]) * head["scale"] + head["bias"]}


def _tm():
    head = {"scale": jnp.asarray(1.5), "bias": jnp.asarray([0.1, -0.2, 0.3])}
    return dataclasses.replace(toy.toy_task_model(), readout=head_readout, head=head)


def _tau(wd):
    return tree_lib.flatten(task_vectors.load(wd / "task_vector").tau)


def test_a_mixture_of_one_task_is_the_single_run(tmp_path):
    tm = _tm()
    arrays = toy.toy_task(seed=1, n=40)
    loop.finetune(tm, SPEC, OC, LC, arrays, tmp_path / "single", meta={"task": "a"})
    mt = multitask_model(tm, [tm.head])

    def batches(batch_size, start):
        return mixture_batches([arrays], batch_size, LC.total_steps, seed=LC.seed, start_step=start)

    run = loop.Run(
        workdir=tmp_path / "mixture",
        seed=LC.seed,
        learning_rate=OC.learning_rate,
        head=mt.head,
        train_arrays=arrays,
        meta={"task": "a"},
        batch_fn=batches,
    )
    loop.fit(mt, SPEC, OC, LC, [run])
    single, mixed = _tau(tmp_path / "single"), _tau(tmp_path / "mixture")
    assert set(single) == set(mixed)
    for k in single:
        np.testing.assert_allclose(
            np.asarray(mixed[k]), np.asarray(single[k]), rtol=1e-5, atol=1e-7
        )
    assert max(float(np.abs(np.asarray(v)).max()) for v in single.values()) > 0
    with pytest.raises(ValueError, match="trains alone"):
        loop.fit(mt, SPEC, OC, LC, [run], group_step=True)


def test_each_example_is_read_out_by_its_own_head():
    tm = _tm()
    heads = [
        {"scale": jnp.asarray(s), "bias": jnp.asarray(b, jnp.float32)}
        for s, b in ((1.0, [0.0, 0.0, 0.0]), (-2.0, [1.0, 0.0, -1.0]), (0.5, [0.0, 3.0, 0.0]))
    ]
    x = toy.toy_task(seed=2, n=10)["x"]
    task_id = np.array([0, 2, 1, 1, 0, 2, 2, 0, 1, 0], np.int32)

    def call(inputs):
        return tm.module.apply({"params": tm.params}, inputs)

    got = by_task(head_readout)(call, {"x": x, "task_id": task_id}, tree_lib.stack(heads), False)
    plain = np.asarray(call(x), np.float64)
    for b, t in enumerate(task_id):
        want = plain[b] * float(heads[t]["scale"]) + np.asarray(heads[t]["bias"], np.float64)
        np.testing.assert_allclose(np.asarray(got["logits"][b]), want, rtol=1e-5, atol=1e-6)
    assert by_task(head_readout) is by_task(head_readout)  # one function: shared compiles
    with pytest.raises(ValueError, match="task_id"):
        by_task(head_readout)(call, {"x": x}, tree_lib.stack(heads), False)
    with pytest.raises(ValueError, match="differ in shape"):
        multitask_model(tm, [heads[0], {"scale": jnp.asarray(1.0), "bias": jnp.zeros(4)}])


def test_shared_fields_drop_what_not_every_task_has():
    a = {"x": np.zeros((4, 3), np.float32), "label": np.zeros(4, np.int32), "score": np.zeros(4)}
    b = {"x": np.zeros((5, 3), np.float32), "label": np.zeros(5, np.int32)}
    c = {"x": np.zeros((5, 2), np.float32), "label": np.zeros(5, np.int32)}
    assert shared_fields([a, b]) == ["x", "label"]
    assert shared_fields([a, b, c]) == ["label"]
