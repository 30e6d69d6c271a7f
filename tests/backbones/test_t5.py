"""T5 / Flan-T5 backbone: parity with transformers (torch) on tiny random checkpoints."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llora_jax import tree as tree_lib  # noqa: E402
from llora_jax.backbones import hf, t5  # noqa: E402
from llora_jax.backbones.hf import load_backbone  # noqa: E402

VOCAB = 64
# v1.0: ReLU feed-forward, tied embeddings (scaled decoder output).
# v1.1 / Flan: gated-GELU, untied lm_head, more decoder than encoder layers, heads*d_kv != d_model.
CONFIGS = {
    "v1": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="relu"),
    "v11": dict(
        d_model=40,
        d_kv=8,
        d_ff=56,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=3,
        feed_forward_proj="gated-gelu",
    ),
}
TOL = 1e-4


def _build(kind, path):
    torch.manual_seed(0 if kind == "v1" else 1)
    tied = kind == "v1"
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        relative_attention_num_buckets=8,  # small, so the log-spaced buckets are exercised
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        tie_word_embeddings=tied,
        **CONFIGS[kind],
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        # Re-draw the weights: HF's init makes a tiny tied model repeat one token forever.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "shared" in name:
                p.normal_(0.0, 0.5)
            elif p.ndim == 2 and "relative" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
    if not tied:
        # transformers 5 ties lm_head to shared even for tie_word_embeddings=False (NOTES.md).
        model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, cfg.d_model))
        model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    assert (ref.lm_head.weight.data_ptr() == ref.shared.weight.data_ptr()) == tied
    return ref


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny models: one torch thread avoids oversubscribing the cores that XLA's pool also
    # uses (seen: HF generate ~100x slower with the default thread count once JAX ran).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CASES: dict = {}


def _case(kind, tmp_path_factory):
    """(kind, checkpoint dir, torch reference, Backbone), built once per test session."""
    if kind not in _CASES:
        path = tmp_path_factory.mktemp(kind)
        ref = _build(kind, path)
        _CASES[kind] = (kind, path, ref, load_backbone(str(path)))
    return _CASES[kind]


@pytest.fixture(scope="module", params=["v1", "v11"])
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def flan(tmp_path_factory):
    """The v1.1 / Flan configuration only, for checks that one configuration suffices."""
    return _case("v11", tmp_path_factory)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids = np.where(mask > 0, ids, 0)
    labels = rng.integers(2, VOCAB, (3, 7))
    labels[1, 5:] = -100
    labels[2, 2:] = -100
    return ids, mask, labels


@functools.partial(jax.jit, static_argnames=("module", "method", "deterministic"))
def _run(module, params, *args, method="__call__", deterministic=True, rngs=None):
    """Jitted module.apply: one compilation instead of op-by-op dispatch (keeps tests fast)."""
    kw = {} if method == "__call__" else {"method": method}
    return module.apply({"params": params}, *args, deterministic=deterministic, rngs=rngs, **kw)


def _enc_and_logits(model, ids, mask, dec_in, dec_mask, deterministic=True):
    enc = model.encode(ids, mask, deterministic)
    return enc, model.decode(dec_in, enc, mask, dec_mask, deterministic)


def _t(x):
    return torch.tensor(np.asarray(x))


def test_relative_position_buckets_match_hf():
    rel = np.arange(-300, 301)
    att = transformers.models.t5.modeling_t5.T5Attention
    for nb, md in [(32, 128), (8, 20)]:
        for bidirectional in (True, False):
            ref = att._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md
            ).numpy()
            got = t5.relative_position_bucket(jnp.asarray(rel), bidirectional, nb, md)
            np.testing.assert_array_equal(np.asarray(got), ref)


def test_param_tree_mirrors_hf_names_and_axes(case):
    kind, _, ref, bb = case
    flat = tree_lib.flatten(bb.params)
    n_hf = sum(p.numel() for p in ref.parameters())
    assert tree_lib.num_params(bb.params) == n_hf
    rel = [k for k in flat if "relative_attention_bias" in k]
    assert rel == [
        "decoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
        "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
    ]
    assert ("lm_head/kernel" in flat) == (kind == "v11")
    ff = "DenseReluDense/wi_0/kernel" if kind == "v11" else "DenseReluDense/wi/kernel"
    assert f"encoder/block_1/layer_1/{ff}" in flat and f"decoder/block_1/layer_2/{ff}" in flat
    q = ref.decoder.block[1].layer[1].EncDecAttention.q.weight.detach().numpy()
    np.testing.assert_array_equal(flat["decoder/block_1/layer_1/EncDecAttention/q/kernel"], q.T)
    # Logical axis names on every parameter.
    boxed = jax.eval_shape(lambda: bb.module.init(jax.random.key(0), *_dummy()))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=_is_box)[0]
    assert all(_is_box(v) for _, v in leaves)
    axes = {tree_lib.path_str(p): v.names for p, v in leaves}
    assert axes["shared/embedding"] == ("vocab", "embed")
    assert axes["encoder/block_0/layer_0/SelfAttention/q/kernel"] == ("embed", "qkv")
    assert axes["encoder/block_0/layer_0/SelfAttention/o/kernel"] == ("qkv", "embed")
    assert axes[rel[0]] == ("relpos", "heads")
    assert axes[f"encoder/block_0/layer_1/{ff}"] == ("embed", "mlp")
    assert axes["encoder/final_layer_norm/weight"] == ("embed",)
    targets = tree_lib.select_paths(list(flat), t5.DEFAULT_LORA_TARGETS)
    n_dec = bb.module.spec.num_decoder_layers
    assert len(targets) == 2 * (bb.module.spec.num_layers + 2 * n_dec)
    assert all(k.split("/")[-2] in ("q", "v") for k in targets)


def _is_box(x):
    return isinstance(x, nn.Partitioned)


def _dummy():
    ids = jnp.zeros((1, 4), jnp.int32)
    return ids, jnp.ones_like(ids), ids


def test_forward_and_loss_match_torch(case):
    _, _, ref, bb = case
    ids, mask, labels = _batch()
    dec_mask = (labels != -100).astype(np.int64)
    with torch.no_grad():
        out = ref(
            input_ids=_t(ids),
            attention_mask=_t(mask),
            labels=_t(labels),
            decoder_attention_mask=_t(dec_mask),
        )
    dec_in = t5.shift_right(labels, 0, 0)
    np.testing.assert_array_equal(np.asarray(dec_in), ref._shift_right(_t(labels)).numpy())
    enc, logits = _run(bb.module, bb.params, ids, mask, dec_in, dec_mask, method=_enc_and_logits)
    np.testing.assert_allclose(enc, out.encoder_last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=TOL, rtol=0)
    assert abs(float(t5.loss(logits, labels)) - out.loss.item()) <= TOL
    # An explicit label mask is the same as HF's -100 convention.
    safe = np.where(labels < 0, 0, labels)
    assert abs(float(t5.loss(logits, safe, dec_mask)) - out.loss.item()) <= TOL


def test_bfloat16_compute_close_to_float32(flan):
    _, path, _, bb = flan
    ids, mask, labels = _batch(1)
    dec_in = t5.shift_right(labels, 0, 0)
    ones = np.ones(dec_in.shape, np.int64)
    ref = np.asarray(_run(bb.module, bb.params, ids, mask, dec_in, ones, method=_enc_and_logits)[1])
    # bfloat16 storage and compute (loading casts the weights).
    low = load_backbone(str(path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(low.params)} == {jnp.dtype(jnp.bfloat16)}
    enc, got = _run(low.module, low.params, ids, mask, dec_in, ones, method=_enc_and_logits)
    assert enc.dtype == jnp.bfloat16 and got.dtype == jnp.float32
    # Stated tolerance: bf16 keeps ~3 significant digits and errors compound over the
    # layers; logits stay within 6% of their largest magnitude (seen: 3.7%) and the
    # predicted token agrees at >= 90% of positions.
    got = np.asarray(got)
    assert np.abs(got - ref).max() <= 0.06 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def _hf_generate(ref, ids, mask, n, eos):
    with torch.no_grad():
        out = ref.generate(
            input_ids=_t(ids),
            attention_mask=_t(mask),
            do_sample=False,
            num_beams=1,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=0,
            decoder_start_token_id=0,
            use_cache=False,  # HF's cache fails when num_decoder_layers != num_layers
        ).numpy()
    assert (out[:, 0] == 0).all()
    out = out[:, 1:]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=0)


def test_greedy_decode_matches_generate(case):
    _, _, ref, bb = case
    ids, mask, _ = _batch(2)
    n = 9
    free = _hf_generate(ref, ids, mask, n, eos=VOCAB + 5)  # an id never produced: no stop
    got_free = t5.greedy_decode(bb.module, bb.params, ids, mask, n, eos_token_id=-1)
    assert got_free.shape == (3, n) and got_free.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_free), free)
    # An EOS that stops one row midway while another row never produces it.
    first = {t: [list(r).index(t) if t in r else n for r in free] for t in np.unique(free)}
    eos = next(t for t, f in first.items() if any(0 < i < n - 1 for i in f) and max(f) == n)
    want = _hf_generate(ref, ids, mask, n, eos=int(eos))
    assert (want == 0).any()  # some row was padded after its EOS
    got = t5.greedy_decode(bb.module, bb.params, ids, mask, n, eos_token_id=int(eos))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_cached_steps_equal_teacher_forcing(flan):
    _, _, _, bb = flan
    module, params = bb.module, bb.params
    ids, mask, labels = _batch(3)
    dec_in = jnp.asarray(t5.shift_right(np.where(labels < 0, 5, labels), 0, 0))
    ones = np.ones(dec_in.shape, np.int64)
    enc, full = _run(module, params, ids, mask, dec_in, ones, method=_enc_and_logits)

    step = jax.jit(functools.partial(module.apply, method="decode"))
    cache = t5.init_decode_cache(module, ids.shape[0], dec_in.shape[1])
    outs = []
    for i in range(dec_in.shape[1]):  # encoder states only on the first step (then cached)
        tok = dec_in[:, i : i + 1]
        logits, cache = step({"params": params}, tok, enc if i == 0 else None, mask, cache=cache)
        outs.append(logits)
    assert int(cache["index"]) == dec_in.shape[1]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=TOL, rtol=0)


def _torch_label_scores(ref, ids, mask, cands):
    scores = np.zeros((ids.shape[0], len(cands)))
    for j, cand in enumerate(cands):
        labels = _t(np.tile(np.asarray(cand)[None], (ids.shape[0], 1)))
        with torch.no_grad():
            logits = ref(input_ids=_t(ids), attention_mask=_t(mask), labels=labels).logits
        logp = torch.log_softmax(logits.double(), -1)
        scores[:, j] = logp.gather(-1, labels[..., None])[..., 0].sum(-1).numpy()
    return scores


CANDS = [[7, 1], [12, 30, 1], [40, 2, 9, 1]]  # label words of 1-3 tokens, then EOS


def _candidates():
    width = max(map(len, CANDS))
    label_ids = np.array([c + [0] * (width - len(c)) for c in CANDS])
    label_mask = np.array([[1] * len(c) + [0] * (width - len(c)) for c in CANDS])
    return label_ids, label_mask


def test_score_label_words_matches_torch(case):
    kind, _, ref, bb = case
    ids, mask, _ = _batch(4)
    label_ids, label_mask = _candidates()
    got = t5.score_label_words(bb.module, bb.params, ids, mask, label_ids, label_mask)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, _torch_label_scores(ref, ids, mask, CANDS), atol=TOL, rtol=0)
    if kind == "v1":
        # Per-example candidates, (batch, n_labels, T): a permutation per row permutes scores.
        perm = np.array([[2, 0, 1], [1, 2, 0], [0, 1, 2]])
        per_ex = t5.score_label_words(
            bb.module, bb.params, ids, mask, label_ids[perm], label_mask[perm]
        )
        np.testing.assert_allclose(per_ex, np.take_along_axis(np.asarray(got), perm, 1), atol=1e-6)


def test_adapters_by_interception_reach_cached_decoding(flan):
    """A dense delta added by intercepting nn.Dense equals merging it into the kernels."""
    _, _, _, bb = flan
    module, params = bb.module, bb.params
    paths = [k[: -len("/kernel")] for k in tree_lib.select_paths(params, t5.DEFAULT_LORA_TARGETS)]
    flat = tree_lib.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(paths))
    deltas = {p: 0.5 * jax.random.normal(k, flat[p + "/kernel"].shape) for p, k in zip(paths, keys)}
    merged = tree_lib.unflatten(
        {
            k: v + deltas[k[: -len("/kernel")]] if k[: -len("/kernel")] in deltas else v
            for k, v in flat.items()
        }
    )

    def apply_fn(both, *args, **kwargs):
        base, delta = both

        def icpt(next_fun, a, kw, ctx):
            y = next_fun(*a, **kw)
            path = "/".join(ctx.module.path)
            if isinstance(ctx.module, nn.Dense) and path in delta:
                y = y + a[0] @ delta[path]
            return y

        with nn.intercept_methods(icpt):
            return module.apply({"params": base}, *args, **kwargs)

    ids, mask, _ = _batch(5)
    # Same shapes as the other tests: the plain runs reuse their compilations.
    want = t5.greedy_decode(module, merged, ids, mask, 9, eos_token_id=-1)
    got = t5.greedy_decode(
        module, (params, deltas), ids, mask, 9, eos_token_id=-1, apply_fn=apply_fn
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    lab, lmask = _candidates()
    s_want = t5.score_label_words(module, merged, ids, mask, lab, lmask)
    s_got = t5.score_label_words(module, (params, deltas), ids, mask, lab, lmask, apply_fn=apply_fn)
    np.testing.assert_allclose(s_got, s_want, atol=TOL, rtol=0)
    s_base = t5.score_label_words(module, params, ids, mask, lab, lmask)
    assert np.abs(np.asarray(s_base) - np.asarray(s_want)).max() > 0.1  # the deltas matter


def test_dropout_only_when_not_deterministic(flan):
    _, _, _, bb = flan
    ids, mask, _ = _batch(6)
    # The encoder only: its layers are the decoder's, and it compiles faster.
    run = functools.partial(_run, bb.module, bb.params, ids, mask, method="encode")
    a = run(deterministic=False, rngs={"dropout": jax.random.key(0)})
    b = run(deterministic=False, rngs={"dropout": jax.random.key(0)})
    c = run(deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(run())).max() > 1e-3
    with pytest.raises(Exception, match="dropout"):
        run(deterministic=False)


def test_params_from_hf_names_bad_keys(case):
    kind, path, _, _ = case
    config = hf.load_hf_config(path)
    state = hf.load_state_dict(path)
    key = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        t5.params_from_hf({k: v for k, v in state.items() if k != key}, config)
    bad = dict(state)
    bad[key] = state[key][:, :-1]
    with pytest.raises(ValueError, match=r"EncDecAttention\.v\.weight.*shape"):
        t5.params_from_hf(bad, config)
    if kind == "v11":
        # An untied config without lm_head.weight falls back to shared.weight, as transformers does.
        noh = {k: v for k, v in state.items() if k != "lm_head.weight"}
        params = t5.params_from_hf(noh, config)
        np.testing.assert_array_equal(params["lm_head"]["kernel"], state["shared.weight"].T)
    else:
        other = dict(state, **{"lm_head.weight": state["shared.weight"] + 1.0})
        with pytest.raises(ValueError, match="lm_head.weight"):
            t5.params_from_hf(other, config)
