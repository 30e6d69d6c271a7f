"""Linen backbones that mirror Hugging Face parameter names, and the checkpoint loader.

Model modules (``bert``, ``t5``, ``clip``) are imported on demand by ``load_backbone``
so that importing this package stays cheap and needs none of them.
"""

from llora_jax.backbones.hf import (
    SUPPORTED_MODEL_TYPES,
    Backbone,
    load_backbone,
    load_hf_config,
    load_state_dict,
    resolve_source,
)
from llora_jax.backbones.tokenizers import load_tokenizer, needs_tokenizer

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Backbone",
    "load_backbone",
    "load_hf_config",
    "load_state_dict",
    "load_tokenizer",
    "needs_tokenizer",
    "resolve_source",
]
