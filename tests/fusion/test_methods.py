"""Fusion methods against independent float64 NumPy references (loops over elements)."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import fusion, interference
from llora_jax.fusion import common as fusion_common

# ---------------------------------------------------------------- reference helpers


def ref_items(tree, prefix=""):
    """[(path, np.ndarray)] in sorted-key order (written here, independent of llora_jax.tree)."""
    out = []
    for k in sorted(tree):
        v = tree[k]
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.extend(ref_items(v, p))
        else:
            out.append((p, np.asarray(v, np.float64)))
    return out


def vec(tree):
    return np.concatenate([a.ravel() for _, a in ref_items(tree)])


def unvec(v, like):
    """Split a flat vector back into {path: array} following ``like``'s layout."""
    out, i = {}, 0
    for p, a in ref_items(like):
        out[p] = v[i : i + a.size].reshape(a.shape)
        i += a.size
    return out


def assert_tree_close(tree, ref_vec, like, atol=1e-5, rtol=1e-5):
    ref = unvec(ref_vec, like)
    got = dict(ref_items(tree))
    assert got.keys() == ref.keys()
    for p in ref:
        np.testing.assert_allclose(got[p], ref[p], atol=atol, rtol=rtol, err_msg=p)


def ref_keep(v, frac):
    """Top-frac mask: m = ceil(frac·d) (exact rational arithmetic), ties kept, zeros never kept."""
    d = v.size
    m = max(1, math.ceil(Fraction(str(frac)) * d))
    t = sorted(np.abs(v), reverse=True)[m - 1]
    return np.array([abs(x) >= t and x != 0 for x in v])


def ref_ties(vs, k, lam):
    trimmed = [np.where(ref_keep(v, k), v, 0.0) for v in vs]
    out = np.zeros(vs[0].size)
    for j in range(out.size):
        vals = [t[j] for t in trimmed]
        s = sum(vals)
        if s == 0:
            continue
        g = 1.0 if s > 0 else -1.0
        agree = [x for x in vals if x != 0 and np.sign(x) == g]
        out[j] = lam * sum(agree) / len(agree)
    return out


def ref_isolation(vs, p, lam):
    cores = [ref_keep(v, p) for v in vs]
    out = np.zeros(vs[0].size)
    for j in range(out.size):
        claim = [i for i in range(len(vs)) if cores[i][j]]
        if claim:
            owner = max(claim, key=lambda i: (abs(vs[i][j]), -i))
            out[j] = vs[owner][j]
        else:
            out[j] = lam * sum(v[j] for v in vs)
    return out


def make_taus(n=3, seed=0):
    rng = np.random.default_rng(seed)

    def one():
        return {
            "enc": {
                "q": {"A": rng.normal(size=(4, 2)), "B": rng.normal(size=(2, 5))},
                "v": {"A": rng.normal(size=(4, 2)), "B": rng.normal(size=(2, 5))},
            },
            "bias": rng.normal(size=(3,)),
            "scalar": rng.normal(size=()),
        }

    return [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), one()) for _ in range(n)]


# ---------------------------------------------------------------- simple methods


def test_average_task_arithmetic_weighted():
    taus = make_taus(3)
    vs = [vec(t) for t in taus]
    assert_tree_close(fusion.average(taus), sum(vs) / 3, taus[0])
    assert_tree_close(fusion.task_arithmetic(taus, 0.35), 0.35 * sum(vs), taus[0])
    lams = np.array([0.2, -0.5, 1.3])
    assert_tree_close(fusion.weighted(taus, lams), sum(w * v for w, v in zip(lams, vs)), taus[0])
    with pytest.raises(ValueError, match="one coefficient per task"):
        fusion.weighted(taus, [1.0, 2.0])
    with pytest.raises(ValueError, match="scalar lam"):
        fusion.task_arithmetic(taus, np.ones(3))


