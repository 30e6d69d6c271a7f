"""CLIP backbone: parity with transformers (torch) on tiny random checkpoints, zero-shot heads,
preprocessing against CLIPImageProcessor, bf16 compute and conversion errors."""

import dataclasses
import functools
import json
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
from llora_jax.backbones import clip, hf  # noqa: E402

IMAGE = 32
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["p h", "ph o", "c a", "ca t</w>", "d o", "do g</w>"]


def _vocab() -> dict:
    # Like the real CLIP vocabulary: <|startoftext|> and <|endoftext|> have the largest ids.
    toks = list(LETTERS) + [c + "</w>" for c in LETTERS] + [".", ".</w>"]
    toks += ["ph", "pho", "ca", "cat</w>", "do", "dog</w>", "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(toks)}


VOCAB = _vocab()
EOS = VOCAB["<|endoftext|>"]


def _config(patch: int, eos: int) -> "transformers.CLIPConfig":
    vision = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=patch,
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(VOCAB),
        max_position_embeddings=16,
        eos_token_id=eos,
        bos_token_id=VOCAB["<|startoftext|>"],
        pad_token_id=EOS,
    )
    return transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=24, logit_scale_init_value=2.3
    )


def _torch_model(patch: int, eos: int, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(_config(patch, eos)).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


_SAVED: dict = {}


def _saved(patch, tmp_path_factory):
    """A tiny random CLIPModel (new-style eos id) saved to disk and loaded back in JAX."""
    if patch not in _SAVED:
        path = tmp_path_factory.mktemp(f"clip_p{patch}")
        model = _torch_model(patch, EOS)
        model.save_pretrained(path)
        _SAVED[patch] = model, path, hf.load_backbone(str(path))
    return _SAVED[patch]


@pytest.fixture(scope="module", params=[8, 16], ids=["patch8", "patch16"])
def full(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def full16(tmp_path_factory):
    return _saved(16, tmp_path_factory)


_JITTED: dict = {}


def _apply(bb, method, *args):
    """Jitted ``module.apply``, cached per backbone (eager Flax dispatch is slow on CPU)."""
    key = (id(bb), method)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, *a: bb.module.apply({"params": p}, *a, method=method))
    return _JITTED[key](bb.params, *args)


def _everything(m, pixels, ids, mask):
    """All outputs in one traced function: one compile per backbone."""
    return {"img": m.encode_image(pixels), "txt": m.encode_text(ids, mask), **m(pixels, ids, mask)}


def _pixels(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _text_batch(eos: int, seed=0):
    """Right-padded ids: random tokens, then eos, then eos as padding (the CLIP tokenizer's pad)."""
    rng = np.random.default_rng(seed)
    lengths = [3, 7, 12]
    ids = np.full((len(lengths), 12), eos, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = rng.integers(0, EOS - 1, n - 1)
        mask[i, :n] = 1
    return ids, mask


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_param_paths_and_lora_targets(full16):
    _, _, bb = full16
    names = tree_lib.flatten(bb.params)
    assert bb.kind == "clip"
    for key in [
        "vision_model/encoder/layers_0/self_attn/q_proj/kernel",
        "vision_model/embeddings/patch_embedding/kernel",
        "vision_model/pre_layrnorm/scale",
        "text_model/encoder/layers_1/mlp/fc2/bias",
        "visual_projection/kernel",
        "text_projection/kernel",
        "logit_scale",
    ]:
        assert key in names
    assert "bias" not in bb.params["visual_projection"]
    chosen = tree_lib.select_paths(bb.params, clip.DEFAULT_LORA_TARGETS)
    assert sorted(chosen) == sorted(
        f"vision_model/encoder/layers_{i}/self_attn/{p}_proj/kernel" for i in (0, 1) for p in "qv"
    )
    # The converted tree is exactly the module's own initialised tree (paths and shapes).
    init = jax.eval_shape(lambda: clip.init_params(bb.module, jax.random.key(1)))
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, bb.params)
    boxed = jax.eval_shape(lambda: bb.module.init(jax.random.key(1), method=clip.CLIP.init_all))
    q = boxed["params"]["vision_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]
    assert q["kernel"].names == ("embed", "qkv")
    # Every parameter is boxed with names from the shared vocabulary.
    vocab = {"vocab", "embed", "mlp", "qkv", "heads", "relpos", "pos", "patch", None}
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == len(names)
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned) and set(leaf.names) <= vocab
        assert len(leaf.names) == len(leaf.value.shape)


def test_dropout_and_dense_interception(full16):
    _, _, bb = full16
    cfg = dataclasses.replace(bb.module.vision, attention_dropout=0.5)
    module = clip.CLIP(vision=cfg, text=None)
    params = {"vision_model": bb.params["vision_model"]}  # no init: random init compiles slowly
    pixels = _pixels(2)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    @functools.partial(jax.jit, static_argnums=2)
    def run(p, rng, deterministic):
        with nn.intercept_methods(record):
            return module.apply(
                {"params": p},
                pixels,
                deterministic=deterministic,
                rngs={"dropout": rng},
                method="encode_image",
            )

    ref = run(params, jax.random.key(1), True)
    assert "vision_model/encoder/layers_1/self_attn/v_proj" in seen
    assert not any("patch_embedding" in s for s in seen)  # the conv is not a Dense
    np.testing.assert_array_equal(ref, run(params, jax.random.key(2), True))
    a, b = run(params, jax.random.key(1), False), run(params, jax.random.key(2), False)
    assert _max_diff(a, b) > 1e-3 and _max_diff(a, ref) > 1e-3


def test_parity_with_transformers(full):
    model, _, bb = full
    pixels = _pixels()
    ids, mask = _text_batch(EOS)
    with torch.no_grad():
        out = model(
            pixel_values=_nchw(pixels),
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
        )
        img_ref = model.get_image_features(pixel_values=_nchw(pixels)).pooler_output
        txt_ref = model.get_text_features(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).pooler_output
    res = _apply(bb, _everything, pixels, ids, mask)
    assert res["img"].shape == (3, 24) and res["txt"].shape == (3, 24)
    assert _max_diff(res["img"], img_ref) <= 1e-4
    assert _max_diff(res["txt"], txt_ref) <= 1e-4
    assert _max_diff(res["logits_per_image"], out.logits_per_image) <= 1e-4
    assert _max_diff(res["logits_per_text"], out.logits_per_text) <= 1e-4
    assert _max_diff(res["image_embeds"], out.image_embeds) <= 1e-4
    assert _max_diff(res["text_embeds"], out.text_embeds) <= 1e-4


def test_legacy_eos_pooling_takes_argmax(tmp_path):
    """eos_token_id == 2 (pre-2023 configs): HF pools at argmax(input_ids); so must we."""
    model = _torch_model(16, eos=2, seed=3)
    model.save_pretrained(tmp_path)
    bb = hf.load_backbone(str(tmp_path))
    assert bb.module.text.eos_token_id == 2
    ids = np.random.default_rng(5).integers(0, len(VOCAB), (4, 9))
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
    got = _apply(bb, "encode_text", ids)
    assert _max_diff(got, ref) <= 1e-4


def test_vision_only_checkpoints(full16, tmp_path):
    model, _, bb = full16
    vcfg = model.config.vision_config
    vcfg.projection_dim = model.config.projection_dim
    pixels = _pixels(2, seed=1)
    # With projection: same keys as CLIPModel minus the text tower.
    with_proj = transformers.CLIPVisionModelWithProjection(vcfg).eval()
    with_proj.vision_model.load_state_dict(model.vision_model.state_dict())
    with_proj.visual_projection.load_state_dict(model.visual_projection.state_dict())
    with_proj.save_pretrained(tmp_path / "proj")
    # Without projection: transformers 5 saves keys without the "vision_model." prefix.
    bare = transformers.CLIPVisionModel(vcfg).eval()
    bare.load_state_dict(model.vision_model.state_dict())
    bare.save_pretrained(tmp_path / "bare")
    keys = hf.load_state_dict(tmp_path / "bare")
    assert "embeddings.patch_embedding.weight" in keys
    with torch.no_grad():
        ref_proj = with_proj(pixel_values=_nchw(pixels)).image_embeds
        ref_bare = bare(pixel_values=_nchw(pixels)).pooler_output
    for sub, ref in [("proj", ref_proj), ("bare", ref_bare)]:
        vb = hf.load_backbone(str(tmp_path / sub))
        assert vb.module.text is None and "text_model" not in vb.params
        got = _apply(vb, "encode_image", pixels)
        assert _max_diff(got, ref) <= 1e-4
        # Same paths and values as the vision part of the full model: adapters transfer.
        flat, full_flat = tree_lib.flatten(vb.params), tree_lib.flatten(bb.params)
        assert all(k.startswith(("vision_model/", "visual_projection/")) for k in flat)
        for k, v in flat.items():
            np.testing.assert_array_equal(v, full_flat[k])
        assert len(tree_lib.select_paths(vb.params, clip.DEFAULT_LORA_TARGETS)) == 4
    with pytest.raises(ValueError, match="no text tower"):
        vb.module.apply({"params": vb.params}, np.zeros((1, 4), np.int32), method="encode_text")


def _tokenizer(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(VOCAB))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(tok_dir))


def test_zeroshot_head_matches_torch(full16, tmp_path):
    model, _, bb = full16
    tok = _tokenizer(tmp_path)
    enc = tok(["a photo of a cat."])["input_ids"][0]
    assert VOCAB["cat</w>"] in enc and enc[-1] == EOS  # the vocab is really used (no unk)
    classes = ["cat", "dog", "hot dog"]
    templates = [clip.PAPER_TEMPLATE, "a {c}.", lambda c: f"the {c} photo"]
    head = clip.build_zeroshot_head(bb.module, bb.params, tok, classes, templates, batch_size=4)
    refs = []
    for c in classes:
        texts = [t(c) if callable(t) else t.format(c=c) for t in templates]
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            e = model.get_text_features(**batch).pooler_output
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        refs.append((e / e.norm()).numpy())
    assert head.shape == (3, 24)
    assert _max_diff(head, np.stack(refs)) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(head, axis=-1), 1.0, atol=1e-6)

    # Single paper template: zero-shot logits equal HF's logits_per_image on the class prompts.
    single = clip.build_zeroshot_head(bb.module, bb.params, tok, classes)
    pixels = _pixels()
    prompts = tok([clip.PAPER_TEMPLATE.format(c=c) for c in classes], padding=True)
    with torch.no_grad():
        out = model(
            pixel_values=_nchw(pixels),
            input_ids=torch.tensor(prompts["input_ids"]),
            attention_mask=torch.tensor(prompts["attention_mask"]),
        )
    img = _apply(bb, _everything, pixels, *_text_batch(EOS))["img"]  # compiled in the parity test
    logits = clip.zeroshot_logits(img, single, bb.params["logit_scale"])
    assert _max_diff(logits, out.logits_per_image) <= 1e-4
    with pytest.raises(ValueError, match="placeholder"):
        clip.build_zeroshot_head(bb.module, bb.params, tok, classes, ["no slot"])


