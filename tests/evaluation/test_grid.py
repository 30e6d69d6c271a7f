"""Merge grids in one program equal one-model-at-a-time evaluation."""

import jax
import numpy as np
import pytest

from llora_jax import forward
from llora_jax import tree as tree_lib
from llora_jax.adapters import LoraConfig
from llora_jax.evaluation import grid as grid_eval
from llora_jax.types import AdapterSpec
from tests.fixtures import toy

LORA = LoraConfig(rank=3, alpha=6.0, targets=("query", "value"))


def _taus(phi0, n, seed=0, std=0.6):
    out = []
    for i in range(n):
        leaves, treedef = jax.tree.flatten(phi0)
        keys = jax.random.split(jax.random.key(seed * 10 + i), len(leaves))
        out.append(
            jax.tree.unflatten(
                treedef, [std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
            )
        )
    return out


@pytest.mark.parametrize("method", ["lora", "l_lora", "l_lora_model", "full"])
def test_batched_grid_equals_one_model_at_a_time(method):
    tm = toy.toy_task_model()
    data = toy.toy_task(n=37)
    spec = AdapterSpec(method, LORA)
    base, phi0 = forward.init_trainable(tm, spec, jax.random.key(0))
    taus = _taus(base, 2, std=0.3 if method == "full" else 0.6)
    lambdas = np.array([[0.0, 0.0], [1.0, 0.0], [0.4, -1.2], [2.0, 1.0], [-0.6, 0.8]], np.float32)
    grid = grid_eval.predict_grid(tm, spec, base, phi0, taus, lambdas, data, batch_size=16, chunk=2)
    merged = grid_eval.predict_merged(
        tm, spec, base, phi0, taus, lambdas, data, batch_size=16, chunk=2
    )
    assert grid.shape == (5, 37)
    fn = grid_eval.make_predict_fn(tm, spec)
    for k, lam in enumerate(lambdas):
        trainable = tree_lib.add(base, tree_lib.weighted_sum(taus, lam))
        one = grid_eval.predict(tm, spec, trainable, phi0, data, batch_size=16, predict_fn=fn)
        np.testing.assert_array_equal(grid[k], one)
        np.testing.assert_array_equal(merged[k], one)
        # A grid of one model (the plain predict path) and a grid over padded stacks.
        single = grid_eval.predict_grid(tm, spec, base, phi0, taus, lambdas[k : k + 1], data, 16, 2)
        np.testing.assert_array_equal(single[0], one)
        three = grid_eval.predict_merged(
            tm, spec, base, phi0, [*taus, taus[0]], np.r_[lam, 0.0][None], data, 16, 2
        )
        np.testing.assert_array_equal(three[0], one)
    # The grid is not trivially constant: different merges disagree somewhere.
    assert len({tuple(r) for r in grid}) > 1


def test_linear_shortcut_requires_l_lora_model():
    tm = toy.toy_task_model()
    with pytest.raises(ValueError, match="only for l_lora_model"):
        grid_eval.make_linear_grid_fn(tm, AdapterSpec("lora", LORA))
