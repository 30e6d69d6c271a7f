"""The capacity pieces composed: a frozen-core multi-task fine-tuning of a fused toy adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llora_jax import fusion
from llora_jax.data.mixture import mixture_batches, select_by_task, stack_padded
from llora_jax.fusion.frozen_cores import freeze, frozen_union
from llora_jax.fusion.isolation_pipeline import isolation_pipeline


def test_frozen_core_multitask_tuning_of_a_fused_adapter():
    rng = np.random.default_rng(0)
    d, classes = 6, (2, 3, 2)
    heads = [jnp.asarray(rng.normal(size=(d, c)), jnp.float32) for c in classes]  # frozen heads
    tasks = []
    for t in range(len(classes)):
        x = rng.normal(size=(40, d)).astype(np.float32)
        tasks.append(
            {"x": x, "label": np.asarray(np.argmax(x @ np.asarray(heads[t]), -1), np.int32)}
        )
    # Toy task vectors of a diagonal "adapter" (x ↦ x·(1 + a)), fused by the pipeline.
    taus = [{"a": jnp.asarray(rng.normal(size=d) * 0.3, jnp.float32)} for _ in classes]
    fused, info = isolation_pipeline(taus, p=0.2, threshold=0.0, lam=0.5)
    frozen = frozen_union(info["masks"])
    assert 0 < int(np.sum(frozen["a"])) < d

    def loss(params, batch):
        feats = batch["x"] * (1 + params["a"])
        logits = select_by_task(stack_padded([feats @ h for h in heads]), batch["task_id"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.sum(losses * batch["weight"]) / jnp.sum(batch["weight"])

    opt = freeze(optax.adamw(0.05, weight_decay=0.1), frozen)

    @jax.jit
    def step(params, state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state, first = fused, opt.init(fused), None
    for batch in mixture_batches(tasks, 8, 10, budget="per_task", seed=1):
        params, state, value = step(params, state, batch)
        first = value if first is None else first
    f = np.asarray(frozen["a"])
    before = np.asarray(fused["a"]).view(np.uint32)
    after = np.asarray(params["a"]).view(np.uint32)
    assert np.array_equal(before[f], after[f])
    assert np.all(before[~f] != after[~f])
    full = {k: np.concatenate([t[k] for t in tasks]) for k in ("x", "label")}
    batch_all = {**full, "task_id": np.repeat(np.arange(3), 40), "weight": np.ones(120, np.float32)}
    assert float(loss(params, batch_all)) < float(loss(fused, batch_all))
    # The fused adapter's cores are the owners' values (p = 0.2 of 6 elements per task).
    core_only = fusion.isolation(taus, 0.2, 0.0)
    np.testing.assert_array_equal(np.asarray(fused["a"])[f], np.asarray(core_only["a"])[f])
