"""The benchmarked models: CLIP ViT-B/16 and Flan-T5-base with random weights, plus tiny twins.

Configurations are built by hand as Hugging Face config objects (no download) and turned
into our Linen modules with ``<backbone>.module_from_hf_config``. The same config objects
build the PyTorch baseline (``torch_baseline.py``), so both sides run the same shapes.

CLIP: only the vision tower (+ visual projection) is instantiated. In the paper's set-up
the text tower only builds the frozen zero-shot head; here that head is random, so the
text tower would only be dead weight in device memory.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llora_jax import adapters, forward
from llora_jax.backbones import clip, t5
from llora_jax.backbones.attention import with_attention_impl
from llora_jax.tasks import clip_zeroshot, t5_text
from llora_jax.types import AdapterSpec, TaskModel

MODELS = ("clip", "t5", "t5l")  # t5l: Flan-T5-large (the FSDP benchmark)
PRECISIONS = ("bf16", "fp32")
N_CLASSES = 10  # zero-shot head classes (CLIP)
LABEL_WORDS = ("negative", "positive")  # T5 rank-classification candidates


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sequence sizes of one model's inputs."""

    image_size: int = 224  # CLIP
    input_len: int = 128  # T5 encoder tokens
    target_len: int = 8  # T5 decoder tokens


REAL_SHAPES = Shapes()
TINY_SHAPES = Shapes(image_size=32, input_len=16, target_len=4)


