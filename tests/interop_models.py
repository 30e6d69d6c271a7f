"""Tiny random HF models, PEFT adapters with nonzero A and B, and matching JAX forwards.

PEFT initialises B = 0, which would hide a dropped or transposed B; every adapter
made here gets random A and B. Each builder returns (torch model, checkpoint dir).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model

from llora_jax import adapters as ad
from llora_jax.backbones import load_backbone

VOCAB = 40


def bert(path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    model.save_pretrained(path)
    return model, path


def t5(path: Path, gated: bool, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """v1.0 (ReLU, tied head) when not ``gated``, v1.1 / Flan (gated GELU, untied) otherwise."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
        tie_word_embeddings=not gated,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    if gated:  # untied like Flan-T5 (transformers 5 ties unless lm_head has its own parameter)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
        model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    return model, path


def _clip_config() -> transformers.CLIPConfig:
    return transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=16,
            eos_token_id=VOCAB - 1,
            bos_token_id=VOCAB - 2,
            pad_token_id=VOCAB - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )


def clip(path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(seed)
    model = transformers.CLIPModel(_clip_config()).eval()
    model.save_pretrained(path)
    return model, path


def clip_vision(path: Path, full: torch.nn.Module | None = None, seed: int = 0):
    """A CLIPVisionModel (saved without the `vision_model.` prefix); ``full``'s tower if given."""
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(_clip_config().vision_config).eval()
    if full is not None:
        model.load_state_dict(full.vision_model.state_dict())
    model.save_pretrained(path)
    return model, path


def peft_adapter(model: torch.nn.Module, out: Path, seed: int = 1, **lora_kwargs):
    """Wrap ``model`` with PEFT, give every lora_A / lora_B random values, save; -> PeftModel."""
    pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 / p.shape[-1] ** 0.5)
    pm.eval()
    pm.save_pretrained(out)
    return pm


# ----------------------------------------------------------------------------- inputs / forwards


def token_batch(seed: int = 0, batch: int = 2, length: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, VOCAB - 2, (batch, length)).astype(np.int32)


def pixels(seed: int = 0, batch: int = 2) -> np.ndarray:
    """NHWC pixels for JAX; the torch side takes the transpose."""
    return np.random.default_rng(seed).normal(size=(batch, 16, 16, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_outputs(kind: str, model: torch.nn.Module) -> np.ndarray:
    """The output compared in the tests, from a torch model (plain or PEFT-wrapped)."""
    ids = token_batch()
    with torch.no_grad():
        if kind == "bert":
            out = model(input_ids=torch.from_numpy(ids).long()).last_hidden_state
        elif kind == "t5":
            tgt = torch.from_numpy(token_batch(1, length=5)).long()
            out = model(input_ids=torch.from_numpy(ids).long(), decoder_input_ids=tgt).logits
        elif kind == "clip":
            out = model(
                input_ids=torch.from_numpy(token_batch(2, length=6)).long(),
                pixel_values=nchw(pixels()),
            ).logits_per_image
        else:  # clip_vision
            out = model(pixel_values=nchw(pixels())).pooler_output
    return out.float().numpy()


def jax_outputs(kind: str, bb, phi=None, scale=1.0, **apply_kw) -> np.ndarray:
    """The same output from llora-jax's backbone ``bb`` (with adapter ``phi`` when given;
    ``apply_kw`` such as ``mode`` and ``phi0`` go to ``adapters.apply``)."""
    if kind == "bert":
        args, method = (token_batch(),), None
    elif kind == "t5":
        ids = token_batch()
        args, method = (ids, np.ones_like(ids), token_batch(1, length=5)), None
    elif kind == "clip":
        args, method = (pixels(), token_batch(2, length=6)), None
    else:
        args, method = (pixels(),), "encode_image"
    if phi is None:
        out = bb.module.apply({"params": bb.params}, *args, method=method)
    else:
        out = ad.apply(bb.module, bb.params, phi, *args, scale=scale, method=method, **apply_kw)
    if kind == "clip":
        out = out["logits_per_image"]
    return np.asarray(out, np.float32)


def load(path: Path):
    return load_backbone(path)
