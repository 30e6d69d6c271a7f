"""LoRA / L-LoRA / whole-model linearization: closed forms and exact properties."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import adapters
from llora_jax import tree as tree_lib
from tests.fixtures import toy


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="query")(x)


def _perturb(tree, key, std=0.1):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def _cfg(**kw):
    base = dict(rank=3, alpha=6.0, targets=(r"query", r"value"))
    return adapters.LoraConfig(**(base | kw))


def test_l_lora_matches_closed_form_with_nonzero_b0():
    model = OneDense()
    x = jax.random.normal(jax.random.key(1), (7, 5))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = adapters.LoraConfig(rank=3, alpha=6.0, targets=("query",), init_b="normal", b0_std=0.3)
    phi0 = adapters.init_lora(jax.random.key(2), params, cfg)
    phi = _perturb(phi0, jax.random.key(3), 0.5)
    out = adapters.apply(model, params, phi, x, mode="l_lora", phi0=phi0, scale=cfg.scale)

    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    w0, b = f64(params["query"]["kernel"]), f64(params["query"]["bias"])
    a0, b0 = f64(phi0["query"]["A"]), f64(phi0["query"]["B"])
    a, bb = f64(phi["query"]["A"]), f64(phi["query"]["B"])
    xs = f64(x)
    s = cfg.scale
    ref = xs @ w0 + b + s * (xs @ a0 @ b0 + xs @ a0 @ (bb - b0) + xs @ (a - a0) @ b0)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(f64(phi0["query"]["B"])).max() > 0.1  # B0 really is nonzero
    # And it differs from plain LoRA, which has the second-order term (A−A0)(B−B0).
    lora = adapters.apply(model, params, phi, x, mode="lora", scale=s)
    assert np.abs(np.asarray(lora) - ref).max() > 1e-3


def test_l_lora_gives_zero_gradient_to_a_when_b0_is_zero():
    model, params, x = toy.make()
    cfg = _cfg()
    phi0 = adapters.init_lora(jax.random.key(4), params, cfg)
    phi = _perturb(phi0, jax.random.key(5))  # B != 0 now

    def loss(p, mode):
        out = adapters.apply(model, params, p, x, mode=mode, phi0=phi0, scale=cfg.scale)
        return jnp.sum(out**2)

    g_l = jax.grad(loss)(phi, "l_lora")
    g_lora = jax.grad(loss)(phi, "lora")
    for name, g in tree_lib.flatten(g_l).items():
        if name.endswith("/A"):
            assert np.all(np.asarray(g) == 0.0), name
        else:
            assert np.abs(np.asarray(g)).max() > 0, name
    assert all(
        np.abs(np.asarray(g)).max() > 0
        for n, g in tree_lib.flatten(g_lora).items()
        if n.endswith("/A")
    )


def test_l_lora_model_is_exactly_linear_and_lora_is_not():
    model, params, x = toy.make(seed=1)
    cfg = _cfg()
    phi0 = _perturb(adapters.init_lora(jax.random.key(6), params, cfg), jax.random.key(60), 0.2)
    t1 = _perturb(tree_lib.zeros_like(phi0), jax.random.key(7), 0.5)
    t2 = _perturb(tree_lib.zeros_like(phi0), jax.random.key(8), 0.5)

    def f(phi, mode):
        return adapters.apply(model, params, phi, x, mode=mode, phi0=phi0, scale=cfg.scale)

    def gap(mode):
        base = f(phi0, mode)
        both = f(tree_lib.add(phi0, tree_lib.add(t1, t2)), mode) - base
        parts = (f(tree_lib.add(phi0, t1), mode) - base) + (f(tree_lib.add(phi0, t2), mode) - base)
        return float(jnp.linalg.norm(both - parts) / jnp.linalg.norm(both))

    assert gap("l_lora_model") <= 1e-5
    assert gap("lora") > 1e-3
    # The linearized model agrees with LoRA at the linearization point.
    np.testing.assert_allclose(f(phi0, "l_lora_model"), f(phi0, "lora"), rtol=1e-6, atol=1e-6)


def test_linear_shortcut_matches_direct_evaluation():
    model, params, x = toy.make(seed=2)
    cfg = _cfg()
    phi0 = adapters.init_lora(jax.random.key(9), params, cfg)
    taus = [_perturb(tree_lib.zeros_like(phi0), jax.random.key(10 + i), 0.3) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *taus)
    lambdas = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.5, -0.3], [-2.0, 0.2, 1.1]])

    def f(p):
        return adapters.apply(model, params, p, x, mode="lora", scale=cfg.scale)

    y0, jt = adapters.linearize_outputs(f, phi0, stacked)
    grid = adapters.combine_linear(y0, jt, lambdas)
    for k in range(lambdas.shape[0]):
        tau = tree_lib.weighted_sum(taus, lambdas[k])
        direct = adapters.apply(
            model,
            params,
            tree_lib.add(phi0, tau),
            x,
            mode="l_lora_model",
            phi0=phi0,
            scale=cfg.scale,
        )
        np.testing.assert_allclose(grid[k], direct, rtol=1e-5, atol=1e-5)


def test_zero_b_leaves_model_unchanged_and_merge_matches_adapter_path():
    model, params, x = toy.make(seed=3)
    cfg = _cfg()
    phi0 = adapters.init_lora(jax.random.key(11), params, cfg)
    base = model.apply({"params": params}, x)
    for mode in ("lora", "l_lora"):
        out = adapters.apply(model, params, phi0, x, mode=mode, phi0=phi0, scale=cfg.scale)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    # Under jvp XLA evaluates the primal through differentiation rules: equal to rounding.
    out = adapters.apply(model, params, phi0, x, mode="l_lora_model", phi0=phi0, scale=cfg.scale)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-6, atol=1e-6)

    phi = _perturb(phi0, jax.random.key(12), 0.3)
    for mode in ("lora", "l_lora"):
        adapted = adapters.apply(model, params, phi, x, mode=mode, phi0=phi0, scale=cfg.scale)
        merged = adapters.merge_into_params(params, phi, cfg.scale, phi0=phi0, mode=mode)
        direct = model.apply({"params": merged}, x)
        np.testing.assert_allclose(np.asarray(direct), np.asarray(adapted), rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(direct - base)).max() > 1e-3
    with pytest.raises(ValueError, match="no weight-space merge"):
        adapters.merge_into_params(params, phi, cfg.scale, phi0=phi0, mode="l_lora_model")


def test_targets_select_only_matching_dense_layers():
    _, params, _ = toy.make()
    mods = adapters.target_modules(params, (r"query", r"value"))
    assert mods == [f"layer_{i}/{n}" for i in range(2) for n in ("query", "value")]
    phi = adapters.init_lora(jax.random.key(0), params, _cfg(rank=4))
    a = phi["layer_0"]["query"]["A"]
    assert a.shape == (8, 4) and phi["layer_0"]["query"]["B"].shape == (4, 8)
    # PEFT's Kaiming-uniform(a=sqrt(5)) on a (r, in) weight is U(-1/sqrt(in), 1/sqrt(in)).
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(8) and float(jnp.abs(a).max()) > 0.5 / np.sqrt(8)
    assert float(jnp.abs(phi["layer_0"]["query"]["B"]).max()) == 0.0


def test_misspelled_target_raises_and_lists_paths():
    _, params, _ = toy.make()
    with pytest.raises(
        ValueError, match=r"(?s)v_porj.*matches no parameter path.*layer_0/query/kernel"
    ):
        adapters.init_lora(jax.random.key(0), params, _cfg(targets=("query", "v_porj")))


def test_adapter_for_another_model_is_refused():
    model, params, x = toy.make()
    phi = adapters.init_lora(jax.random.key(0), params, _cfg())
    flat = {n.replace("layer_1", "layer_9"): v for n, v in tree_lib.flatten(phi).items()}
    with pytest.raises(ValueError, match="never called"):
        adapters.apply(model, params, tree_lib.unflatten(flat), x, scale=1.0)


def test_unknown_mode_and_missing_phi0_are_refused():
    model, params, x = toy.make()
    phi = adapters.init_lora(jax.random.key(0), params, _cfg())
    with pytest.raises(ValueError, match="valid modes"):
        adapters.apply(model, params, phi, x, mode="l-lora", scale=1.0)
    with pytest.raises(ValueError, match="needs phi0"):
        adapters.apply(model, params, phi, x, mode="l_lora", scale=1.0)


def test_adapter_dropout_only_with_rng():
    model, params, x = toy.make()
    cfg = _cfg(dropout=0.5)
    phi = _perturb(adapters.init_lora(jax.random.key(0), params, cfg), jax.random.key(1), 0.5)
    kw = dict(mode="lora", scale=cfg.scale, dropout=cfg.dropout)
    a = adapters.apply(model, params, phi, x, **kw)
    b = adapters.apply(model, params, phi, x, **kw)
    c = adapters.apply(model, params, phi, x, dropout_rng=jax.random.key(3), **kw)
    d = adapters.apply(model, params, phi, x, dropout_rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)
    assert np.abs(np.asarray(a - c)).max() > 1e-4


def test_jit_and_grad_compose():
    model, params, x = toy.make()
    cfg = _cfg()
    phi0 = adapters.init_lora(jax.random.key(0), params, cfg)

    @jax.jit
    def loss(p):
        return jnp.mean(
            adapters.apply(model, params, p, x, mode="l_lora", phi0=phi0, scale=2.0) ** 2
        )

    g = jax.grad(loss)(phi0)
    assert tree_lib.num_params(g) == tree_lib.num_params(phi0)
