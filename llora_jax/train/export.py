"""A finished run on disk: its task vector (τ = φ − φ0, or θ − θ0) and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.types import AdapterSpec, TaskModel

PyTree = Any


def to_host(tree: PyTree) -> PyTree:
    return None if tree is None else jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def export_run(
    workdir: Path,
    tm: TaskModel,
    spec: AdapterSpec,
    tau: PyTree,
    phi0: PyTree | None,
    metrics: dict,
    *,
    seed: int,
    steps: int,
    meta: dict,
    base_fingerprint: str | None = None,
) -> None:
    """Write the task vector and metrics.json. ``base_fingerprint``: tree.fingerprint(tm.params)
    if already known (a group exports many runs of one backbone; hashing it takes ~0.1 s)."""
    meta = dict(meta)
    cfg = spec.lora
    is_full = spec.method == "full"
    fields = dict(
        base_model=tm.base_model,
        base_fingerprint=base_fingerprint or tree_lib.fingerprint(tm.params),
        adapter_kind="full" if is_full else "lora",
        mode=spec.method,
        task=meta.pop("task", "unknown"),
        seed=seed,
        steps=steps,
        targets=list(tm.full_ft_targets) if is_full else list(cfg.targets),
        rank=None if is_full else cfg.rank,
        alpha=None if is_full else cfg.alpha,
        metrics=metrics,
    )
    full_meta = task_vectors.make_meta(**fields, **meta)
    task_vectors.save(
        workdir / "task_vector", to_host(tau), full_meta, phi0=to_host(phi0), overwrite=True
    )
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
