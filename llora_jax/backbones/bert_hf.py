"""Hugging Face ``BertModel`` checkpoints -> ``bert.BertModel`` modules and parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from llora_jax.backbones.activations import ACTIVATIONS
from llora_jax.backbones.bert import BertModel, BertSettings, init_params

__all__ = ["init_params", "module_from_hf_config", "params_from_hf", "settings_from_hf_config"]

Dtype = Any


def settings_from_hf_config(config: Any) -> BertSettings:
    """Architecture fields of a ``transformers.BertConfig``; refuses what is not implemented."""
    pos = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
        raise NotImplementedError(
            f"BERT position_embedding_type={pos!r} is not supported (only 'absolute')"
        )
    if config.hidden_act not in ACTIVATIONS:
        raise NotImplementedError(
            f"BERT hidden_act={config.hidden_act!r} is not supported; use one of "
            f"{sorted(ACTIVATIONS)}"
        )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )
    names = [f.name for f in dataclasses.fields(BertSettings) if f.name != "attention_impl"]
    return BertSettings(**{n: getattr(config, n) for n in names})


def module_from_hf_config(
    config: Any,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    add_pooling_layer: bool = False,
) -> BertModel:
    """A ``BertModel`` with the architecture of an HF config (pooler off unless asked for)."""
    return BertModel(
        settings_from_hf_config(config),
        dtype=dtype,
        param_dtype=param_dtype,
        add_pooling_layer=add_pooling_layer,
    )


def _find_prefix(state: dict[str, np.ndarray]) -> str:
    for prefix in ("", "bert.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    raise ValueError(
        "not a BERT checkpoint: key 'embeddings.word_embeddings.weight' (also tried prefixes "
        f"'bert.' and 'model.') is missing; first keys: {sorted(state)[:8]}"
    )


def params_from_hf(
    state: dict[str, np.ndarray], config: Any, *, add_pooling_layer: bool = False
) -> dict:
    """HF BertModel tensors -> Flax params (Linear (out, in) -> kernel (in, out)).

    Accepts keys with or without a ``bert.`` prefix and old ``LayerNorm.gamma/beta`` names;
    ignores heads (``cls.*``), buffers (``position_ids``) and the pooler unless
    ``add_pooling_layer``. Arrays keep their stored dtype (``hf.load_backbone`` casts).
    """
    c = settings_from_hf_config(config)
    prefix = _find_prefix(state)
    H, inter = c.hidden_size, c.intermediate_size

    def get(name: str, shape: tuple) -> np.ndarray:
        key = prefix + name
        if key not in state and name.endswith(("LayerNorm.weight", "LayerNorm.bias")):
            old = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            )
            key = old if old in state else key
        if key not in state:
            raise ValueError(f"BERT checkpoint lacks key {key!r} (needed for this config)")
        value = np.asarray(state[key])
        if value.shape != shape:
            raise ValueError(
                f"BERT checkpoint key {key!r} has shape {value.shape}, but the config "
                f"(hidden_size={H}, intermediate_size={inter}, vocab_size={c.vocab_size}, ...) "
                f"expects {shape}; does config.json belong to these weights?"
            )
        return value

    def dense(name: str, d_in: int, d_out: int) -> dict:
        return {
            "kernel": get(f"{name}.weight", (d_out, d_in)).T,
            "bias": get(f"{name}.bias", (d_out,)),
        }

    def norm(name: str) -> dict:
        return {"scale": get(f"{name}.weight", (H,)), "bias": get(f"{name}.bias", (H,))}

    e = "embeddings."
    params: dict = {
        "embeddings": {
            "word_embeddings": {"embedding": get(e + "word_embeddings.weight", (c.vocab_size, H))},
            "position_embeddings": {
                "embedding": get(e + "position_embeddings.weight", (c.max_position_embeddings, H))
            },
            "token_type_embeddings": {
                "embedding": get(e + "token_type_embeddings.weight", (c.type_vocab_size, H))
            },
            "LayerNorm": norm(e + "LayerNorm"),
        },
        "encoder": {},
    }
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        params["encoder"][f"layer_{i}"] = {
            "attention": {
                "self": {
                    n: dense(f"{p}attention.self.{n}", H, H) for n in ("query", "key", "value")
                },
                "output": {
                    "dense": dense(p + "attention.output.dense", H, H),
                    "LayerNorm": norm(p + "attention.output.LayerNorm"),
                },
            },
            "intermediate": {"dense": dense(p + "intermediate.dense", H, inter)},
            "output": {
                "dense": dense(p + "output.dense", inter, H),
                "LayerNorm": norm(p + "output.LayerNorm"),
            },
        }
    if add_pooling_layer:
        params["pooler"] = {"dense": dense("pooler.dense", H, H)}
    return params
