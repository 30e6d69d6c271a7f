"""How attention_impl="auto" settles and what the cuDNN branch hands jax, all on CPU.

* ``choose_attention`` / ``attention_for_method`` are pure: their table is checked directly.
* ``forward_mode_ad`` marks the tracing done by our linearization (jax.jvp / linearize).
* The backbones' "auto" on a faked NVIDIA platform: every attention takes the cuDNN branch,
  whose operands (even lengths, masks spanning (B, N, T, S), bias in the input dtype) are
  run through jax's XLA path instead of the kernel and must give the reference result
  within bf16 rounding, in a forward, a gradient and a vmapped merge grid.
* jax's own cuDNN batching rule is traced (not run: no GPU) under vmap: the (B, 1, T, S)
  padding mask of before fails it exactly as on the GPU; the operands made now pass.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llora_jax import adapters
from llora_jax.backbones import attention, bert, t5
from llora_jax.backbones.attention import (
    attention_for_method,
    choose_attention,
    cudnn_operands,
    forward_mode_ad,
    in_forward_mode_ad,
    with_attention_impl,
)
from llora_jax.backbones.clip_layers import VisionConfig, VisionTransformer
from llora_jax.backbones.t5_layers import T5Spec

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "requested, platform, dtype, forward, head_dim, want",
    [
        ("auto", "cuda", BF16, False, 64, "cudnn"),
        ("auto", "cuda", F16, False, None, "cudnn"),
        ("auto", "cuda", F32, False, 64, "xla"),  # cuDNN's kernel takes fp16/bf16 only
        ("auto", "cpu", BF16, False, 64, "xla"),
        ("auto", "rocm", BF16, False, 64, "xla"),
        ("auto", "tpu", BF16, False, 64, "xla"),
        ("auto", "cuda", BF16, True, 64, "xla"),  # no forward-mode rule in the kernel
        ("auto", "cuda", BF16, False, 4, "xla"),  # head width not a multiple of 8
        ("auto", "cuda", BF16, False, 160, "xla"),  # wider than every card takes
        ("xla", "cuda", BF16, False, 64, "xla"),
        ("reference", "cuda", BF16, False, 64, "reference"),
        ("cudnn", "cpu", F32, False, 64, "cudnn"),  # explicit: jax itself then says why not
    ],
)
def test_choose_attention_table(requested, platform, dtype, forward, head_dim, want):
    got = choose_attention(
        requested, platform=platform, dtype=dtype, forward_mode_ad=forward, head_dim=head_dim
    )
    assert got == want


def test_choose_attention_refuses_cudnn_under_jvp_and_unknown_names():
    with pytest.raises(ValueError, match="'cudnn' cannot run under forward-mode AD"):
        choose_attention("cudnn", platform="cuda", dtype=BF16, forward_mode_ad=True)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        choose_attention("flash", platform="cuda", dtype=BF16, forward_mode_ad=False)


def test_attention_for_method():
    assert attention_for_method("auto", "l_lora_model") == "xla"
    assert attention_for_method("reference", "l_lora_model") == "reference"
    for method in ("lora", "l_lora", "full"):
        assert attention_for_method("auto", method) == "auto"
        assert attention_for_method("cudnn", method) == "cudnn"
    with pytest.raises(ValueError, match="cannot run method 'l_lora_model'"):
        attention_for_method("cudnn", "l_lora_model")
    with pytest.raises(ValueError, match="config.attention_impl: attention_impl='Auto'"):
        attention_for_method("Auto", "lora")


def test_forward_mode_flag_nests_is_per_thread_and_set_by_our_linearization():
    assert not in_forward_mode_ad()
    with forward_mode_ad():
        with forward_mode_ad():
            assert in_forward_mode_ad()
        assert in_forward_mode_ad()
        seen = []
        worker = threading.Thread(target=lambda: seen.append(in_forward_mode_ad()))
        worker.start()
        worker.join()
        assert seen == [False]  # the study fine-tunes in its own thread
    assert not in_forward_mode_ad()

    traced = []

    def f(p):
        traced.append(in_forward_mode_ad())
        return jnp.sin(p)

    x = jnp.ones(3)
    adapters.linearized_call(f, x, x)
    adapters.linearize_outputs(f, x, jnp.ones((2, 3)))
    assert traced == [True, True] and not in_forward_mode_ad()
    assert attention.current_platform() == "cpu"


# ----------------------------------------------------------------------------- faked NVIDIA GPU


@pytest.fixture
def fake_cuda(monkeypatch):
    """The platform reads "cuda"; jax's cuDNN call runs its XLA path on the same operands.
    Returns the list of calls: (implementation, q shape, bias (shape, dtype), mask shape)."""
    calls = []
    real = jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, mask=None, *, scale, implementation):
        b = None if bias is None else (bias.shape, bias.dtype)
        calls.append((implementation, q.shape, b, None if mask is None else mask.shape))
        return real(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")

    monkeypatch.setattr(attention, "current_platform", lambda: "cuda")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls


def _max_rel(a, b) -> float:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    f = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return max(
        float(np.max(np.abs(f(x) - f(y))) / (np.max(np.abs(f(y))) + 1e-6)) for x, y in zip(a, b)
    )


BERT = bert.BertSettings(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,  # head width 8: cuDNN takes it
    intermediate_size=48,
    max_position_embeddings=16,
)


@pytest.fixture(scope="module")
def bert_case():
    module = bert.BertModel(BERT, dtype=BF16)
    params = jax.jit(lambda r: bert.init_params(module, r, seq_len=9))(jax.random.key(0))
    ids = RNG.integers(0, 50, (3, 9))  # odd length: the cuDNN branch pads to 10
    mask = np.ones((3, 9), np.int32)
    mask[1, 4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return module, params, ids, mask


def _bert_out(module, impl, params, ids, mask):
    return with_attention_impl(module, impl).apply({"params": params}, ids, mask)


def test_bert_auto_takes_cudnn_on_cuda_bf16_and_equals_reference(fake_cuda, bert_case):
    module, params, ids, mask = bert_case
    got = jax.jit(functools.partial(_bert_out, module, "auto"))(params, ids, mask)
    assert [c[0] for c in fake_cuda] == ["cudnn"] * BERT.num_hidden_layers
    _, q_shape, bias, mask_shape = fake_cuda[0]
    assert q_shape == (3, 10, 4, 8) and bias is None and mask_shape == (3, 4, 10, 10)
    want = _bert_out(module, "reference", params, ids, mask)
    f32 = _bert_out(module.clone(dtype=F32), "reference", params, ids, mask)
    err_got, err_ref = _max_rel(got, f32), _max_rel(want, f32)
    assert err_got < 2 * err_ref + 1e-2, (err_got, err_ref)  # bf16 rounding, as the reference's

    # float32 compute: XLA's path, no cuDNN.
    fake_cuda.clear()
    jax.jit(functools.partial(_bert_out, module.clone(dtype=F32), "auto"))(params, ids, mask)
    assert {c[0] for c in fake_cuda} == {"xla"}


def test_bert_auto_gradient_takes_cudnn_and_jvp_takes_xla(fake_cuda, bert_case):
    module, params, ids, mask = bert_case

    def loss(p, impl):
        h = _bert_out(module, impl, p, ids, mask).astype(F32)
        return jnp.sum(jnp.sin(h) * jnp.asarray(mask)[..., None])

    g_auto = jax.jit(jax.grad(functools.partial(loss, impl="auto")))(params)
    assert {c[0] for c in fake_cuda} == {"cudnn"}
    g_ref = jax.jit(jax.grad(functools.partial(loss, impl="reference")))(params)
    # One norm over every leaf: some leaves (the key bias) have a zero true gradient.
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
    err = np.linalg.norm(flat(g_auto) - flat(g_ref)) / np.linalg.norm(flat(g_ref))
    assert err < 0.02, err

    # l_lora_model's linearization traces the same "auto" model under forward-mode AD.
    fake_cuda.clear()
    tangent = jax.tree.map(lambda x: (0.01 * jnp.cos(jnp.arange(x.size))).reshape(x.shape), params)

    def lin(impl):
        f = lambda p: _bert_out(module, impl, p, ids, mask)  # noqa: E731
        return jax.jit(lambda: adapters.linearized_call(f, params, tangent))()

    got = lin("auto")
    assert {c[0] for c in fake_cuda} == {"xla"}
    assert _max_rel(got, lin("reference")) < 0.02


def test_vmapped_merge_grid_takes_cudnn_with_shared_masks(fake_cuda, bert_case):
    """The merge grids vmap over models with the batch shared (in_axes None)."""
    module, params, ids, mask = bert_case
    stacked = jax.tree.map(lambda x: jnp.stack([x, 0.9 * x, 1.1 * x]), params)
    grid = jax.jit(jax.vmap(functools.partial(_bert_out, module, "auto"), in_axes=(0, None, None)))
    got = grid(stacked, ids, mask)
    assert {c[0] for c in fake_cuda} == {"cudnn"} and fake_cuda[0][3] == (3, 4, 10, 10)
    for i in range(3):
        p = jax.tree.map(lambda x: x[i], stacked)  # noqa: B023
        want = _bert_out(module, "reference", p, ids, mask)
        assert _max_rel(got[i], want) < 0.03


def test_t5_auto_takes_cudnn_with_bias_in_input_dtype(fake_cuda):
    spec = T5Spec(
        vocab_size=40,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dense_act_fn="gelu_new",
        is_gated_act=True,
        tie_word_embeddings=False,
    )
    module = t5.T5(spec, dtype=BF16)
    params = jax.jit(lambda r: t5.init_params(module, r, input_length=11, target_length=6))(
        jax.random.key(1)
    )
    ids, dec = RNG.integers(2, 40, (2, 11)), RNG.integers(2, 40, (2, 6))
    mask, dec_mask = np.ones((2, 11), np.int32), np.ones((2, 6), np.int32)
    mask[1, 7:], dec_mask[1, 4:] = 0, 0
    fake_cuda.clear()  # init traced the attention too

    def run(m, impl):
        return with_attention_impl(m, impl).apply({"params": params}, ids, mask, dec, dec_mask)

    got = jax.jit(functools.partial(run, module, "auto"))()
    impls, biases = [c[0] for c in fake_cuda], [c[2] for c in fake_cuda]
    assert impls == ["cudnn"] * 3  # encoder self, decoder self, cross
    assert biases[0] == ((2, 4, 12, 12), BF16)  # relative bias, odd 11 padded to 12
    want, f32 = run(module, "reference"), run(module.clone(dtype=F32), "reference")
    err_got, err_ref = _max_rel(got, f32), _max_rel(want, f32)
    assert err_got < 2 * err_ref + 1e-2, (err_got, err_ref)


def test_vit_without_mask_keeps_its_odd_length(fake_cuda):
    """No mask and no bias: nothing to pad (jax wants even lengths only with a bias), so
    ViT-B/16's 197 tokens (here 17) go to the kernel as they are, with no made-up mask."""
    cfg = VisionConfig(
        hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, image_size=16, patch_size=4
    )
    vit = VisionTransformer(cfg, dtype=BF16)
    pixels = RNG.normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = jax.jit(lambda r: vit.init(r, pixels)["params"])(jax.random.key(2))
    fake_cuda.clear()
    got = jax.jit(lambda p: with_attention_impl(vit, "auto").apply({"params": p}, pixels))(params)
    assert fake_cuda == [("cudnn", (2, 17, 4, 8), None, None)]
    want = with_attention_impl(vit, "reference").apply({"params": params}, pixels)
    assert _max_rel(got, want) < 0.03


