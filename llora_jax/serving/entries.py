"""Bank entries from task vectors on disk or in memory: trained, imported and fused adapters.

A routed-bank entry (:mod:`llora_jax.adapters.routed`) is ``{module path: {"A", "B",
"scale"}}`` for factor adapters or ``{module path: {"W", "scale"}}`` for a dense ΔW.

* ``lora`` task vectors (our ``lora`` and ``l_lora`` runs, FusionBench L-LoRA imports,
  llora-jax PEFT exports read back): φ = φ0 + τ, per-layer scales from ``meta["scale"]``
  when present, else α / r.
* ``delta_w`` task vectors (any other imported PEFT adapter, φ0 unknown): τ holds
  ``{…/kernel: ΔW}`` at each adapted kernel's path; the entry is that ΔW (a dense bank).
* a fusion result: the merged τ of several task vectors (any fusion method) is one
  more task vector with the members' metadata and φ0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llora_jax import fusion, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters import routed
from llora_jax.adapters.lora import layer_scale

PyTree = Any
KERNEL = "kernel"


def _scale(meta: dict, where: Any) -> float | Mapping[str, float]:
    if meta.get("scale") is not None:  # per-layer (imports with rank / alpha patterns)
        return meta["scale"]
    if not meta.get("rank") or not meta.get("alpha"):
        raise ValueError(f"{where}: the task vector records no rank / alpha (no LoRA scale)")
    return float(meta["alpha"]) / float(meta["rank"])


def _with_layer_scales(entry: dict, scale: float | Mapping[str, float]) -> dict:
    return {p: {**lay, "scale": float(layer_scale(scale, p))} for p, lay in entry.items()}


def delta_w_layers(tau: PyTree, where: Any = "delta_w task vector") -> dict:
    """{module path: ΔW (d_in, d_out)} of a ``delta_w`` τ ({…/kernel: ΔW})."""
    out = {}
    for name, dw in tree_lib.flatten(tau).items():
        module, leaf = name.rsplit("/", 1) if "/" in name else ("", name)
        if leaf != KERNEL or np.ndim(dw) != 2:
            raise ValueError(
                f"{where}: leaf {name!r} is not a dense kernel's ΔW; a delta_w task vector "
                "holds {module path…: {'kernel': ΔW (in, out)}}"
            )
        out[module] = dw
    return out


def entry_from_task_vector(t: task_vectors.TaskVector) -> dict:
    """A routed-bank entry from a loaded task vector."""
    meta, where = t.meta, t.path or t.task
    kind = meta.get("adapter_kind")
    if kind == "delta_w":
        return routed.delta_w_entry(delta_w_layers(t.tau, where))
    if kind != "lora":
        raise ValueError(
            f"{where}: adapter_kind {kind!r} cannot be routed; a bank holds LoRA / L-LoRA "
            "adapters and dense ΔW task vectors (full fine-tuning deltas are whole models)"
        )
    mode = meta.get("mode")
    if mode not in ("lora", "l_lora"):
        raise ValueError(
            f"{where}: mode {mode!r} cannot be routed (l_lora_model linearizes the whole "
            "network, which is no per-layer branch); a bank holds lora and l_lora adapters"
        )
    if t.phi0 is None:
        raise ValueError(f"{where}: the task vector has no phi0, needed to rebuild φ = φ0 + τ")
    phi = tree_lib.add(t.phi0, t.tau)
    entry = routed.entry(phi, mode=mode, scale=1.0, phi0=t.phi0)
    return _with_layer_scales(entry, _scale(meta, where))


def fused_task_vector(
    members: Sequence[task_vectors.TaskVector], merged_tau: PyTree, name: str = "fused"
) -> task_vectors.TaskVector:
    """A fusion result (``merged_tau`` = a fusion method applied to the members' τ) as one
    more task vector: the members' metadata (checked compatible) and φ0."""
    if not members:
        raise ValueError("a fusion result needs the task vectors it merged")
    task_vectors.check_compatible(list(members))
    first = members[0]
    meta = dict(first.meta, task=name, merged_from=[m.task for m in members])
    return task_vectors.TaskVector(tau=merged_tau, meta=meta, phi0=first.phi0)


def fused_entry(
    members: Sequence[task_vectors.TaskVector], method: str, name: str = "fused", **hparams: Any
) -> dict:
    """The bank entry of ``fusion.get(method)(taus, **hparams)`` over ``members``."""
    merged = fusion.get(method)([m.tau for m in members], **hparams)
    return entry_from_task_vector(fused_task_vector(members, merged, name))


def cast_entry(entry: dict, dtype: Any) -> dict:
    return {
        p: {k: (v if k == "scale" else np.asarray(v).astype(dtype)) for k, v in lay.items()}
        for p, lay in entry.items()
    }


def read_meta(path: Path) -> dict:
    """Only the metadata, without restoring the arrays (the bank reads those lazily)."""
    try:
        return json.loads((path / task_vectors.META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise task_vectors.TaskVectorError(
            f"{path / task_vectors.META_FILE} is not valid JSON: {e}"
        ) from e
