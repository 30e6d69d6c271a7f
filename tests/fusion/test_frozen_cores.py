"""Frozen-core fine-tuning: frozen elements never move, bit for bit; the control schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llora_jax.fusion.frozen_cores import freeze, frozen_fraction, frozen_union, sequential_schedule


def bits(tree):
    return [np.asarray(x, np.float32).view(np.uint32) for x in jax.tree.leaves(tree)]


def run(opt, params, steps=20):
    target = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)

    def loss(p):
        return sum(
            jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
        )

    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_adamw_with_weight_decay_never_moves_a_frozen_element():
    params = {
        "A": jnp.asarray([[1.5, -0.0, 0.25], [2.0, -1.0, 0.0]], jnp.float32),
        "B": jnp.asarray([0.1, -7.0, 1e-30, 4.0], jnp.float32),
    }
    cores = [
        {"A": np.array([[1, 1, 0], [0, 0, 0]], bool), "B": np.array([0, 1, 0, 0], bool)},
        {"A": np.array([[0, 0, 0], [0, 0, 1]], bool), "B": np.array([0, 0, 1, 0], bool)},
    ]
    frozen = frozen_union(cores)
    assert frozen_fraction(frozen) == pytest.approx(5 / 10)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.5))
    out = run(freeze(inner, frozen), params)
    for before, after, f in zip(bits(params), bits(out), jax.tree.leaves(frozen)):
        f = np.asarray(f)
        assert np.array_equal(before[f], after[f])  # bit for bit, −0.0 and 1e-30 included
        assert np.all(before[~f] != after[~f])  # the rest trained
    # Without the freeze the same optimizer moves the would-be frozen elements.
    free = run(inner, params)
    f = np.asarray(frozen["B"])
    assert not np.array_equal(bits(params)[1][f], bits(free)[1][f])


def test_clipping_sees_only_trainable_gradients():
    # One trainable element: clip_by_global_norm must not be shrunk by a large frozen gradient.
    params = {"w": jnp.asarray([0.0, 0.0], jnp.float32)}
    frozen = {"w": np.array([True, False])}
    opt = freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), frozen)
    grads = {"w": jnp.asarray([100.0, 0.5], jnp.float32)}
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), [-0.0, -0.5])


def test_sequential_schedule():
    assert sequential_schedule(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert sequential_schedule(3, 1, order=[2, 0, 1]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="permutation"):
        sequential_schedule(3, 1, order=[0, 0, 1])