def test_cudnn_operands_drop_nothing_but_the_padded_query():
    b, t, s, n, h = 2, 5, 7, 3, 8
    q, k, v = (RNG.normal(size=(b, x, n, h)).astype(BF16) for x in (t, s, s))
    bias = RNG.normal(size=(1, n, t, s)).astype(np.float32)
    bias[..., 0] = np.finfo(np.float32).min  # HF's additive padding value: clamped
    keep = np.arange(s)[None, None, None, :] < np.array([7, 4])[:, None, None, None]
    q2, k2, v2, bias2, mask2 = cudnn_operands(q, k, v, bias, keep)
    assert q2.shape == (b, 6, n, h) and k2.shape == v2.shape == (b, 8, n, h)
    assert bias2.shape == mask2.shape == (b, n, 6, 8) and bias2.dtype == BF16
    assert float(jnp.min(bias2.astype(F32))) >= -(2.0**41)
    assert not np.asarray(mask2[..., 7]).any() and np.asarray(mask2[0, :, :5, :7]).all()
    assert cudnn_operands(q, k, v, None, None) == (q, k, v, None, None)


# ----------------------------------------------------------------------------- jax's batching rule


@pytest.fixture
def cudnn_traceable(monkeypatch):
    """jax's cuDNN path traceable on CPU: only its cuDNN version probe needs a GPU."""
    impl = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(impl, "check_cudnn_version"):
        pytest.skip("this jax has no cuDNN version probe to stand in for")
    monkeypatch.setattr(impl, "check_cudnn_version", lambda: 91000)


