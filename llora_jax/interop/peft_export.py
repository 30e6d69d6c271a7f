"""Task vectors -> PEFT LoRA adapter directories that ``peft.PeftModel.from_pretrained`` loads.

* ``lora`` task vector (adapter space): the adapter φ0 + τ, as it is.
* ``l_lora`` (each branch linearized around φ0): its weight change is
  s·[A0 B + A B0 − A0 B0]. With B0 = 0 that is the LoRA (A0, B) exactly, rank r;
  otherwise it is the rank-2r LoRA ([A0 | A], [B − B0 ; B0]), exported so.
* ``delta_w``: each ΔW factorised by a truncated SVD at its numerical rank
  (ΔW = U S Vᵀ, A = U √S, B = √S Vᵀ, scale 1), ranks in ``rank_pattern``.
* ``l_lora_model`` linearizes the whole network in φ: its outputs are no function of
  any weight change, so it has no PEFT (or HF) form and is refused.

Side files make a round trip exact: ``llora_task_vector.safetensors`` holds τ and φ0
at their Linen paths and ``llora_meta.json`` the task-vector metadata (φ0 fingerprint,
task, seed, merge recipe), so :func:`read_exported` restores the adapter-space task
vector bit for bit.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.adapters.lora import adapter_layers, layer_scale
from llora_jax.backbones.hf import Backbone, load_state_dict, read_safetensors
from llora_jax.interop import names
from llora_jax.interop.staging import staged_directory

SIDE_TENSORS = "llora_task_vector.safetensors"
SIDE_META = "llora_meta.json"


class ExportError(ValueError):
    """A task vector has no exact form in the requested format; the message says why."""


def meta_scale(meta: dict) -> float | dict[str, float]:
    """The LoRA scale of a task vector: its per-layer ``scale`` entry, else α / r."""
    if meta.get("scale") is not None:
        return meta["scale"]
    if not meta.get("rank") or not meta.get("alpha"):
        raise ExportError(
            f"task vector {meta.get('task')!r} records no rank / alpha (no LoRA scale)"
        )
    return meta["alpha"] / meta["rank"]


def lora_factors(
    t: task_vectors.TaskVector,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """{Linen module path: {"A": (in, k), "B": (k, out)}} and per-layer scales of the LoRA
    that computes exactly what task vector ``t`` computes."""
    mode = t.meta.get("mode")
    if mode == "l_lora_model":
        raise ExportError(
            f"task vector {t.task!r} is l_lora_model: the whole network is linearized in φ, so its "
            "outputs are not those of any weight change and no LoRA / HF checkpoint reproduces them"
        )
    if t.meta.get("adapter_kind") != "lora" or t.phi0 is None:
        raise ExportError(
            f"task vector {t.task!r} (kind {t.meta.get('adapter_kind')!r}) has no LoRA factors "
            "and φ0; export a delta_w vector with export_delta_w, or a full one with export_hf"
        )
    scale = meta_scale(t.meta)
    layers = adapter_layers(tree_lib.add(t.phi0, t.tau))
    layers0 = adapter_layers(t.phi0)
    out, scales = {}, {}
    for m, lay in layers.items():
        a, b = np.asarray(lay["A"], np.float32), np.asarray(lay["B"], np.float32)
        a0, b0 = np.asarray(layers0[m]["A"], np.float32), np.asarray(layers0[m]["B"], np.float32)
        if mode == "l_lora" and not np.any(b0):
            a, b = a0, b  # s·A0·B exactly: A's own movement has no effect when B0 = 0
        elif mode == "l_lora":
            a, b = np.concatenate([a0, a], 1), np.concatenate([b - b0, b0], 0)
        out[m], scales[m] = {"A": a, "B": b}, float(layer_scale(scale, m))
    return out, scales


def svd_factors(tau: dict, rtol: float | None = None) -> tuple[dict, dict[str, float]]:
    """Per layer ΔW = A B with A = U_k √S_k, B = √S_k V_kᵀ at the numerical rank k (scale 1).

    ``rtol``: singular values below rtol·S_max are dropped (default: max(in, out) times
    float32's epsilon, i.e. what float32 storage of ΔW cannot tell from zero).
    """
    out, scales = {}, {}
    for name, dw in tree_lib.flatten(tau).items():
        if not name.endswith("/kernel"):
            raise ExportError(f"delta_w leaf {name!r} is not a dense kernel")
        dw = np.asarray(dw, np.float64)
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        tol = (max(dw.shape) * np.finfo(np.float32).eps if rtol is None else rtol) * (
            s[0] if s.size else 0
        )
        k = int(np.sum(s > tol))
        if k == 0:
            continue  # ΔW = 0: the layer needs no adapter
        root = np.sqrt(s[:k])
        m = name[: -len("/kernel")]
        out[m] = {
            "A": (u[:, :k] * root).astype(np.float32),
            "B": (root[:, None] * vt[:k]).astype(np.float32),
        }
        scales[m] = 1.0
    return out, scales


def _peft_config(factors: dict, scales: dict, hf: dict[str, str], base: str) -> dict:
    ranks = {m: int(f["A"].shape[1]) for m, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alphas = {m: scales[m] * ranks[m] for m in factors}  # PEFT's scale is α / r
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(hf[m] for m in factors),
        "rank_pattern": {hf[m]: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {hf[m]: a for m, a in alphas.items() if a != alpha},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_peft_dir(
    out: str | os.PathLike,
    factors: dict,
    scales: dict,
    backbone: Backbone,
    *,
    side: task_vectors.TaskVector | None = None,
    overwrite: bool = False,
) -> Path:
    """Write factors as a PEFT adapter directory (atomically), with llora-jax side files."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True or choose another path")
    hf = names.hf_module_names(backbone, set(load_state_dict(backbone.path)))
    tensors = {}
    for m, f in factors.items():
        key = f"base_model.model.{hf[m]}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(f["A"].T)  # (in, r) -> (r, in)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(f["B"].T)  # (r, out) -> (out, r)
    with staged_directory(out, "export") as stage:
        cfg = _peft_config(factors, scales, hf, backbone.source)
        (stage / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file(tensors, stage / "adapter_model.safetensors")
        if side is not None:
            side_tensors = {
                f"tau/{k}": np.asarray(v) for k, v in tree_lib.flatten(side.tau).items()
            }
            if side.phi0 is not None:
                side_tensors |= {
                    f"phi0/{k}": np.asarray(v) for k, v in tree_lib.flatten(side.phi0).items()
                }
            save_file(side_tensors, stage / SIDE_TENSORS)
            (stage / SIDE_META).write_text(
                json.dumps(side.meta, indent=2, sort_keys=True, default=str)
            )
    return out


def export_peft(
    t: task_vectors.TaskVector, backbone: Backbone, out: str | os.PathLike, **kw
) -> Path:
    """A ``lora`` / ``l_lora`` / ``delta_w`` task vector (single or merged) -> PEFT adapter dir."""
    if t.meta.get("adapter_kind") == "delta_w":
        factors, scales = svd_factors(t.tau)
    else:
        factors, scales = lora_factors(t)
    return write_peft_dir(out, factors, scales, backbone, side=t, **kw)


def read_exported(adapter_dir: str | os.PathLike) -> task_vectors.TaskVector:
    """The task vector a PEFT directory written by :func:`export_peft` came from, bit for bit."""
    adapter_dir = Path(adapter_dir)
    for name in (SIDE_TENSORS, SIDE_META):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(
                f"{adapter_dir / name} does not exist: this adapter was not exported by llora-jax; "
                "import it with read_peft_adapter (as a delta_w task vector)"
            )
    flat = read_safetensors(adapter_dir / SIDE_TENSORS)
    meta = json.loads((adapter_dir / SIDE_META).read_text())
    tau = tree_lib.unflatten({k[4:]: v for k, v in flat.items() if k.startswith("tau/")})
    phi0_flat = {k[5:]: v for k, v in flat.items() if k.startswith("phi0/")}
    phi0 = tree_lib.unflatten(phi0_flat) if phi0_flat else None
    if phi0 is not None and meta.get("phi0_fingerprint") not in (None, tree_lib.fingerprint(phi0)):
        raise task_vectors.TaskVectorError(
            f"{adapter_dir / SIDE_TENSORS}: φ0 does not match its fingerprint"
        )
    return task_vectors.TaskVector(tau=tau, meta=meta, phi0=phi0, path=adapter_dir)
