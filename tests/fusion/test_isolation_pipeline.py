"""The isolation pipeline against float64 NumPy references on hand-made vectors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import fusion
from llora_jax.fusion.isolation_pipeline import (
    cluster_tasks,
    core_masks_by_score,
    gradient_importance,
    isolation_pipeline,
    jaccard_matrix,
    mean_core_overlap,
    pipeline_merge,
    transplant_cores,
)
from llora_jax.fusion.spherical import spherical_mean

SHAPES = {"a": (2, 3), "b": (4,)}  # d = 10


def np_slerp(v0, v1, t):
    """Standard slerp of two vectors (Shoemake), float64."""
    om = math.acos(np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    return (math.sin((1 - t) * om) * v0 + math.sin(t * om) * v1) / math.sin(om)


def np_karcher(v, w, iters=2000):
    """Weighted spherical mean by the definition: Karcher mean of directions × mean norm."""
    v, w = np.asarray(v, np.float64), np.asarray(w, np.float64) / np.sum(w)
    nrm = np.linalg.norm(v, axis=1)
    u = v / nrm[:, None]
    mu = w @ u / np.linalg.norm(w @ u)
    for _ in range(iters):
        th = np.arccos(np.clip(u @ mu, -1, 1))
        logs = (th / np.sin(th))[:, None] * (u - np.cos(th)[:, None] * mu)
        t = w @ logs
        a = np.linalg.norm(t)
        if a < 1e-16:
            break
        mu = np.cos(a) * mu + np.sin(a) * t / a
        mu /= np.linalg.norm(mu)
    return (w @ nrm) * mu, mu, u, w


def test_two_equal_norm_vectors_give_standard_slerp():
    rng = np.random.default_rng(0)
    v0, v1 = rng.normal(size=(2, 7))
    v1 *= np.linalg.norm(v0) / np.linalg.norm(v1)
    want = np_slerp(v0, v1, 0.5)
    for mean in ("karcher", "normalized_sum"):
        got = spherical_mean(jnp.asarray(np.stack([v0, v1]), jnp.float32), mean=mean)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_unequal_norms_and_weights_give_slerp_of_directions():
    rng = np.random.default_rng(1)
    v0, v1 = rng.normal(size=(2, 9)) * np.array([[1.0], [3.0]])
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    for t in (0.5, 0.3):
        w = np.array([1 - t, t])
        want = (w @ [np.linalg.norm(v0), np.linalg.norm(v1)]) * np_slerp(u0, u1, t)
        got = spherical_mean(jnp.asarray(np.stack([v0, v1]), jnp.float32), w)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_karcher_mean_of_four_vectors_matches_reference_and_is_stationary():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(4, 12)) + 1.0  # one open hemisphere
    w = np.array([1.0, 2.0, 0.5, 1.5])
    want, mu, u, wn = np_karcher(v, w)
    th = np.arccos(np.clip(u @ mu, -1, 1))
    grad = wn @ ((th / np.sin(th))[:, None] * (u - np.cos(th)[:, None] * mu))
    assert np.linalg.norm(grad) < 1e-12  # the reference satisfies the definition
    got = spherical_mean(jnp.asarray(v, jnp.float32), w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    ns = (wn @ np.linalg.norm(v, axis=1)) * (wn @ u) / np.linalg.norm(wn @ u)
    got_ns = spherical_mean(jnp.asarray(v, jnp.float32), w, mean="normalized_sum")
    np.testing.assert_allclose(np.asarray(got_ns), ns, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(ns - want) > 1e-3  # the two rules really differ for k > 2


def test_zero_and_opposite_vectors():
    v = np.array([[3.0, 4.0], [0.0, 0.0]])
    # The zero vector has no direction; its norm 0 halves the mean norm.
    np.testing.assert_allclose(np.asarray(spherical_mean(jnp.asarray(v))), [1.5, 2.0], rtol=1e-6)
    opp = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]])
    assert np.all(np.asarray(spherical_mean(opp)) == 0)
    assert np.all(np.asarray(spherical_mean(jnp.zeros((3, 4)))) == 0)
    with pytest.raises(ValueError, match="mean must be one of"):
        spherical_mean(opp, mean="linear")


def tree_of(vec):
    return {
        "a": jnp.asarray(vec[:6].reshape(2, 3), jnp.float32),
        "b": jnp.asarray(vec[6:], jnp.float32),
    }


def flat(tree):
    return np.concatenate(
        [np.asarray(tree["a"], np.float64).ravel(), np.asarray(tree["b"], np.float64)]
    )


def np_pipeline(taus, masks, clusters, lam):
    """Float64 reference of steps c): owner's value on claimed elements, else λ Σ_c m_c."""
    taus, masks = np.asarray(taus), np.asarray(masks)
    claimed = masks.any(0)
    out = np.zeros(taus.shape[1])
    for e in np.flatnonzero(claimed):
        owners = [i for i in range(len(taus)) if masks[i, e]]
        best = max(owners, key=lambda i: (abs(taus[i, e]), -i))  # larger |τ|, then lower index
        out[e] = taus[best, e]
    rest = np.where(claimed, 0.0, taus)
    for c in sorted(set(clusters)):
        members = [i for i, k in enumerate(clusters) if k == c]
        m = (
            rest[members[0]]
            if len(members) == 1
            else np_karcher(rest[members], np.ones(len(members)))[0]
        )
        out += lam * m
    return out