def test_jit_vmap_and_dtype():
    taus = make_taus(2)
    vs = [vec(t) for t in taus]
    grid = jnp.asarray(fusion.LAMBDA_GRID)
    out = jax.jit(jax.vmap(lambda lam: fusion.task_arithmetic(taus, lam)))(grid)
    ref = unvec(0.35 * (vs[0] + vs[1]), taus[0])["bias"]
    np.testing.assert_allclose(np.asarray(out["bias"][7]), ref, rtol=1e-5)
    ties_jit = jax.jit(fusion.ties, static_argnames="k")
    assert_tree_close(ties_jit(taus, k=0.5, lam=0.7), ref_ties(vs, 0.5, 0.7), taus[0])
    iso_jit = jax.jit(fusion.isolation, static_argnames="p")
    assert_tree_close(iso_jit(taus, p=0.2, lam=0.4), ref_isolation(vs, 0.2, 0.4), taus[0])
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), taus)
    merged = jax.jit(
        lambda t: (fusion.average(t), fusion.ties(t, 0.5, 1.0), fusion.isolation(t, 0.1, 0.5))
    )(bf)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))


# ---------------------------------------------------------------- TIES


def test_ties_hand_computed():
    taus = [
        {"w": jnp.array([2.0, -1.0, 0.5, 3.0])},
        {"w": jnp.array([-4.0, 1.0, 2.0, -1.0])},
        {"w": jnp.array([1.0, 2.0, -3.0, 0.1])},
    ]
    # k = 0.5 keeps 2 of 4 per task: [2,0,0,3], [-4,0,2,0], [0,2,-3,0]; sums [-2,2,-1,3]
    # elect [-,+,-,+]; disjoint means [-4, 2, -3, 3].
    np.testing.assert_allclose(fusion.ties(taus, k=0.5, lam=1.0)["w"], [-4, 2, -3, 3])
    np.testing.assert_allclose(fusion.ties(taus, k=0.5, lam=0.5)["w"], [-2, 1, -1.5, 1.5])
    # k = 1 keeps everything: element 0 sums to -1 -> mean of {-4} ; element 3: {3, 0.1}.
    np.testing.assert_allclose(
        fusion.ties(taus, k=1.0, lam=1.0)["w"], [-4, 1.5, -3, 1.55], rtol=1e-6
    )


@pytest.mark.parametrize("k", [0.25, 0.5, 0.75, 1.0])
def test_ties_matches_reference(k):
    taus = make_taus(4, seed=1)
    vs = [vec(t) for t in taus]
    assert_tree_close(fusion.ties(taus, k=k, lam=0.8), ref_ties(vs, k, 0.8), taus[0])


def test_ties_threshold_ties_kept_and_zeros_dropped():
    # d = 6, k = 0.25 -> m = 2; |3| ties at the threshold: all three kept.
    tau = {"w": jnp.array([3.0, -3.0, 1.0, 3.0, 0.0, 2.0])}
    (mask,) = fusion_common.topk_masks([tau], 0.25)
    np.testing.assert_array_equal(mask["w"], [True, True, False, True, False, False])
    # with many zeros the threshold is 0, yet zeros are not "kept".
    (mask,) = fusion_common.topk_masks([{"w": jnp.array([0.0, 0.0, 0.0, 1.0])}], 0.75)
    np.testing.assert_array_equal(mask["w"], [False, False, False, True])
    # exact cancellation elects no sign -> 0.
    out = fusion.ties([{"w": jnp.array([1.0])}, {"w": jnp.array([-1.0])}], k=1.0, lam=1.0)
    np.testing.assert_array_equal(out["w"], [0.0])


# ---------------------------------------------------------------- DARE


def test_dare_fixed_mask_exact():
    taus = make_taus(3, seed=2)
    vs = [vec(t) for t in taus]
    p, key = 0.3, jax.random.key(7)
    masks = [vec(m).astype(bool) for m in fusion.random_masks(taus, p, key)]
    dropped = [np.where(m, v / (1 - p), 0.0) for m, v in zip(masks, vs)]
    assert_tree_close(fusion.dare(taus, p, key, lam=0.6), 0.6 * sum(dropped), taus[0])
    assert_tree_close(
        fusion.dare(taus, p, key, base="ties", k=0.5, lam=0.9),
        ref_ties(dropped, 0.5, 0.9),
        taus[0],
    )
    # an int seed is the same as jax.random.key(seed)
    a, b = fusion.dare(taus, p, 3, lam=1.0), fusion.dare(taus, p, jax.random.key(3), lam=1.0)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # hand-made mask through drop_and_rescale
    t = [{"w": jnp.array([1.0, 2.0, -4.0])}]
    m = [{"w": jnp.array([True, False, True])}]
    np.testing.assert_allclose(fusion.drop_and_rescale(t, m, 0.5)[0]["w"], [2.0, 0.0, -8.0])
    with pytest.raises(ValueError, match="base method"):
        fusion.dare(taus, p, key, base="lorahub")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fusion.dare(taus, 1.0, key, lam=1.0)


