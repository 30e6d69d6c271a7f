"""llora-jax: partially linearized LoRA adapters (L-LoRA) for multi-task model fusion."""

__version__ = "0.1.0"