def hf_config(model: str, tiny: bool = False) -> Any:
    """The HF config of ``model`` ("clip": ViT-B/16 vision tower, "t5": Flan-T5-base,
    "t5l": Flan-T5-large)."""
    from transformers import CLIPConfig, T5Config

    if model == "clip":
        if tiny:
            vision_cfg = dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                patch_size=8,
                image_size=32,
                intermediate_size=64,
            )
            text_cfg = dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=64,
                max_position_embeddings=16,
            )
            full = CLIPConfig(vision_config=vision_cfg, text_config=text_cfg, projection_dim=16)
        else:
            vision_cfg = dict(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                patch_size=16,
                image_size=224,
                intermediate_size=3072,
            )
            full = CLIPConfig(vision_config=vision_cfg, projection_dim=512)
        vc = full.vision_config
        vc.projection_dim = full.projection_dim
        vc.architectures = ["CLIPVisionModelWithProjection"]
        return vc
    if model in ("t5", "t5l"):
        if tiny:
            dims = dict(
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=4,
                vocab_size=128,
            )
        elif model == "t5l":
            dims = dict(
                d_model=1024,
                d_kv=64,
                d_ff=2816,
                num_layers=24,
                num_decoder_layers=24,
                num_heads=16,
                vocab_size=32128,
            )
        else:
            dims = dict(
                d_model=768,
                d_kv=64,
                d_ff=2048,
                num_layers=12,
                num_decoder_layers=12,
                num_heads=12,
                vocab_size=32128,
            )
        return T5Config(
            **dims,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    raise ValueError(f"unknown benchmark model {model!r}; valid: {', '.join(MODELS)}")


def backbone_module(model: str) -> Any:
    return {"clip": clip, "t5": t5, "t5l": t5}[model]


def dtypes(precision: str, method: str) -> tuple[Any, Any]:
    """(compute dtype, parameter storage dtype).

    bf16: frozen weights stored in bf16; full fine-tuning keeps fp32 master weights and
    computes in bf16 (the usual mixed precision; PyTorch autocast does the same).
    """
    if precision == "fp32":
        return jnp.float32, jnp.float32
    if precision == "bf16":
        return jnp.bfloat16, (jnp.float32 if method == "full" else jnp.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def param_shapes(model: str, config: Any) -> Any:
    """The parameter tree of ``<backbone>.init_params`` as ShapeDtypeStructs (nothing computed)."""
    bb = backbone_module(model)
    module = bb.module_from_hf_config(config)
    return jax.eval_shape(lambda: bb.init_params(module, jax.random.key(0)))


def logical_specs(model: str, module: Any, shapes: Shapes) -> Any:
    """Logical PartitionSpecs of the parameters (from an abstract boxed init; nothing computed)."""
    from llora_jax.train import sharding

    key = jax.random.key(0)
    if model == "clip":
        boxed = jax.eval_shape(lambda: module.init(key, method=clip.CLIP.init_all))
    else:
        ids = jnp.zeros((1, shapes.input_len), jnp.int32)
        tgt = jnp.zeros((1, shapes.target_len), jnp.int32)
        boxed = jax.eval_shape(lambda: module.init(key, ids, jnp.ones_like(ids), tgt))
    return sharding.logical_specs(boxed["params"])


def init_params(model: str, config: Any, seed: int = 0) -> Any:
    """Random fp32 parameters with the exact tree of ``<backbone>.init_params``, on the device.

    The values are drawn on the host with numpy (kernels N(0, 1/fan_in), embeddings
    N(0, 0.02²), norm scales 1, biases 0) instead of running the Flax initialiser: on the GPU
    machine the jitted Flax init of ViT-B/16 / T5-base took 60-100 s to compile, most of a
    benchmark's time budget, and the benchmarks need shapes and sane scales, not HF's exact
    init distribution.
    """
    from llora_jax import tree as tree_lib

    rng = np.random.default_rng(seed)
    flat = {}
    for path, sd in tree_lib.flatten(param_shapes(model, config)).items():
        leaf = path.rsplit("/", 1)[-1]
        shape = tuple(sd.shape)
        if leaf in ("scale", "weight") or path.endswith("logit_scale"):
            value = np.ones(shape, np.float32)
            if path.endswith("logit_scale"):
                value = np.full(shape, np.log(100.0), np.float32)
        elif leaf == "bias":
            value = np.zeros(shape, np.float32)
        elif leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape, np.float32) * np.float32(fan_in**-0.5)
        else:  # embeddings, class embedding, relative attention buckets
            value = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        flat[path] = value
    return jax.device_put(tree_lib.unflatten(flat))


def cast(tree: Any, dtype: Any) -> Any:
    """Floating leaves cast to ``dtype`` (abstract ``ShapeDtypeStruct`` leaves too)."""

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return x.astype(dtype)

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- task models


def clip_task_model(module: Any, params: Any, image_size: int, seed: int = 1) -> TaskModel:
    """CLIP image classification with a random frozen zero-shot head (the library's readout)."""
    dim = module.projection_dim
    classes = jax.random.normal(jax.random.key(seed), (N_CLASSES, dim), jnp.float32)
    classes = classes / jnp.linalg.norm(classes, axis=-1, keepdims=True)
    head = {"classes": classes, "logit_scale": jnp.asarray(np.log(100.0), jnp.float32)}

    return TaskModel(
        module=module,
        params=params,
        readout=clip_zeroshot.ZeroShotReadout(image_size, True),
        loss=forward.classification_loss,
        predict=forward.argmax_predict,
        head=head,
        base_model="bench/clip-vit-b16-random",
        full_ft_targets=(r"^vision_model/",),
    )


class WordTokenizer:
    """Stands in for a T5 tokenizer: fixed token ids per label word, then EOS, then padding."""

    def __init__(self, vocab_size: int, eos: int = 1):
        self.vocab, self.eos = vocab_size, eos

    def __call__(self, words, max_length, **_):
        rows, masks = [], []
        for i, w in enumerate(words):
            ids = [2 + (sum(map(ord, w)) * 7 + 13 * i + j) % (self.vocab - 2) for j in range(2)]
            ids = (ids + [self.eos])[:max_length]
            pad = max_length - len(ids)
            rows.append(ids + [0] * pad)
            masks.append([1] * len(ids) + [0] * pad)
        return {"input_ids": np.asarray(rows), "attention_mask": np.asarray(masks)}


def t5_task_model(module: Any, params: Any, target_len: int) -> TaskModel:
    """Flan-T5 text-to-text classification: the library's tasks/t5_text readout (teacher-forced CE to train,
    rank classification of two label words to predict), with a stand-in tokenizer."""
    backbone = types.SimpleNamespace(module=module, params=params, source="bench/flan-t5-base")
    spec = types.SimpleNamespace(is_regression=False, label_names=LABEL_WORDS)
    tok = WordTokenizer(module.spec.vocab_size, module.spec.eos_token_id)
    return t5_text.task_model(backbone, tok, spec, target_len=target_len)


def task_model(model: str, module: Any, params: Any, shapes: Shapes) -> TaskModel:
    if model == "clip":
        return clip_task_model(module, params, shapes.image_size)
    return t5_task_model(module, params, shapes.target_len)


def lora_spec(
    model: str, method: str, dropout: float = 0.1, rank: int = 16, alpha: float = 32.0
) -> AdapterSpec:
    """r 16, α 32 on q and v (the backbone's DEFAULT_LORA_TARGETS), as in the paper."""
    targets = backbone_module(model).DEFAULT_LORA_TARGETS
    return AdapterSpec(
        method, adapters.LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    )


# ----------------------------------------------------------------------------- data


def synthetic_arrays(
    model: str, n: int, shapes: Shapes, config: Any, seed: int = 0
) -> dict[str, np.ndarray]:
    """``n`` random examples with the fields the readout needs (never all zeros)."""
    rng = np.random.default_rng(seed)
    if model == "clip":
        s = shapes.image_size
        return {
            "image": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
            "label": rng.integers(0, N_CLASSES, n).astype(np.int32),
        }
    vocab = config.vocab_size
    ids = rng.integers(2, vocab, (n, shapes.input_len)).astype(np.int32)
    # Ragged inputs: each row keeps at least half its tokens, the rest is padding.
    lengths = rng.integers(shapes.input_len // 2, shapes.input_len + 1, n)
    mask = (np.arange(shapes.input_len)[None] < lengths[:, None]).astype(np.int32)
    label = rng.integers(0, len(LABEL_WORDS), n).astype(np.int32)
    words = WordTokenizer(vocab)(list(LABEL_WORDS), shapes.target_len)
    labels = words["input_ids"][label].astype(np.int32)
    dmask = words["attention_mask"][label].astype(np.int32)
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "labels": labels,
        "decoder_attention_mask": dmask,
        "label": label,
    }


def with_weight(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(next(iter(arrays.values())))
    return {**arrays, "weight": np.ones(n, np.float32)}


@dataclasses.dataclass
class Built:
    """One model at one precision: module, parameters and task model."""

    model: str
    precision: str
    config: Any
    shapes: Shapes
    module: Any
    params: Any
    tm: TaskModel


def build(
    model: str,
    precision: str,
    method: str,
    *,
    tiny: bool,
    params_f32: Any = None,
    config: Any = None,
    attention: str = "auto",
) -> Built:
    """Module + params (+ task model) for one (model, precision, method); ``attention`` is
    the backbone's ``attention_impl``."""
    config = config if config is not None else hf_config(model, tiny)
    shapes = TINY_SHAPES if tiny else REAL_SHAPES
    dt, pdt = dtypes(precision, method)
    module = backbone_module(model).module_from_hf_config(config, dtype=dt, param_dtype=pdt)
    if attention != "auto":
        module = with_attention_impl(module, attention)
    p32 = params_f32 if params_f32 is not None else init_params(model, config)
    params = p32 if pdt == jnp.float32 else cast(p32, pdt)
    return Built(
        model, precision, config, shapes, module, params, task_model(model, module, params, shapes)
    )


def random_task_vectors(phi0: Any, n: int, seed: int = 0, scale: float = 1.0) -> list[Any]:
    """``n`` random adapter task vectors of realistic size (B moves away from zero)."""
    out = []
    for i in range(n):
        key = jax.random.key(seed * 1000 + i)
        leaves, treedef = jax.tree.flatten(phi0)
        keys = jax.random.split(key, len(leaves))
        tau = [
            scale * 0.02 * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            for k, x in zip(keys, leaves)
        ]
        out.append(jax.tree.unflatten(treedef, tau))
    return out
