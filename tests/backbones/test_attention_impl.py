"""attention_impl of the backbones: jax.nn.dot_product_attention ("auto", "xla") against the
explicit einsum + softmax code ("reference") on tiny random models, in float32 (1e-5) and
bfloat16 (loose), with padding masks, CLIP's causal text mask, T5's relative-position bias and
T5's cached greedy decoding. The reference path itself is checked against transformers in
test_bert.py / test_clip.py / test_t5.py (which run the default, "auto", too)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax.backbones import bert, bert_hf, clip, clip_layers, t5, t5_layers
from llora_jax.backbones.attention import with_attention_impl
from llora_jax.backbones.clip_layers import (
    TextConfig,
    TextTransformer,
    VisionConfig,
    VisionTransformer,
)
from llora_jax.backbones.t5_layers import T5Spec

FUSED = ("auto", "xla")
TOL32 = 1e-5


def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def _max_diff(a, b) -> float:
    """Largest |a - b| over the leaves of two pytrees (numpy: no eager JAX compilations)."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    return max(float(np.max(np.abs(_f32(x) - _f32(y)))) for x, y in zip(a, b))


RNG = np.random.default_rng(0)


def _mask(lengths: list[int], t: int, left: tuple[int, ...] = ()) -> np.ndarray:
    """0/1 (len(lengths), t): right padding, or left padding for the rows in ``left``."""
    m = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        if i in left:
            m[i, t - n :] = 1
        else:
            m[i, :n] = 1
    return m


@functools.partial(jax.jit, static_argnames=("module", "method", "deterministic"))
def _apply(module, params, *args, method=None, deterministic=True, rngs=None):
    kw = {} if method is None else {"method": method}
    return module.apply({"params": params}, *args, deterministic=deterministic, rngs=rngs, **kw)


def _clone(module, field: str, impl: str, dtype=None):
    """``module`` with ``attention_impl`` set in its config ``field`` (and a compute dtype)."""
    cfg = dataclasses.replace(getattr(module, field), attention_impl=impl)
    kw = {} if dtype is None else {"dtype": dtype}
    return module.clone(**{field: cfg}, **kw)


# ----------------------------------------------------------------------------- BERT

BERT = bert.BertSettings(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=16,
)


@pytest.fixture(scope="module")
def bert_case():
    module = bert.BertModel(BERT, add_pooling_layer=True)
    params = jax.jit(lambda r: bert.init_params(module, r, seq_len=10))(jax.random.key(0))
    ids = RNG.integers(0, 50, (3, 10))
    # Row 2 is left-padded; row 1 has a single real token.
    mask = _mask([10, 1, 6], 10, left=(2,))
    return module, params, ids, mask


@pytest.mark.parametrize("impl", FUSED)
def test_bert_fused_equals_reference_f32(bert_case, impl):
    module, params, ids, mask = bert_case
    ref = _apply(_clone(module, "cfg", "reference"), params, ids, mask)
    got = _apply(_clone(module, "cfg", impl), params, ids, mask)
    assert _max_diff(got, ref) < TOL32
    # The padding mask matters: without it the outputs differ.
    assert _max_diff(_apply(_clone(module, "cfg", impl), params, ids, None), ref) > 1e-3


def test_bert_bf16_close_and_grads_equal(bert_case):
    module, params, ids, mask = bert_case
    f32 = _apply(_clone(module, "cfg", "reference"), params, ids, mask)[0]
    ref16 = _apply(_clone(module, "cfg", "reference", jnp.bfloat16), params, ids, mask)[0]
    got16 = _apply(_clone(module, "cfg", "auto", jnp.bfloat16), params, ids, mask)[0]
    assert got16.dtype == jnp.bfloat16
    err_ref, err_got = _max_diff(ref16, f32), _max_diff(got16, f32)
    assert err_got < 0.1 and err_got < 2 * err_ref + 1e-2, (err_got, err_ref)

    def loss(p, impl):
        h, pooled = _clone(module, "cfg", impl).apply({"params": p}, ids, mask)
        return jnp.sum(h * jnp.sin(h)) + jnp.sum(pooled)

    g_ref = jax.jit(jax.grad(functools.partial(loss, impl="reference")))(params)
    g_auto = jax.jit(jax.grad(functools.partial(loss, impl="auto")))(params)
    assert _max_diff(g_auto, g_ref) < 1e-4