def test_bfloat16_compute_close_to_float32(full16):
    _, path, bb = full16
    b16 = hf.load_backbone(str(path), dtype=jnp.bfloat16)
    pixels = _pixels()
    ids, mask = _text_batch(EOS)
    ref = _apply(bb, _everything, pixels, ids, mask)
    got = _apply(b16, _everything, pixels, ids, mask)
    for key in ("img", "txt"):
        assert got[key].dtype == jnp.bfloat16
        r, g = np.asarray(ref[key], np.float32), np.asarray(got[key], np.float32)
        # bf16 keeps 8 mantissa bits; errors compound over the layers of a random tiny model.
        assert _max_diff(g, r) <= 0.05 * np.abs(r).max()
        cos = np.sum(g * r, -1) / np.linalg.norm(g, axis=-1) / np.linalg.norm(r, axis=-1)
        assert cos.min() >= 0.995
    # logits = exp(2.3) * cos ~ 10 * cos: 0.1 is 1% of the logit scale.
    assert _max_diff(got["logits_per_image"], ref["logits_per_image"]) <= 0.1
    b16p = hf.load_backbone(str(path), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(b16p.params))


def test_params_from_hf_errors_name_the_key(full16):
    model, path, _ = full16
    state = hf.load_state_dict(path)
    missing = dict(state)
    del missing["vision_model.encoder.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match=r"vision_model\.encoder\.layers\.1\.self_attn\.v_proj"):
        clip.params_from_hf(missing, model.config)
    bad = dict(state)
    bad["text_model.embeddings.token_embedding.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(ValueError, match=r"token_embedding\.weight.*\(5, 32\)"):
        clip.params_from_hf(bad, model.config)
    extra = dict(state, **{"classifier.weight": np.zeros((2, 48), np.float32)})
    with pytest.raises(ValueError, match="classifier.weight"):
        clip.params_from_hf(extra, model.config)
    # Conversion layout: torch Linear (out, in) -> Dense (in, out); Conv2d -> (kh, kw, in, out).
    p = clip.params_from_hf(state, model.config)
    q = state["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        p["vision_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"], q.T
    )
    conv = state["vision_model.embeddings.patch_embedding.weight"]
    kernel = p["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    np.testing.assert_array_equal(kernel, conv.transpose(2, 3, 1, 0))


# ----------------------------------------------------------------------------- preprocessing


def _odd_images():
    rng = np.random.default_rng(0)
    shapes = [(37, 53, 3), (61, 29, 3), (32, 32, 3), (28, 28, 1), (45, 40, 4), (33, 90, 3)]
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]


def test_preprocess_clip_mode_equals_hf_processor():
    # The PIL backend explicitly: with torchvision installed, CLIPImageProcessor resizes in torch.
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as CLIPImageProcessor,
    )

    images = _odd_images()
    for size in (32, 224):
        proc = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        ref = proc(images=images, return_tensors="np", input_data_format="channels_last")
        ref = ref["pixel_values"].transpose(0, 2, 3, 1)
        got = clip.preprocess_images(images, size, mode="clip")
        assert got.shape == (len(images), size, size, 3) and got.dtype == np.float32
        assert _max_diff(got, ref) <= 1e-6  # measured: 0.0 (same ops, same dtypes)
    # A uniform uint8 batch array works the same as a list.
    batch = np.stack([images[2], images[2]])
    np.testing.assert_array_equal(
        clip.preprocess_images(batch, 32), clip.preprocess_images([images[2]] * 2, 32)
    )


def test_preprocess_resize_mode():
    from transformers.image_utils import PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil as CLIPImageProcessor,
    )

    images = _odd_images()
    proc = CLIPImageProcessor(
        size={"height": 32, "width": 32},
        do_center_crop=False,
        do_normalize=False,
        resample=PILImageResampling.BILINEAR,
    )
    ref = proc(images=images, return_tensors="np", input_data_format="channels_last")
    got = clip.preprocess_images(images, 32, mode="resize")
    assert _max_diff(got, ref["pixel_values"].transpose(0, 2, 3, 1)) <= 1e-6
    assert got.min() >= 0.0 and got.max() <= 1.0
    with pytest.raises(ValueError, match="mode"):
        clip.preprocess_images(images, 32, mode="center")
    with pytest.raises(TypeError, match="uint8"):
        clip.preprocess_images([images[0].astype(np.float32)], 32)