def test_dare_unbiased_and_drop_rate():
    taus = make_taus(2, seed=3)
    vs = [vec(t) for t in taus]
    p, n_keys = 0.5, 2000
    keys = jax.random.split(jax.random.key(0), n_keys)
    merged = jax.jit(jax.vmap(lambda k: fusion.dare(taus, p, k, lam=1.0)))(keys)
    mean = vec(jax.tree.map(lambda x: np.asarray(x).mean(0), merged))
    # per element: Var = Σ_i τ_i² p/(1−p); allow 5 standard errors.
    se = np.sqrt(sum(v**2 for v in vs) * p / (1 - p) / n_keys)
    assert np.all(np.abs(mean - sum(vs)) <= 5 * se + 1e-6)
    big = [{"w": jnp.ones((20000,))}]
    kept = np.asarray(fusion.random_masks(big, 0.3, jax.random.key(1))[0]["w"]).mean()
    assert abs(kept - 0.7) < 0.015


# ---------------------------------------------------------------- isolation


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.5])
def test_isolation_matches_reference(p):
    taus = make_taus(3, seed=4)
    vs = [vec(t) for t in taus]
    assert_tree_close(fusion.isolation(taus, p=p, lam=0.3), ref_isolation(vs, p, 0.3), taus[0])
    cores = [set(np.flatnonzero(ref_keep(v, p))) for v in vs]
    jac = np.array([[len(a & b) / len(a | b) for b in cores] for a in cores])
    np.testing.assert_allclose(fusion.core_overlap(taus, p), jac)


def test_isolation_hand_computed():
    taus = [{"w": jnp.array([5.0, 1.0, 0.2, 0.1])}, {"w": jnp.array([-6.0, 0.3, 4.0, 0.1])}]
    # p = 0.25 -> one core element each: task 0 claims 0, task 1 claims 0 and... only 0 (|-6|).
    out = fusion.isolation(taus, p=0.25, lam=0.5)["w"]
    np.testing.assert_allclose(out, [-6.0, 0.65, 2.1, 0.1])
    np.testing.assert_allclose(fusion.core_overlap(taus, 0.25), [[1, 1], [1, 1]])
    out = fusion.isolation(taus, p=0.5, lam=0.5)["w"]  # cores {0,1} and {0,2}
    np.testing.assert_allclose(out, [-6.0, 1.0, 4.0, 0.1])
    np.testing.assert_allclose(fusion.core_overlap(taus, 0.5), [[1, 1 / 3], [1 / 3, 1]])


# ---------------------------------------------------------------- LoraHub


def test_lorahub_quadratic_optimum_and_bounds():
    taus = make_taus(3, seed=5)
    c = np.array([0.3, -0.7, 1.0])
    merged, w, hist = fusion.lorahub(
        taus, lambda w: float(np.sum((w - c) ** 2)), l1=0.0, budget=60, seed=0
    )
    np.testing.assert_allclose(w, c, atol=0.05)
    assert len(hist) == 60
    np.testing.assert_allclose(hist[0]["weights"], np.full(3, 1 / 3))
    assert hist[int(np.argmin([h["loss"] for h in hist]))]["weights"] is not None
    vs = [vec(t) for t in taus]
    assert_tree_close(merged, sum(wi * v for wi, v in zip(w, vs)), taus[0], atol=1e-4)
    # L1 soft-thresholds the optimum: argmin (w−c)² + l1|w| = c − sign(c)·l1/2.
    _, w, _ = fusion.lorahub(taus, lambda w: float(np.sum((w - c) ** 2)), l1=0.2, budget=60)
    np.testing.assert_allclose(w, c - np.sign(c) * 0.1, atol=0.05)
    # an optimum outside the box ends on its boundary; nothing outside is ever evaluated.
    c2 = np.array([3.0, -0.5])
    _, w, hist = fusion.lorahub(
        taus[:2], lambda w: float(np.sum((w - c2) ** 2)), l1=0.0, bounds=1.5, budget=40, seed=1
    )
    assert all(np.all(np.abs(h["weights"]) <= 1.5) for h in hist)
    np.testing.assert_allclose(w, [1.5, -0.5], atol=0.05)
    # seeded: the same search twice gives the same history
    _, _, h1 = fusion.lorahub(taus, lambda w: float(np.sum(w**2)), budget=15, seed=3)
    _, _, h2 = fusion.lorahub(taus, lambda w: float(np.sum(w**2)), budget=15, seed=3)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    # merge=False: the same search, no merged vector built.
    none, w3, h3 = fusion.lorahub(
        taus, lambda w: float(np.sum(w**2)), budget=15, seed=3, merge=False
    )
    assert none is None and [h["loss"] for h in h3] == [h["loss"] for h in h1]


