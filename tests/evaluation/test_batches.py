"""Evaluation batches: fixed-size, padded with weight-0 rows."""

import numpy as np

from llora_jax.evaluation import batches


def test_iterate_batches_pads_with_zero_weight():
    arrays = {"x": np.arange(10)}
    got = list(batches.iterate_batches(arrays, 4))
    assert [n for _, n in got] == [4, 4, 2]
    assert got[-1][0]["weight"].tolist() == [1, 1, 0, 0]
