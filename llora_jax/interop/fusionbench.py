"""FusionBench's L-LoRA checkpoints as exact ``l_lora`` task vectors (τ = φ − φ0, with φ0).

What FusionBench writes (read from its source, ``fusion_bench/models/linearized/`` and
the CLIP fine-tuning method's ``convert_l_lora_state_dict_to_hf``): a PEFT model on the
vision tower whose every LoRA layer is wrapped so that it is linearized around φ0.
The directory holds the ordinary ``adapter_config.json`` and
``linearized_adapter_model.safetensors`` with, for each wrapped layer ``M``
(``base_model.model.encoder.layers.N.self_attn.q_proj``):

* ``M.model.lora_A.<adapter>.weight`` (r, in) and ``M.model.lora_B.<adapter>.weight``
  (out, r): the fine-tuned φ;
* ``M.params0_values.<i>``: φ0. ``<i>`` is the position of the parameter among *all*
  the layer's parameters (base weight, base bias, lora_A, lora_B), and only the
  trainable ones are written, in the same order; so the smaller index is A0 and the
  larger B0 (2 and 3 for a linear layer with a bias, 1 and 2 without).

The wrapper computes f(x; φ0) + ∂φ f(x; φ0)·(φ − φ0) of each LoRA layer, which is
llora-jax's ``l_lora`` mode with the same φ0 and scale.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from llora_jax import task_vectors
from llora_jax import tree as tree_lib
from llora_jax.backbones.hf import Backbone, read_safetensors
from llora_jax.interop.peft_config import PeftImportError, check_config, read_config
from llora_jax.interop.peft_import import (
    ImportedAdapter,
    adapter_tree,
    check_base,
    provenance,
    resolve_adapter_dir,
    sha256_file,
)

L_LORA_FILE = "linearized_adapter_model.safetensors"
_PHI = re.compile(
    r"^(?:base_model\.model\.)?(?P<mod>.+)\.model\.lora_(?P<ab>[AB])\.[\w-]+\.weight$"
)
_PHI0 = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.params0_values\.(?P<i>\d+)$")


def _split(state: dict[str, np.ndarray], file: Path) -> tuple[dict, dict]:
    phi: dict[str, dict[str, np.ndarray]] = {}
    phi0_by_index: dict[str, dict[int, np.ndarray]] = {}
    for key, value in state.items():
        value = np.asarray(value, np.float32)
        if m := _PHI.match(key):
            phi.setdefault(m["mod"], {})[m["ab"]] = value
        elif m := _PHI0.match(key):
            phi0_by_index.setdefault(m["mod"], {})[int(m["i"])] = value
        else:
            raise PeftImportError(
                f"{file}: tensor {key!r} is neither '<module>.model.lora_A/B.<adapter>.weight' nor "
                "'<module>.params0_values.<i>' (FusionBench's L-LoRA layout)"
            )
    phi0 = {}
    for mod in sorted(set(phi) | set(phi0_by_index)):
        found = phi.get(mod, {})
        saved0 = [phi0_by_index.get(mod, {})[i] for i in sorted(phi0_by_index.get(mod, {}))]
        if set(found) != {"A", "B"} or len(saved0) != 2:
            raise PeftImportError(
                f"{file}: module {mod!r} needs lora_A, lora_B and two params0_values "
                f"(their linearization point); found {sorted(found)} and {len(saved0)} values"
            )
        # Written in parameter order: lora_A's point first, then lora_B's.
        phi0[mod] = {"A": saved0[0], "B": saved0[1]}
        for ab in "AB":
            if phi0[mod][ab].shape != found[ab].shape:
                raise PeftImportError(
                    f"{file}: module {mod!r}: lora_{ab} has shape {found[ab].shape} but its "
                    f"linearization point has {phi0[mod][ab].shape}"
                )
    return phi, phi0


def read_l_lora(
    src: str | os.PathLike,
    backbone: Backbone,
    *,
    force: bool = False,
    tower: str = "vision_model",
    state_keys: set[str] | None = None,
) -> ImportedAdapter:
    """Read a FusionBench L-LoRA directory onto ``backbone`` (φ and its φ0)."""
    adapter_dir = resolve_adapter_dir(src)
    where = f"L-LoRA adapter {os.fspath(src)}"
    cfg = read_config(adapter_dir)
    check_config(cfg, where)
    check_base(cfg, backbone, where, force)
    file = adapter_dir / L_LORA_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; FusionBench's L-LoRA adapters ship {L_LORA_FILE}"
        )
    pairs, pairs0 = _split(read_safetensors(file), file)
    kw = dict(tower=tower, state_keys=state_keys)
    phi, scale, modules = adapter_tree(pairs, backbone, cfg, where, **kw)
    phi0, _, _ = adapter_tree(pairs0, backbone, cfg, where, **kw)
    return ImportedAdapter(
        phi=phi,
        scale=scale,
        modules=modules,
        config=cfg,
        source=os.fspath(src),
        weights_file=file,
        sha256=sha256_file(file),
        phi0=phi0,
    )


def l_lora_meta(backbone: Backbone, adapter: ImportedAdapter, task: str) -> dict:
    """Metadata of an ``l_lora`` task vector read from FusionBench (seed and steps unknown)."""
    cfg = adapter.config
    return task_vectors.make_meta(
        base_model=backbone.source,
        base_fingerprint=tree_lib.fingerprint(backbone.params),
        adapter_kind="lora",
        mode="l_lora",
        task=task,
        seed=-1,
        steps=0,
        targets=sorted(adapter.modules.values()),
        rank=cfg["r"],
        alpha=cfg["lora_alpha"],
        scale=adapter.scale,
        provenance=provenance(adapter),
    )


def save_l_lora(
    out: str | os.PathLike,
    adapter: ImportedAdapter,
    backbone: Backbone,
    *,
    task: str,
    overwrite: bool = False,
) -> Path:
    """Write an imported L-LoRA adapter as the exact task vector τ = φ − φ0 with its φ0."""
    if adapter.phi0 is None:
        raise ValueError(f"{adapter.source} carries no linearization point; import it as delta_w")
    tau = tree_lib.sub(adapter.phi, adapter.phi0)
    return task_vectors.save(
        out, tau, l_lora_meta(backbone, adapter, task), phi0=adapter.phi0, overwrite=overwrite
    )
