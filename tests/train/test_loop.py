"""Fine-tuning on a toy model: every method learns, L-LoRA keeps A, runs are reproducible."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.train import loop as train_loop
from llora_jax.train import optim
from llora_jax.types import METHODS, AdapterSpec, check_method
from tests.fixtures import toy

LORA = LoraConfig(rank=4, alpha=8.0, targets=("query", "value"))


def _run(tmp_path, method, steps=40, lr=3e-2, seed=0, name=None, **lc_kw):
    tm = toy.toy_task_model()
    data = toy.toy_task()
    spec = AdapterSpec(method=method, lora=LORA)
    oc = optim.OptimConfig(optimizer="adam", learning_rate=lr, schedule="constant")
    lc = train_loop.LoopConfig(
        total_steps=steps,
        batch_size=32,
        seed=seed,
        log_every=5,
        ckpt_every=20,
        progress=False,
        **lc_kw,
    )
    wd = tmp_path / (name or method)
    train_loop.finetune(tm, spec, oc, lc, data, wd, meta={"task": "toy"})
    return wd


def _losses(wd):
    import json

    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_the_loss_and_exports_a_task_vector(tmp_path, method):
    wd = _run(tmp_path, method)
    losses = _losses(wd)
    assert losses[-1] < 0.8 * losses[0], losses
    assert list((wd / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
    got = task_vectors.load(wd / "task_vector")
    assert got.meta["mode"] == method and got.meta["task"] == "toy"
    assert tree_lib.norm(got.tau) > 0
    if method == "l_lora":
        # With B0 = 0 the gradient w.r.t. A is exactly zero: A stays at A0 (Adam, no decay).
        for name, v in tree_lib.flatten(got.tau).items():
            if name.endswith("/A"):
                assert np.all(np.asarray(v) == 0.0), name
            else:
                assert np.abs(np.asarray(v)).max() > 0


def test_same_seed_gives_bit_identical_task_vectors(tmp_path):
    a = task_vectors.load(_run(tmp_path, "lora", steps=10, name="a") / "task_vector")
    b = task_vectors.load(_run(tmp_path, "lora", steps=10, name="b") / "task_vector")
    for x, y in zip(jax.tree.leaves(a.tau), jax.tree.leaves(b.tau)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    full = task_vectors.load(_run(tmp_path, "l_lora", steps=40, name="full") / "task_vector")
    # "Interrupt": stop after 20 steps (a checkpoint exists at 20), then re-run to 40.
    wd = _run(tmp_path, "l_lora", steps=20, name="resumed")
    (wd / "task_vector").rename(wd / "partial_tv")
    wd2 = _run(tmp_path, "l_lora", steps=40, name="resumed")
    assert wd2 == wd
    resumed = task_vectors.load(wd / "task_vector")
    for x, y in zip(jax.tree.leaves(full.tau), jax.tree.leaves(resumed.tau)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_with_clear_error(tmp_path):
    with pytest.raises(train_loop.TrainingDiverged, match="non-finite"):
        _run(tmp_path, "lora", steps=20, lr=1e30)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="valid methods: full, lora, l_lora, l_lora_model"):
        check_method("qlora")


def test_training_batches_are_indexed_by_step_and_split_across_processes():
    import itertools

    from llora_jax.data import batches

    data = {"x": np.arange(100), "label": np.arange(100)}

    def at(step, **kw):
        it = batches(data, 10, seed=3, epochs=None, start_step=step, **kw)
        return next(it)["x"]

    b7 = at(7)
    assert np.array_equal(b7, at(7))  # resuming at step 7 gives the uninterrupted batch
    full = batches(data, 10, seed=3, epochs=None)
    assert np.array_equal(next(itertools.islice(full, 7, None))["x"], b7)
    p0 = at(4, process_index=0, process_count=2)
    p1 = at(4, process_index=1, process_count=2)
    assert set(p0).isdisjoint(p1) and sorted([*p0, *p1]) == sorted(at(4))
    # An epoch covers each example at most once.
    seen = np.concatenate([at(i) for i in range(10)])
    assert len(set(seen)) == 100
    assert dataclasses.is_dataclass(train_loop.LoopConfig())


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizer_equals_optax_with_the_scheduled_rate(optimizer):
    """The injected-rate optimizer equals optax's own at every step, and two learning
    rates give the same program (so a learning-rate sweep compiles one train step)."""
    import optax

    oc = optim.OptimConfig(
        optimizer=optimizer, learning_rate=3e-3, weight_decay=0.1, warmup_steps=3, total_steps=10
    )
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 10, 0.0)
    ref_core = {
        "adamw": optax.adamw(sched, weight_decay=0.1),
        "adam": optax.adam(sched),
        "sgd": optax.sgd(sched),
    }[optimizer]
    ref = optax.chain(optax.clip_by_global_norm(1.0), ref_core)
    ours = optim.make_optimizer(oc)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    s_ref, s_ours = ref.init(params), ours.init(params)
    p_ref = p_ours = params
    for i in range(8):
        g = jax.tree.map(lambda x, k=i + 1: jnp.sin(x * k) * 0.5, p_ref)
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        u_ours, s_ours = ours.update(g, s_ours, p_ours)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    other = optim.make_optimizer(dataclasses.replace(oc, learning_rate=1e-1))
    g = jax.tree.map(jnp.ones_like, params)
    jaxpr = lambda opt: str(jax.make_jaxpr(opt.update)(g, opt.init(params), params))  # noqa: E731
    assert jaxpr(ours) == jaxpr(other)
