"""Weight-space task vectors (kind ``delta_w``) and merged backbones W0 + Σ λ ΔW.

A ``delta_w`` task vector holds, for every adapted dense layer, the dense weight
change ΔW = s·A·B in the kernel's (in, out) orientation, at the kernel's own
path: ``{…/query: {"kernel": ΔW}}``. It is what FusionBench and mergekit merge
for LoRA adapters whose initialisation φ0 is unknown. Because its leaves sit at
the backbone's parameter paths, the fusion methods (pure pytree functions) merge
it like any task vector and :func:`merged_params` adds it onto the backbone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters.lora import Scale, delta_w
from llora_jax.backbones.hf import Backbone
from llora_jax.fusion import weighted
from llora_jax.interop.peft_import import ImportedAdapter, provenance
from llora_jax.interop.staging import staged_directory

PyTree = Any
KIND = "delta_w"
ADAPTER_DIR = "peft_adapter"  # the imported adapter's own files, kept inside its task vector


def delta_w_tree(phi: PyTree, scale: Scale, phi0: PyTree | None = None, mode: str = "lora") -> dict:
    """{module path…: {"kernel": ΔW (in, out)}} of a LoRA / L-LoRA adapter, float32 numpy."""
    dws = delta_w(phi, scale, phi0, mode)
    return tree_lib.unflatten({f"{m}/kernel": np.asarray(dw, np.float32) for m, dw in dws.items()})


def merged_params(params: PyTree, tau: PyTree) -> PyTree:
    """Backbone ``params`` with every leaf that ``tau`` names increased by it (ΔW or full τ).

    Works for a single ``delta_w`` (or ``full``) task vector and for any merge of them;
    the sum is taken in float32 and cast back to each parameter's dtype.
    """
    flat = dict(tree_lib.flatten(params))
    for name, d in tree_lib.flatten(tau).items():
        if name not in flat:
            raise ValueError(
                f"task-vector leaf {name!r} is not a parameter of this backbone; "
                "was the task vector made for another model?"
            )
        w = flat[name]
        if np.shape(w) != np.shape(d):
            raise ValueError(
                f"task-vector leaf {name!r} has shape {np.shape(d)}, the backbone {np.shape(w)}"
            )
        flat[name] = (jnp.asarray(w, jnp.float32) + jnp.asarray(d, jnp.float32)).astype(
            jnp.result_type(w)
        )
    return tree_lib.unflatten(flat)


def merge_weighted(params: PyTree, taus: Sequence[PyTree], lambdas: Sequence[float]) -> PyTree:
    """W0 + Σ_i λ_i ΔW_i on the adapted layers: the merged model's parameters for evaluation."""
    return merged_params(params, weighted(list(taus), jnp.asarray(lambdas, jnp.float32)))


def delta_w_meta(backbone: Backbone, adapter: ImportedAdapter, task: str, **extra: Any) -> dict:
    """Task-vector metadata of an imported adapter's ΔW, with where the adapter came from."""
    return task_vectors.make_meta(
        base_model=backbone.source,
        base_fingerprint=tree_lib.fingerprint(backbone.params),
        adapter_kind=KIND,
        mode=KIND,
        task=task,
        seed=-1,  # unknown: trained elsewhere
        steps=0,
        targets=sorted(adapter.modules.values()),
        provenance=provenance(adapter),
        **extra,
    )


def save_imported(
    out: str | os.PathLike,
    adapter: ImportedAdapter,
    backbone: Backbone,
    *,
    task: str,
    overwrite: bool = False,
) -> Path:
    """Write ``adapter`` as a ``delta_w`` task vector that also keeps the PEFT files (A and B).

    Written atomically: the task vector and its ``peft_adapter/`` copy are assembled in a
    hidden sibling directory and renamed into place together.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True or choose another path")
    tau = delta_w_tree(adapter.phi, adapter.scale)
    with staged_directory(out, "import", create=False) as stage:
        task_vectors.save(stage, tau, delta_w_meta(backbone, adapter, task))
        (stage / ADAPTER_DIR).mkdir()
        for file in (adapter.weights_file.parent / "adapter_config.json", adapter.weights_file):
            shutil.copy2(file, stage / ADAPTER_DIR / file.name)
    return out