def hand_made():
    taus = np.array(
        [
            [5.0, 0.1, 0.2, 0.3, -0.4, 0.5, 0.6, 0.1, 0.2, 0.3],
            [-4.0, 0.3, 0.1, 0.2, 0.5, -0.3, 0.4, 0.2, 6.0, 0.1],
            [0.2, 0.4, 0.3, 0.1, 0.6, 0.2, 0.1, 0.5, -6.0, 0.2],
            [0.1, -0.2, 7.0, 0.4, 0.1, 0.3, 0.2, -0.1, 0.3, 0.4],
        ]
    )
    masks = np.zeros_like(taus, bool)
    masks[0, [0, 1]] = True  # element 0 claimed by tasks 0 and 1: |5| > |-4|, task 0 owns it
    masks[1, [0, 8]] = True  # element 8 claimed by tasks 1 and 2 with |6| = |-6|: task 1 owns it
    masks[2, [8, 4]] = True
    masks[3, [2]] = True
    return taus, masks


def test_pipeline_merge_equals_numpy_reference_with_conflicts_and_clusters():
    taus, masks = hand_made()
    tt = [tree_of(t) for t in taus]
    mt = [jax.tree.map(lambda x: x > 0.5, tree_of(m.astype(float))) for m in masks]
    core, claimed = transplant_cores(tt, mt)
    assert flat(core)[0] == 5.0 and flat(core)[8] == 6.0 and flat(core)[4] == np.float32(0.6)
    for clusters in ([0, 0, 1, 0], [0, 1, 2, 3], [0, 0, 0, 0]):
        got = pipeline_merge(tt, mt, clusters, 0.7, iterations=200)
        np.testing.assert_allclose(
            flat(got), np_pipeline(taus, masks, clusters, 0.7), rtol=1e-5, atol=1e-6
        )


def test_singleton_clusters_reduce_to_isolation_merge():
    rng = np.random.default_rng(3)
    tt = [tree_of(v) for v in rng.normal(size=(3, 10))]
    merged, info = isolation_pipeline(tt, p=0.2, threshold=1.0, lam=0.4)
    assert list(info["clusters"]) == [0, 1, 2]
    want = fusion.isolation(tt, 0.2, 0.4)
    np.testing.assert_allclose(flat(merged), flat(want), rtol=1e-6, atol=1e-7)