def test_bert_attention_dropout_uses_reference_path(bert_case):
    # jax.nn.dot_product_attention has no dropout: with dropout active every impl must give
    # exactly the reference result for the same rng (and differ from the deterministic one).
    module, params, ids, mask = bert_case
    rngs = {"dropout": jax.random.key(3, impl="rbg")}  # rbg: compiles much faster
    kw = dict(deterministic=False, rngs=rngs)
    ref = _apply(_clone(module, "cfg", "reference"), params, ids, mask, **kw)
    got = _apply(_clone(module, "cfg", "auto"), params, ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
    assert _max_diff(got, _apply(module, params, ids, mask)) > 1e-3


def test_settings_from_hf_config_keeps_default_impl():
    cfg = dataclasses.asdict(BERT) | {"position_embedding_type": "absolute"}
    cfg.pop("attention_impl")
    settings = bert_hf.settings_from_hf_config(type("Cfg", (), cfg)())
    assert settings == BERT and settings.attention_impl == "auto"


# ----------------------------------------------------------------------------- CLIP

VISION = VisionConfig(
    hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, image_size=16, patch_size=4
)
TEXT = TextConfig(
    hidden_size=32,
    intermediate_size=48,
    num_layers=1,
    num_heads=4,
    vocab_size=40,
    max_position_embeddings=12,
    eos_token_id=39,
)


def _init(module, *args):
    return jax.jit(lambda r: nn.unbox(module.init(r, *args))["params"])(jax.random.key(0))


@pytest.fixture(scope="module")
def clip_case():
    vision, text = VisionTransformer(VISION), TextTransformer(TEXT)
    pixels = RNG.normal(size=(2, 16, 16, 3)).astype(np.float32)
    ids = RNG.integers(0, 39, (3, 9))
    # Left padding of row 2 leaves its first query with no allowed key (causal & padding).
    mask = _mask([9, 4, 5], 9, left=(2,))
    params = {
        "vision": _init(vision, pixels),
        "text": _init(text, ids, mask),
    }
    return vision, text, params, pixels, ids, mask


@pytest.mark.parametrize("impl", FUSED)
def test_clip_fused_equals_reference_f32(clip_case, impl):
    vision, text, params, pixels, ids, mask = clip_case
    v_ref = _apply(_clone(vision, "cfg", "reference"), params["vision"], pixels)
    v_got = _apply(_clone(vision, "cfg", impl), params["vision"], pixels)
    assert _max_diff(v_got, v_ref) < TOL32
    for m in (mask, None):  # causal + padding, causal only
        t_ref = _apply(_clone(text, "cfg", "reference"), params["text"], ids, m)
        t_got = _apply(_clone(text, "cfg", impl), params["text"], ids, m)
        assert _max_diff(t_got, t_ref) < TOL32
    # Causality: changing the last token leaves the earlier positions unchanged.
    ids2 = ids.copy()
    ids2[:, -1] = (ids[:, -1] + 1) % 39
    h1 = _f32(_apply(_clone(text, "cfg", impl), params["text"], ids, None)[0])
    h2 = _f32(_apply(_clone(text, "cfg", impl), params["text"], ids2, None)[0])
    assert _max_diff(h1[:, :-1], h2[:, :-1]) < TOL32 and _max_diff(h1, h2) > 1e-3


def test_clip_bf16_close_and_jvp_equal(clip_case):
    vision, _, params, pixels, _, _ = clip_case
    p = params["vision"]
    f32 = _apply(_clone(vision, "cfg", "reference"), p, pixels)[0]
    ref16 = _apply(_clone(vision, "cfg", "reference", jnp.bfloat16), p, pixels)[0]
    got16 = _apply(_clone(vision, "cfg", "auto", jnp.bfloat16), p, pixels)[0]
    err_ref, err_got = _max_diff(ref16, f32), _max_diff(got16, f32)
    assert err_got < 0.1 and err_got < 2 * err_ref + 1e-2, (err_got, err_ref)

    # Forward-mode AD (l_lora_model linearizes the whole backbone) goes through "auto".
    tangent = jax.tree.map(
        lambda x: np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape), p
    )

    def jvp(impl):
        f = lambda q: _clone(vision, "cfg", impl).apply({"params": q}, pixels)[1]  # noqa: E731
        return jax.jit(lambda: jax.jvp(f, (p,), (tangent,)))()

    assert _max_diff(jvp("auto"), jvp("reference")) < 1e-4


# ----------------------------------------------------------------------------- T5

