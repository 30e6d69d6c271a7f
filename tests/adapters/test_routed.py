"""Routed (per-example) adapters equal running each example alone with its own adapter."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import adapters as adapter_lib
from llora_jax import tree as tree_lib
from llora_jax.adapters import routed
from llora_jax.backbones import bert, clip, t5, t5_decode
from llora_jax.backbones.clip_layers import VisionConfig
from llora_jax.backbones.t5_layers import T5Spec

TOL = 1e-5
FACTOR_IMPLS = ("gather", "ragged", "onehot")
IDS = [0, 2, -1, 1, 2]  # mixed adapters, a repeat and a bare-base row
# LoRA with mixed ranks through the factor forms; an L-LoRA study (one φ0, B0 = 0) through
# the shared-A0 form.
MODE_IMPLS = [("lora", i) for i in FACTOR_IMPLS] + [("l_lora", "shared_a")]
RANKS = {"lora": (2, 4, 3), "l_lora": (3, 3, 3)}


@functools.cache
def _bert():
    s = bert.BertSettings(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    m = bert.BertModel(s)
    return m, bert.init_params(m, jax.random.key(0)), bert.DEFAULT_LORA_TARGETS


@functools.cache
def _t5():
    s = T5Spec(
        vocab_size=40,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        dense_act_fn="gelu_new",
        is_gated_act=True,
        tie_word_embeddings=False,
    )
    m = t5.T5(s)
    return m, t5.init_params(m, jax.random.key(0)), t5.DEFAULT_LORA_TARGETS


@functools.cache
def _clip():
    vc = VisionConfig(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=16, patch_size=8
    )
    m = clip.CLIP(vision=vc, text=None)
    return m, clip.init_params(m, jax.random.key(0)), clip.DEFAULT_LORA_TARGETS


MODELS = {"bert": _bert, "t5": _t5, "clip": _clip}


@jax.jit
def _perturbed(phi0, key):
    leaves, tdef = jax.tree.flatten(phi0)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


@functools.cache
def _adapters(model, mode, ranks=(2, 4, 3), seed=10):
    """[(phi, phi0, scale)]: mixed ranks and scales, nonzero B (trained-looking)."""
    _, params, targets = MODELS[model]()
    out = []
    for i, r in enumerate(ranks):
        alpha = (1.5 + i) * r  # a different scale per adapter
        cfg = adapter_lib.LoraConfig(rank=r, alpha=alpha, targets=targets)
        # l_lora: one study, every task shares φ0 (same seed, same rank).
        key = jax.random.key(seed if mode == "l_lora" else seed + i)
        phi0 = adapter_lib.init_lora(key, params, cfg)
        out.append((_perturbed(phi0, jax.random.key(100 + i)), phi0, cfg.scale))
    return out


def _entries(adapters, mode):
    return [routed.entry(phi, mode=mode, scale=s, phi0=phi0) for phi, phi0, s in adapters]


def _alone(module, params, adapters, mode, ids, run):
    """Reference: each example alone, with its own adapter through attach.apply."""

    def one(i, a):
        if a < 0:
            return run(lambda *x, **k: module.apply({"params": params}, *x, **k), i)
        phi, phi0, s = adapters[a]
        kw = dict(mode=mode, scale=s, phi0=phi0 if mode != "lora" else None)
        return run(functools.partial(adapter_lib.apply, module, params, phi, **kw), i)

    # Jitted (a closure: compiled once per example) because op-by-op Flax is slower here.
    return np.concatenate(
        [np.asarray(jax.jit(functools.partial(one, i, a))()) for i, a in enumerate(ids)]
    )


def _check(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL)


@functools.cache
def _bert_case(mode):
    """(adapters, tokens, outputs of each example alone): computed once per mode."""
    m, params, _ = _bert()
    adapters = _adapters("bert", mode, (2, 4, 3) if mode == "lora" else (3, 3, 3))
    tokens = jax.random.randint(jax.random.key(1), (len(IDS), 7), 0, 50)
    want = _alone(m, params, adapters, mode, IDS, lambda f, i: f(tokens[i : i + 1]))
    return adapters, tokens, want


@pytest.mark.parametrize("impl", FACTOR_IMPLS)
@pytest.mark.parametrize("mode", ["lora", "l_lora"])
def test_bert_routed_equals_each_alone(impl, mode):
    m, params, _ = _bert()
    adapters, tokens, want = _bert_case(mode)
    bank = routed.stack(_entries(adapters, mode), kind="factors")
    got = jax.jit(lambda b, i, x: routed.apply(m, params, b, i, x, impl=impl))(
        bank, jnp.array(IDS), tokens
    )
    _check(got, want)


def test_l_lora_bank_with_b0_zero_shares_a0_and_matches():
    m, params, targets = _bert()
    cfg = adapter_lib.LoraConfig(rank=3, alpha=6.0, targets=targets)  # B0 = 0: the default init
    phi0 = adapter_lib.init_lora(jax.random.key(3), params, cfg)
    # A moved too: with B0 = 0 per-branch L-LoRA ignores A − A0, and so must the bank.
    adapters = [
        (_perturbed(phi0, jax.random.key(20 + i)), phi0, cfg.scale * (i + 1)) for i in range(3)
    ]
    bank = routed.stack(_entries(adapters, "l_lora"))
    assert bank.kind == "shared_a"
    factors = routed.stack(_entries(adapters, "l_lora"), kind="factors")
    assert routed.bytes_per_adapter(bank) * 2 == routed.bytes_per_adapter(factors)  # B only: half
    tokens = jax.random.randint(jax.random.key(1), (len(IDS), 6), 0, 50)
    got = routed.apply(m, params, bank, jnp.array(IDS), tokens)
    want = _alone(m, params, adapters, "l_lora", IDS, lambda f, i: f(tokens[i : i + 1]))
    _check(got, want)
    _check(routed.apply(m, params, factors, jnp.array(IDS), tokens, impl="gather"), want)


def test_merged_and_dense_delta_w_entries():
    """A fusion result is one more entry; dense ΔW entries give the same outputs."""
    m, params, _ = _bert()
    adapters = _adapters("bert", "lora", (3, 3))
    (p1, phi0, s), (p2, _, _) = adapters
    # Task arithmetic in adapter space around a common φ0 (the second adapter re-based on it).
    merged = tree_lib.add(
        phi0,
        tree_lib.add(
            tree_lib.scale(tree_lib.sub(p1, phi0), 0.7), tree_lib.scale(tree_lib.sub(p2, phi0), 0.4)
        ),
    )
    all_adapters = [*adapters, (merged, phi0, s)]
    ids = [2, 0, -1, 2, 1]
    tokens = jax.random.randint(jax.random.key(2), (len(ids), 5), 0, 50)
    want = _alone(m, params, all_adapters, "lora", ids, lambda f, i: f(tokens[i : i + 1]))
    factors = routed.stack(_entries(all_adapters, "lora"))
    _check(routed.apply(m, params, factors, jnp.array(ids), tokens, impl="gather"), want)
    dense = routed.stack(
        [routed.delta_w_entry(adapter_lib.delta_w(phi, s_)) for phi, _, s_ in all_adapters]
    )
    assert dense.kind == "dense"
    _check(routed.apply(m, params, dense, jnp.array(ids), tokens), want)
    # Mixed: factor entries are expanded to ΔW.
    mixed = routed.stack(
        [routed.delta_w_entry(adapter_lib.delta_w(p1, s)), *_entries(all_adapters[1:], "lora")]
    )
    _check(routed.apply(m, params, mixed, jnp.array(ids), tokens), want)


def test_rank_padding_is_bit_exact():
    m, params, _ = _bert()
    adapters = _adapters("bert", "lora", (2, 6))
    tokens = jax.random.randint(jax.random.key(4), (2, 5), 0, 50)
    alone = routed.stack(_entries(adapters[:1], "lora"), kind="factors")
    padded = routed.stack(_entries(adapters, "lora"))
    assert padded.max_rank == 6
    a = routed.apply(m, params, alone, jnp.array([0, 0]), tokens, impl="gather")
    b = routed.apply(m, params, padded, jnp.array([0, 0]), tokens, impl="gather")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@functools.cache
def _t5_forward_case(mode):
    m, params, _ = _t5()
    adapters = _adapters("t5", mode, RANKS[mode])
    ids = jax.random.randint(jax.random.key(5), (len(IDS), 6), 2, 40)
    dec = jax.random.randint(jax.random.key(6), (len(IDS), 4), 2, 40)
    mask = jnp.ones_like(ids)
    want = _alone(
        m,
        params,
        adapters,
        mode,
        IDS,
        lambda f, i: f(ids[i : i + 1], mask[i : i + 1], dec[i : i + 1]),
    )
    return adapters, (ids, mask, dec), want


@pytest.mark.parametrize(("mode", "impl"), MODE_IMPLS)
def test_t5_encoder_decoder_forward(mode, impl):
    m, params, _ = _t5()
    adapters, inputs, want = _t5_forward_case(mode)
    bank = routed.stack(_entries(adapters, mode))
    _check(routed.apply(m, params, bank, jnp.array(IDS), *inputs, impl=impl), want)


def _alone_apply_fn(module, phi, s):
    def fn(params, *args, **kwargs):
        if phi is None:
            return module.apply({"params": params}, *args, **kwargs)
        return adapter_lib.apply(module, params, phi, *args, scale=s, **kwargs)

    return fn


def _t5_inputs():
    ids = jax.random.randint(jax.random.key(7), (len(IDS), 6), 2, 40)
    mask = jnp.ones_like(ids).at[1, 4:].set(0)
    labels = jnp.array([[3, 4, 1], [5, 1, 0]])
    lmask = jnp.array([[1, 1, 1], [1, 1, 0]])
    return ids, mask, labels, lmask


@functools.cache
def _t5_alone_results():
    """Greedy tokens and label scores of each example run alone (computed once)."""
    m, params, _ = _t5()
    adapters = _adapters("t5", "lora")
    ids, mask, labels, lmask = _t5_inputs()
    fns = {a: _alone_apply_fn(m, *(adapters[a][::2] if a >= 0 else (None, None))) for a in set(IDS)}
    gen, scores = [], []
    for i, a in enumerate(IDS):
        x, xm = ids[i : i + 1], mask[i : i + 1]
        gen.append(t5_decode.greedy_decode(m, params, x, xm, 5, eos_token_id=-1, apply_fn=fns[a]))
        scores.append(t5_decode.score_label_words(m, params, x, xm, labels, lmask, apply_fn=fns[a]))
    return np.concatenate(gen), np.concatenate(scores)


@pytest.mark.parametrize("impl", FACTOR_IMPLS)
def test_t5_greedy_decoding_and_label_scoring(impl):
    m, params, targets = _t5()
    bank = routed.stack(_entries(_adapters("t5", "lora"), "lora"))
    ids, mask, labels, lmask = _t5_inputs()
    state = (params, bank, jnp.array(IDS))
    fn = routed.apply_fn(m, impl)
    gen = t5_decode.greedy_decode(m, state, ids, mask, 5, eos_token_id=-1, apply_fn=fn)
    # Label scoring repeats each example's encoder output once per label (k·B rows).
    scores = t5_decode.score_label_words(m, state, ids, mask, labels, lmask, apply_fn=fn)
    want_gen, want_scores = _t5_alone_results()
    np.testing.assert_array_equal(np.asarray(gen), want_gen)
    _check(scores, want_scores)


@functools.cache
def _clip_case(mode):
    m, params, _ = _clip()
    adapters = _adapters("clip", mode, RANKS[mode])
    pixels = jax.random.normal(jax.random.key(8), (len(IDS), 16, 16, 3))
    want = _alone(
        m, params, adapters, mode, IDS, lambda f, i: f(pixels[i : i + 1], method="encode_image")
    )
    return adapters, pixels, want


@pytest.mark.parametrize(("mode", "impl"), MODE_IMPLS)
def test_clip_vision_tower(mode, impl):
    m, params, _ = _clip()
    adapters, pixels, want = _clip_case(mode)
    bank = routed.stack(_entries(adapters, mode))
    got = routed.apply(m, params, bank, jnp.array(IDS), pixels, impl=impl, method="encode_image")
    _check(got, want)


def test_auto_choice_and_errors():
    m, params, _ = _bert()
    adapters = _adapters("bert", "lora")
    bank = routed.stack(_entries(adapters, "lora"))
    assert routed.choose_impl(bank, 8) == "onehot"  # 3 adapters × r 4 = 12 ≤ 64
    big = routed.RoutedBank(
        layers={
            p: {k: np.repeat(v, 10, axis=0) for k, v in lay.items()}
            for p, lay in bank.layers.items()
        },
        kind="factors",
    )
    assert routed.choose_impl(big, 8, distinct=8, platform="cpu") == "gather"
    assert routed.choose_impl(big, 64, distinct=4, platform="tpu") == "ragged"
    with pytest.raises(ValueError, match="does not run a 'factors' bank"):
        routed.apply(m, params, bank, jnp.array([0]), jnp.zeros((1, 4), jnp.int32), impl="shared_a")
    with pytest.raises(ValueError, match="other layers than entry 0"):
        e = _entries(adapters, "lora")
        routed.stack([e[0], {k: v for k, v in list(e[1].items())[:1]}])
    with pytest.raises(ValueError, match="same A per layer"):
        routed.stack(_entries(adapters, "lora"), kind="shared_a")
    with pytest.raises(ValueError, match="cannot be routed"):
        routed.entry(adapters[0][0], mode="l_lora_model", scale=1.0)
    with pytest.raises(ValueError, match="rows for a batch of"):
        routed.row_ids(jnp.array([0, 1]), 3)
