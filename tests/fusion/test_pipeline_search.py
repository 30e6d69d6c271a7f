"""The isolation pipeline as a fusion-search method equals direct calls of the pipeline."""

import jax
import numpy as np
import pytest

from llora_jax import tree as tree_lib
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion import isolation_pipeline as pipeline
from llora_jax.fusion import pipeline_grid, search
from tests.fusion.test_weight_space import toy_member

TASKS = ("cola", "rte", "sst2")


def _taus(n=3):
    return [toy_member("lora", t, a0="shared").tv.tau for t in TASKS[:n]]


@pytest.mark.parametrize("labels", [[0, 0, 1], [0, 1, 2], [0, 0, 0]])
def test_parts_equal_pipeline_merge(labels):
    taus = _taus()
    masks = [jax.tree.map(lambda x: np.abs(np.asarray(x)) > 0.6, t) for t in taus]
    member = np.eye(3, dtype=np.float32)[labels]
    core, rest = jax.jit(pipeline.pipeline_parts)(taus, masks, member)
    for lam in (0.0, 0.4, 1.0):
        want = pipeline.pipeline_merge(taus, masks, labels, lam)
        got = jax.tree.map(lambda c, r, lam=lam: c + lam * r, core, rest)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_search_chooses_on_validation_like_a_loop_over_direct_calls():
    members = [toy_member("lora", t, a0="shared") for t in TASKS]
    grid = [
        {"p": p, "threshold": t, "lam": lam}
        for p in (0.1, 0.3)
        for t in (0.0, 1.0)
        for lam in (0.5, 1.0)
    ]
    subs = [["cola", "rte"], ["cola", "rte", "sst2"]]
    got = search.fuse_subsets(members, pipeline.NAME, subs, grid=grid, batch_size=8)
    phi0 = members[0].tv.phi0
    fn = grid_eval.make_predict_fn(members[0].exp.tm, members[0].exp.spec)

    def scores(merged, ms, split):
        phi = tree_lib.add(phi0, merged)
        return [
            grid_eval.accuracy(
                grid_eval.predict(m.exp.tm, m.exp.spec, phi, phi0, m.exp.arrays[split], 8, fn),
                m.exp.arrays[split]["label"],
            )
            for m in ms
        ]

    for sub in subs:
        ms = [m for m in members if m.task in sub]
        best = None
        for hp in grid:
            merged, info = pipeline.isolation_pipeline([m.tv.tau for m in ms], **hp)
            val = np.mean(scores(merged, ms, "validation"))
            if best is None or val > best[0] + 1e-12:
                best = (val, hp, merged)
        entry = got[search.subset_key(sub)]
        assert entry["hparams"] == best[1]
        assert list(entry["test"].values()) == pytest.approx(scores(best[2], ms, "test"))


def test_pipeline_subsets_report_clusters_and_refuse_an_incomplete_grid():
    taus = _taus()
    _, labels = pipeline_grid.pipeline_subsets(taus, [[0, 1, 2]], 0.2, 0.0)
    assert labels == [[0, 0, 0]]  # threshold 0: one cluster
    _, labels = pipeline_grid.pipeline_subsets(taus, [[0, 1, 2]], 0.2, 1.0)
    assert labels == [[0, 1, 2]]
    members = [toy_member("lora", t, a0="shared") for t in TASKS[:2]]
    with pytest.raises(ValueError, match="p, threshold and lam"):
        search.fuse_subset(members, pipeline.NAME, grid=[{"p": 0.1, "lam": 1.0}], batch_size=8)
    assert len(search.default_grid(pipeline.NAME)) == 3 * 5 * 11
