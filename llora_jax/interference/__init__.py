"""Interference between task vectors: how similar they are and how much they collide.

``similarity``: cosine matrices of task vectors (flattened adapter parameters) and of
their dense weight changes ΔW; ``disentangle``: the disentanglement error ξ(λ1, λ2) of
two task models on a λ grid. Core-region overlap (``core_overlap``) is defined with the
isolation merge that uses it (``fusion.isolation``) and re-exported here.
"""

from llora_jax.fusion.isolation import core_overlap
from llora_jax.interference.disentangle import DEFAULT_GRID, disentanglement_error
from llora_jax.interference.similarity import cosine_matrix, lora_delta_w, mean_off_diagonal

__all__ = [
    "DEFAULT_GRID",
    "core_overlap",
    "cosine_matrix",
    "disentanglement_error",
    "lora_delta_w",
    "mean_off_diagonal",
]