# ---------------------------------------------------------------- registry and validation


def test_registry_and_grids():
    assert fusion.get("ties") is fusion.ties
    with pytest.raises(ValueError, match="valid names: average, dare, isolation"):
        fusion.get("tie")
    with pytest.raises(ValueError, match="valid names"):
        fusion.hparam_grid("nope")
    lams = [g["lam"] for g in fusion.hparam_grid("task_arithmetic")]
    np.testing.assert_allclose(lams, np.arange(21) * 0.05)
    assert fusion.default_grid("task_arithmetic") == fusion.hparam_grid("task_arithmetic")
    sizes = {n: len(fusion.hparam_grid(n)) for n in fusion.GRID_METHODS}
    assert sizes == {"average": 1, "task_arithmetic": 21, "ties": 84, "dare": 55, "isolation": 63}
    assert {g["k"] for g in fusion.hparam_grid("ties")} == {0.25, 0.5, 0.75, 1.0}
    assert {g["p"] for g in fusion.hparam_grid("dare")} == {0.1, 0.3, 0.5, 0.7, 0.9}
    with pytest.raises(ValueError, match="no default grid"):
        fusion.hparam_grid("weighted")
    taus = make_taus(2, seed=9)
    for name in fusion.GRID_METHODS:  # every grid entry is a complete keyword set
        for hp in fusion.hparam_grid(name)[::20]:
            merged = fusion.get(name)(taus, **hp)
            assert jax.tree.structure(merged) == jax.tree.structure(taus[0])
    assert set(fusion.FUSION_METHODS) >= set(fusion.GRID_METHODS) | {"weighted", "lorahub"}


def test_invalid_inputs():
    taus = make_taus(2)
    kws = {"average": {}, "task_arithmetic": {"lam": 1.0}, "ties": {}, "dare": {"p": 0.1, "key": 0}}
    for name, kw in kws.items():
        with pytest.raises(ValueError, match="non-empty list"):
            fusion.get(name)([], **kw)
    with pytest.raises(ValueError, match="list of task vectors"):
        fusion.average(taus[0])
    bad = jax.tree.map(lambda x: x, taus[1])
    bad["enc"]["k"] = bad["enc"].pop("v")
    with pytest.raises(ValueError, match=r"task vector 1 .*'enc/k/A' is only in task vector 1"):
        fusion.ties([taus[0], bad])
    bad = jax.tree.map(lambda x: x, taus[1])
    del bad["bias"]
    with pytest.raises(ValueError, match="'bias' is missing from task vector 1"):
        interference.cosine_matrix([taus[0], bad])
    bad = jax.tree.map(lambda x: x, taus[1])
    bad["enc"]["q"]["B"] = jnp.zeros((2, 6))
    with pytest.raises(ValueError, match=r"'enc/q/B': shape \(2, 6\) != \(2, 5\)"):
        fusion.task_arithmetic([taus[0], taus[0], bad], 0.5)
    with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
        fusion.ties(taus, k=0.0)
    with pytest.raises(ValueError, match=r"p must be a fraction"):
        fusion.core_overlap(taus, 1.5)
