"""A merged model -> an HF checkpoint directory (config.json + model.safetensors, HF key names).

The backbone's own checkpoint is copied with every adapted kernel replaced by
W0 + ΔW (transposed back to torch's (out, in) layout), in the dtype it was stored
in, so ``transformers`` loads it with the class that saved the backbone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters.lora import delta_w
from llora_jax.backbones.hf import Backbone, load_state_dict
from llora_jax.interop import names
from llora_jax.interop.peft_export import ExportError, lora_factors
from llora_jax.interop.staging import staged_directory

# Files of a checkpoint directory that describe the model or its inputs (copied as they are).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "preprocessor_config.json",
)


def weight_delta(t: task_vectors.TaskVector) -> dict:
    """{Linen param path: Δ} that task vector ``t`` (or a merge) adds to the backbone."""
    kind = t.meta.get("adapter_kind")
    if kind in ("delta_w", "full"):
        return dict(tree_lib.flatten(t.tau))
    factors, scales = lora_factors(t)  # refuses l_lora_model, says why
    dws = delta_w(
        tree_lib.unflatten({f"{m}/{k}": v for m, f in factors.items() for k, v in f.items()}),
        scales,
    )
    return {f"{m}/kernel": np.asarray(d) for m, d in dws.items()}


def export_hf(
    t: task_vectors.TaskVector,
    backbone: Backbone,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write backbone + task vector ``t`` as an HF checkpoint directory (atomically)."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True or choose another path")
    state = dict(load_state_dict(backbone.path))
    keys = set(state)
    flat_params = tree_lib.flatten(backbone.params)
    for path, d in weight_delta(t).items():
        if path not in flat_params:
            raise ExportError(f"task-vector leaf {path!r} is not a parameter of the backbone")
        key = names.hf_param_key(backbone, path, keys)
        w = state[key]
        d = names.to_hf_layout(path, np.asarray(d, np.float32))
        if d.shape != w.shape:
            raise ExportError(
                f"{path!r}: Δ has shape {d.shape}, checkpoint tensor {key!r} {w.shape}"
            )
        state[key] = (np.asarray(w, np.float32) + d).astype(w.dtype)
    with staged_directory(out, "export") as stage:
        for name in SIDE_FILES:
            if (backbone.path / name).is_file():
                shutil.copy2(backbone.path / name, stage / name)
        save_file(
            # order="C", not ascontiguousarray: that one turns 0-d tensors (logit_scale) into 1-d
            {k: np.asarray(v, order="C") for k, v in state.items()},
            stage / "model.safetensors",
            metadata={"format": "pt"},
        )
    return out