SPEC = T5Spec(
    vocab_size=40,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=1,
    num_decoder_layers=2,  # block 1 reuses block 0's relative-position bias
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dense_act_fn="gelu_new",
    is_gated_act=True,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def t5_case():
    module = t5.T5(SPEC)
    init = lambda r: t5.init_params(module, r, input_length=11, target_length=6)  # noqa: E731
    params = jax.jit(init)(jax.random.key(0))
    ids = RNG.integers(2, 40, (3, 11))
    mask = _mask([11, 7, 3], 11)
    dec_in = RNG.integers(2, 40, (3, 6))
    dec_mask = _mask([6, 6, 4], 6)
    return module, params, ids, mask, dec_in, dec_mask


@pytest.mark.parametrize("impl", FUSED)
def test_t5_fused_equals_reference_f32(t5_case, impl):
    module, params, ids, mask, dec_in, dec_mask = t5_case
    ref_m, got_m = _clone(module, "spec", "reference"), _clone(module, "spec", impl)
    # Encoder (relative bias + padding), decoder self-attention (relative bias + causal and
    # padding masks) and cross-attention (padding only).
    ref = _apply(ref_m, params, ids, mask, dec_in, dec_mask)
    got = _apply(got_m, params, ids, mask, dec_in, dec_mask)
    assert _max_diff(got, ref) < TOL32
    enc = _apply(got_m, params, ids, mask, method="encode")
    # The encoder padding mask is used: padding tokens do not change the real positions.
    ids2 = np.where(mask > 0, ids, 5)
    enc2 = _f32(_apply(got_m, params, ids2, mask, method="encode"))
    assert _max_diff(enc2 * mask[..., None], _f32(enc) * mask[..., None]) < TOL32


def test_t5_bf16_close(t5_case):
    module, params, ids, mask, dec_in, dec_mask = t5_case
    f32 = _apply(_clone(module, "spec", "reference"), params, ids, mask, dec_in, dec_mask)
    ref16 = _apply(
        _clone(module, "spec", "reference", jnp.bfloat16), params, ids, mask, dec_in, dec_mask
    )
    got16 = _apply(
        _clone(module, "spec", "auto", jnp.bfloat16), params, ids, mask, dec_in, dec_mask
    )
    scale = float(np.max(np.abs(_f32(f32))))
    err_ref, err_got = _max_diff(ref16, f32) / scale, _max_diff(got16, f32) / scale
    assert err_got < 0.1 and err_got < 2 * err_ref + 1e-2, (err_got, err_ref)


def test_t5_cached_decoding_equal(t5_case):
    module, params, ids, mask, dec_in, _ = t5_case
    ref_m, got_m = _clone(module, "spec", "reference"), _clone(module, "spec", "auto")
    n = 6
    want = t5.greedy_decode(ref_m, params, ids, mask, n, eos_token_id=-1)
    got = t5.greedy_decode(got_m, params, ids, mask, n, eos_token_id=-1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(np.unique(np.asarray(want))) > 2  # not a degenerate repetition

    # Step logits of the cache path (self-attention masked by position, cached cross keys).
    @functools.partial(jax.jit, static_argnums=0)
    def steps(m, params):
        enc = m.apply({"params": params}, ids, mask, method="encode")
        cache = t5.init_decode_cache(m, ids.shape[0], 4)
        outs = []
        for i in range(4):  # encoder states only on the first step (then cached)
            tok, e = dec_in[:, i : i + 1], enc if i == 0 else None
            out, cache = m.apply({"params": params}, tok, e, mask, cache=cache, method="decode")
            outs.append(out)
        return jnp.concatenate(outs, axis=1)

    assert _max_diff(steps(got_m, params), steps(ref_m, params)) < TOL32


# ----------------------------------------------------------------------------- threading
# (the cuDNN branch, its choice and its inputs: test_attention_choice.py)


def test_config_reaches_every_attention(monkeypatch, bert_case, clip_case, t5_case):
    """The config's attention_impl is what every attention call receives."""
    seen: list[str] = []
    real = clip_layers.fused_attention

    def spy(*args, impl, **kw):
        seen.append(impl)
        return real(*args, impl="xla", **kw)

    for mod in (bert, clip_layers, t5_layers):  # each module's own imported name
        monkeypatch.setattr(mod, "fused_attention", spy)

    # Tracing is enough (the spy records at trace time): eval_shape compiles nothing.
    def trace(module, params, *args):
        jax.eval_shape(lambda p: module.apply({"params": p}, *args), params)

    module, params, ids, mask = bert_case
    trace(with_attention_impl(module, "cudnn"), params, ids, mask)
    assert seen == ["cudnn"] * BERT.num_hidden_layers
    seen.clear()
    vision, text, cparams, pixels, tids, tmask = clip_case
    trace(with_attention_impl(vision, "cudnn"), cparams["vision"], pixels)
    trace(with_attention_impl(text, "cudnn"), cparams["text"], tids, tmask)
    assert seen == ["cudnn"] * (VISION.num_layers + TEXT.num_layers)
    seen.clear()
    module, params, ids, mask, dec_in, dec_mask = t5_case
    trace(with_attention_impl(module, "cudnn"), params, ids, mask, dec_in, dec_mask)
    # Encoder self-attention, decoder self- and cross-attention.
    assert seen == ["cudnn"] * (SPEC.num_layers + 2 * SPEC.num_decoder_layers)


def test_with_attention_impl_sets_both_clip_towers_and_refuses_other_modules():
    both = clip.CLIP(vision=VISION, text=TEXT, projection_dim=8)
    got = with_attention_impl(both, "reference")
    assert (got.vision.attention_impl, got.text.attention_impl) == ("reference", "reference")
    assert both.vision.attention_impl == "auto"  # a new module; the old one is unchanged
    with pytest.raises(ValueError, match="Dense has no attention settings"):
        with_attention_impl(nn.Dense(3), "xla")
    with pytest.raises(ValueError, match="attention_impl='fast'"):
        with_attention_impl(both, "fast")


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="T5Spec: attention_impl='flash'"):
        dataclasses.replace(SPEC, attention_impl="flash")
    with pytest.raises(ValueError, match="BertSettings"):
        dataclasses.replace(BERT, attention_impl="Auto")
    with pytest.raises(ValueError, match="VisionConfig"):
        dataclasses.replace(VISION, attention_impl="")