def _trace_vmapped(f, q, *rest, in_axes):
    """Trace (not run) vmap(f) and vmap(grad f) as a merge grid / group training would."""
    loss = lambda *a: jnp.sum(jnp.square(f(*a).astype(F32)))  # noqa: E731
    jax.make_jaxpr(jax.vmap(f, in_axes=in_axes))(q, *rest)
    jax.make_jaxpr(jax.vmap(jax.grad(loss), in_axes=in_axes))(q, *rest)


def test_head_broadcast_mask_fails_jax_cudnn_batching_and_ours_passes(cudnn_traceable):
    models, b, t, n, h = 3, 2, 6, 4, 8
    q = jnp.asarray(RNG.normal(size=(models, b, t, n, h)), BF16)
    keep = jnp.asarray(np.arange(t)[None, None, None, :] < np.array([6, 3])[:, None, None, None])
    per_model = jnp.broadcast_to(keep, (models, *keep.shape))
    rel = jnp.asarray(RNG.normal(size=(1, n, t, t)), F32)

    def before(q, mask):  # what reached jax before: a (B, 1, T, S) mask
        m = jnp.broadcast_to(mask, (b, 1, t, t))
        return jax.nn.dot_product_attention(q, q, q, mask=m, implementation="cudnn")

    def ours(q, mask, bias=None):
        q2, k2, v2, bias2, mask2 = cudnn_operands(q, q, q, bias, mask)
        return jax.nn.dot_product_attention(
            q2, k2, v2, bias=bias2, mask=mask2, implementation="cudnn"
        )

    # The failure of the vmapped merge grids on the GPU, (32, 32, 1, 64, 64) -> (1024, 12, ...).
    with pytest.raises(TypeError, match=r"cannot reshape array of shape \(3, 2, 1, 6, 6\)"):
        _trace_vmapped(before, q, per_model, in_axes=(0, 0))
    _trace_vmapped(ours, q, per_model, in_axes=(0, 0))
    _trace_vmapped(ours, q, keep, in_axes=(0, None))
    _trace_vmapped(ours, q, per_model, rel, in_axes=(0, 0, None))  # T5: shared relative bias
