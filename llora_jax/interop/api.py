"""Plain functions behind ``llora import-peft / export-peft / export-hf``.

Each takes paths (or loaded objects), validates everything before it writes, and
returns the paths it wrote.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from llora_jax import fusion, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.backbones.hf import Backbone, load_backbone, load_state_dict
from llora_jax.interop import delta_w, fusionbench, hf_export, peft_export
from llora_jax.interop.peft_import import ImportedAdapter, read_peft_adapter, resolve_adapter_dir


def resolve_task_vector(path: str | os.PathLike) -> Path:
    """A task-vector directory, or the ``task_vector/`` of a run directory."""
    p = Path(path)
    if not task_vectors.is_task_vector(p) and task_vectors.is_task_vector(p / "task_vector"):
        return p / "task_vector"
    return p


def merge_task_vectors(
    paths: Sequence[str | os.PathLike], method: str, hparams: dict | None = None
) -> task_vectors.TaskVector:
    """The fusion ``method``'s merge of compatible task vectors (run or task-vector dirs),
    with the recipe (method, hyper-parameters, tasks, sources) in its metadata."""
    tvs = task_vectors.load_many([resolve_task_vector(p) for p in paths])
    hparams = dict(hparams or {})
    tau = fusion.get(method)([t.tau for t in tvs], **hparams)
    tau = jax.tree.map(lambda x: np.asarray(x, np.float32), tau)
    recipe = {
        "method": method,
        "hparams": hparams,
        "tasks": [t.task for t in tvs],
        "sources": [os.fspath(t.path) for t in tvs],
    }
    meta = {**tvs[0].meta, "task": "+".join(t.task for t in tvs), "recipe": recipe}
    meta["metrics"] = {}
    return task_vectors.TaskVector(tau=tau, meta=meta, phi0=tvs[0].phi0)


def _backbone(backbone: str | os.PathLike | Backbone) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else load_backbone(backbone)


def _name(src: str | os.PathLike) -> str:
    return Path(os.fspath(src).rstrip("/")).name


def _check_side_files(t: task_vectors.TaskVector, adapter: ImportedAdapter, where: Path) -> None:
    """Refuse side files that do not describe the PEFT weights next to them (edited weights)."""
    ours = delta_w.delta_w_tree(adapter.phi, adapter.scale)
    theirs = dict(tree_lib.flatten(hf_export.weight_delta(t)))
    for name, d in tree_lib.flatten(ours).items():
        ref = theirs.pop(name, None)
        if ref is None or not np.allclose(d, ref, rtol=1e-4, atol=1e-6 * float(np.abs(ref).max())):
            raise ValueError(
                f"{where}: {peft_export.SIDE_TENSORS} does not match adapter_model.safetensors at "
                f"{name!r} (were the weights changed after export?); delete the llora_* side files "
                "to import the weights as a delta_w task vector"
            )
    if theirs:
        raise ValueError(
            f"{where}: the side files name layers the adapter lacks: {sorted(theirs)[:3]}"
        )


def import_peft(
    srcs: Sequence[str | os.PathLike],
    backbone: str | os.PathLike | Backbone,
    out: str | os.PathLike,
    *,
    force: bool = False,
    tower: str = "vision_model",
    overwrite: bool = False,
    names: Sequence[str] | None = None,
    leaf: str = "",
) -> list[Path]:
    """One task vector per adapter under ``out/<adapter name>`` (``out/<name>/<leaf>`` when
    ``leaf`` is given, e.g. "task_vector" for run directories; ``names`` replaces the
    adapter directory names).

    * a directory exported by llora-jax (side files present): its own task vector, exactly;
    * a FusionBench L-LoRA directory (``linearized_adapter_model.safetensors``): an exact
      ``l_lora`` task vector with its φ0;
    * any other PEFT LoRA adapter: a ``delta_w`` task vector (φ0 unknown) that keeps the
      adapter's own files in ``peft_adapter/``.

    Every adapter is read and checked before anything is written.
    """
    bb = _backbone(backbone)
    out = Path(out)
    names = list(names) if names is not None else [_name(s) for s in srcs]
    if len(names) != len(srcs):
        raise ValueError(f"{len(srcs)} adapters need as many names, got {len(names)}: {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"two adapters share a name, their task vectors would collide: {names}")
    targets = [out / n / leaf if leaf else out / n for n in names]
    for t in targets:
        if t.exists() and not overwrite:
            raise FileExistsError(f"{t} already exists; pass overwrite=True or another --out")
    state_keys = set(load_state_dict(bb.path))
    kw = dict(force=force, tower=tower, state_keys=state_keys)
    loaded: list[task_vectors.TaskVector | ImportedAdapter] = []
    for src in srcs:
        d = resolve_adapter_dir(src)
        if (d / peft_export.SIDE_META).is_file():
            exported = peft_export.read_exported(d)
            _check_side_files(exported, read_peft_adapter(src, bb, **kw), d)
            loaded.append(exported)
        elif (d / fusionbench.L_LORA_FILE).is_file():
            loaded.append(fusionbench.read_l_lora(src, bb, **kw))
        else:
            loaded.append(read_peft_adapter(src, bb, **kw))
    written = []
    for n, target, item in zip(names, targets, loaded):
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(item, task_vectors.TaskVector):
            path = task_vectors.save(
                target, item.tau, item.meta, phi0=item.phi0, overwrite=overwrite
            )
        elif item.phi0 is not None:
            path = fusionbench.save_l_lora(target, item, bb, task=n, overwrite=overwrite)
        else:
            path = delta_w.save_imported(target, item, bb, task=n, overwrite=overwrite)
        written.append(path)
    return written


def export_peft(
    task_vector: str | os.PathLike | task_vectors.TaskVector,
    out: str | os.PathLike,
    *,
    backbone: str | os.PathLike | Backbone | None = None,
    overwrite: bool = False,
) -> Path:
    """A task vector (or merge) as a PEFT adapter directory.

    An imported ``delta_w`` task vector read from disk is re-exported as the PEFT adapter
    it came from, byte for byte; other vectors go through :func:`peft_export.export_peft`.
    ``backbone`` defaults to the task vector's ``base_model``.
    """
    t = (
        task_vector
        if isinstance(task_vector, task_vectors.TaskVector)
        else task_vectors.load(task_vector)
    )
    kept = None if t.path is None else t.path / delta_w.ADAPTER_DIR
    if kept is not None and kept.is_dir() and isinstance(task_vector, (str, os.PathLike)):
        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True or another --out")
        tmp = out.parent / f".{out.name}.copy-{uuid.uuid4().hex[:8]}"
        shutil.copytree(kept, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out
    bb = _backbone(backbone if backbone is not None else t.meta["base_model"])
    return peft_export.export_peft(t, bb, out, overwrite=overwrite)


def export_hf(
    task_vector: str | os.PathLike | task_vectors.TaskVector,
    out: str | os.PathLike,
    *,
    backbone: str | os.PathLike | Backbone | None = None,
    overwrite: bool = False,
) -> Path:
    """Backbone + task vector (or merge) as an HF checkpoint directory."""
    t = (
        task_vector
        if isinstance(task_vector, task_vectors.TaskVector)
        else task_vectors.load(task_vector)
    )
    bb = _backbone(backbone if backbone is not None else t.meta["base_model"])
    return hf_export.export_hf(t, bb, out, overwrite=overwrite)