def test_jaccard_matches_sets_and_core_overlap():
    rng = np.random.default_rng(4)
    tt = [tree_of(v) for v in rng.normal(size=(4, 10))]
    masks = fusion.core_masks(tt, 0.3)
    sets = [set(np.flatnonzero(flat(m))) for m in masks]
    want = np.array([[len(a & b) / len(a | b) for b in sets] for a in sets])
    np.testing.assert_allclose(jaccard_matrix(masks), want)
    np.testing.assert_allclose(jaccard_matrix(masks), fusion.core_overlap(tt, 0.3))
    off = want[~np.eye(4, dtype=bool)].mean()
    assert mean_core_overlap(masks) == pytest.approx(off)


def test_cluster_tasks_by_overlap():
    j = np.array(
        [
            [1.0, 0.6, 0.5, 0.0, 0.1],
            [0.6, 1.0, 0.7, 0.1, 0.0],
            [0.5, 0.7, 1.0, 0.0, 0.0],
            [0.0, 0.1, 0.0, 1.0, 0.4],
            [0.1, 0.0, 0.0, 0.4, 1.0],
        ]
    )
    assert cluster_tasks(j, 0.45).tolist() == [0, 0, 0, 1, 2]  # {0,1,2}: mean J 0.6 >= 0.45
    assert cluster_tasks(j, 0.35).tolist() == [0, 0, 0, 1, 1]
    assert cluster_tasks(j, 0.65).tolist() == [0, 1, 1, 2, 3]  # only 1-2 (0.7) join
    assert cluster_tasks(j, 0.0).tolist() == [0] * 5
    assert cluster_tasks(j, 1.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="threshold"):
        cluster_tasks(j, 1.5)


def test_cores_by_importance_score():
    taus = np.array([[3.0, 1.0, 2.0, 0.5] + [0.0] * 6])
    scores = np.array([[0.0, 9.0, 1.0, 8.0] + [0.0] * 6])
    masks = core_masks_by_score([tree_of(scores[0])], 0.2)  # ceil(0.2·10) = 2 elements
    assert np.flatnonzero(flat(masks[0])).tolist() == [1, 3]
    assert np.flatnonzero(flat(fusion.core_masks([tree_of(taus[0])], 0.2)[0])).tolist() == [0, 2]


def test_gradient_importance_is_mean_squared_gradient_times_tau_squared():
    targets = np.random.default_rng(5).normal(size=(3, 10))
    params = np.linspace(-1, 1, 10)
    tau = np.arange(10.0) / 10

    def grad_fn(p, batch):  # gradient of ½‖p − target‖²
        return jax.tree.map(lambda x, t: x - t, p, batch)

    got = gradient_importance(grad_fn, tree_of(params), [tree_of(t) for t in targets], tree_of(tau))
    want = np.mean((params - targets) ** 2, axis=0) * tau**2
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no batches"):
        gradient_importance(grad_fn, tree_of(params), [], tree_of(tau))


def test_pipeline_merge_jits_with_traced_lambda_and_masks():
    taus, masks = hand_made()
    tt = [tree_of(t) for t in taus]
    mt = [jax.tree.map(lambda x: x > 0.5, tree_of(m.astype(float))) for m in masks]
    merge = jax.jit(lambda t, m, lam: pipeline_merge(t, m, [0, 0, 1, 0], lam, iterations=200))
    for lam in (0.3, 1.0):  # one program for every λ
        want = np_pipeline(taus, masks, [0, 0, 1, 0], lam)
        np.testing.assert_allclose(flat(merge(tt, mt, lam)), want, rtol=1e-5, atol=1e-6)


def test_isolation_pipeline_uses_scores_when_given():
    rng = np.random.default_rng(6)
    tt = [tree_of(v) for v in rng.normal(size=(3, 10))]
    scores = [tree_of(np.abs(v)) for v in rng.normal(size=(3, 10))]
    _, info = isolation_pipeline(tt, p=0.3, threshold=0.0, lam=1.0, scores=scores)
    want = core_masks_by_score(scores, 0.3)
    for got_mask, want_mask in zip(info["masks"], want):
        np.testing.assert_array_equal(flat(got_mask), flat(want_mask))
    assert info["clusters"].tolist() == [0, 0, 0]
