"""Adapters as pure functions over pytrees (LoRA and its linearized forms)."""

from llora_jax.adapters.attach import MODES, apply, check_mode
from llora_jax.adapters.linearize import combine_linear, linearize_outputs, linearized_call
from llora_jax.adapters.lora import (
    LoraConfig,
    adapter_layers,
    branch,
    delta_w,
    init_lora,
    merge_into_params,
    target_modules,
)

__all__ = [
    "MODES",
    "LoraConfig",
    "adapter_layers",
    "apply",
    "branch",
    "check_mode",
    "combine_linear",
    "delta_w",
    "init_lora",
    "linearize_outputs",
    "linearized_call",
    "merge_into_params",
    "target_modules",
]
