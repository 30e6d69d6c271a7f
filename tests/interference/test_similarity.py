"""Similarity of task vectors (cosine, ΔW) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax.interference import similarity
from tests.fusion.test_methods import make_taus, vec


def test_cosine_matrix_and_off_diagonal():
    taus = make_taus(3, seed=6)
    taus.append(jax.tree.map(jnp.zeros_like, taus[0]))
    vs = [vec(t) for t in taus]
    ref = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            d = np.linalg.norm(vs[i]) * np.linalg.norm(vs[j])
            ref[i, j] = vs[i] @ vs[j] / d if d > 0 else 0.0
    m = similarity.cosine_matrix(taus)
    np.testing.assert_allclose(m, ref, atol=1e-6)
    assert similarity.mean_off_diagonal(m) == pytest.approx((ref.sum() - np.trace(ref)) / 12)
    with pytest.raises(ValueError, match="square"):
        similarity.mean_off_diagonal(np.ones((2, 3)))


def test_lora_delta_w():
    rng = np.random.default_rng(8)
    phi0 = {
        "enc": {"q": {"A": rng.normal(size=(4, 2)), "B": rng.normal(size=(2, 3))}},
        "dec": {"v": {"A": rng.normal(size=(5, 2)), "B": np.zeros((2, 6))}},
    }
    tau = jax.tree.map(lambda x: 0.1 * rng.normal(size=x.shape), phi0)
    s = 2.0
    dw = similarity.lora_delta_w(tau, phi0, s)
    assert set(dw) == {"enc/q", "dec/v"}
    for path, (grp, name) in {"enc/q": ("enc", "q"), "dec/v": ("dec", "v")}.items():
        a0, b0 = phi0[grp][name]["A"], phi0[grp][name]["B"]
        ta, tb = tau[grp][name]["A"], tau[grp][name]["B"]
        np.testing.assert_allclose(dw[path], s * ((a0 + ta) @ (b0 + tb) - a0 @ b0), atol=1e-5)
        lin = similarity.lora_delta_w(tau, phi0, s, linearized=True)[path]
        np.testing.assert_allclose(lin, s * (a0 @ tb + ta @ b0), atol=1e-5)
    with pytest.raises(ValueError, match="needs both A and B"):
        similarity.lora_delta_w({"q": {"A": np.ones((2, 2))}}, phi0, s)
