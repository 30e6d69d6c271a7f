"""Task vectors as dense weight changes: merge and evaluate LoRA adapters in ΔW space.

Adapters with a per-task A0 (``LoraConfig.a0 = "per_task"``) live in different bases:
adding their A and B coordinates means nothing. Their weight changes do add: per layer
ΔW_i = s·(A0_i τB_i + τA_i B0_i [+ τA_i τB_i for LoRA]) (``interference.lora_delta_w``).
A ΔW member is the member re-expressed as a full fine-tune of exactly the adapted
kernels: its task vector is {kernel path: ΔW}, its adapter spec ``full`` and its task
model's ``full_ft_targets`` those kernels. Every fusion method and the grid evaluation
then run unchanged: a merged model is the frozen weights plus Σ λ_i ΔW_i.

Exact for B0 = 0 (the adapter adds nothing at φ0): the ΔW member at λ = 1 is the
fine-tuned model (L-LoRA's linearized branch is linear in τ; LoRA's ΔW keeps the
product term). With B0 ≠ 0 the adapter at φ0 already changes W by s·A0 B0, which a ΔW
merge would drop, so such vectors are refused. ``l_lora_model`` linearizes the whole
network, not a layer, and has no per-layer ΔW: refused too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from llora_jax import tree as tree_lib
from llora_jax.fusion.programs import Member
from llora_jax.interference.similarity import lora_delta_w
from llora_jax.task_vectors import TaskVector
from llora_jax.types import AdapterSpec

PyTree = Any

SPACE = "delta_w"


def delta_w_tree(tv: TaskVector, spec: AdapterSpec) -> PyTree:
    """The task vector's dense weight change, nested like the backbone's params:
    {... module path ...: {"kernel": ΔW (in, out)}}."""
    if spec.method not in ("lora", "l_lora"):
        raise ValueError(
            f"ΔW merging needs per-layer LoRA adapters (lora or l_lora), got {spec.method!r}"
        )
    if spec.lora.init_b != "zero":
        raise ValueError(
            "ΔW merging needs B0 = 0 (lora.init_b='zero'): with B0 ≠ 0 the adapter already "
            "changes the weights at φ0, which a sum of ΔW would drop"
        )
    if tv.phi0 is None:
        raise ValueError(f"task vector of {tv.task!r} has no φ0: load it with with_phi0=True")
    linear = spec.method == "l_lora"
    dws = lora_delta_w(tv.tau, tv.phi0, spec.lora.scale, linearized=linear)
    return tree_lib.unflatten({f"{path}/kernel": dw for path, dw in dws.items()})


def delta_w_member(member: Member) -> Member:
    """``member`` as a ΔW member (see the module docstring): same task, data, heads and
    single-task metrics; evaluated as frozen weights + Σ λ ΔW."""
    spec = member.exp.spec
    dw = delta_w_tree(member.tv, spec)
    paths = sorted(tree_lib.flatten(dw))
    targets = tuple(f"^{re.escape(p)}$" for p in paths)
    tm = dataclasses.replace(member.exp.tm, full_ft_targets=targets)
    exp = dataclasses.replace(member.exp, tm=tm, spec=AdapterSpec("full", spec.lora))
    meta = dict(member.tv.meta)
    # ΔW of every task lives in one space, whatever each task's A0: what must agree is
    # the base model, the adapted kernels and the scale, not φ0.
    meta.update(
        adapter_kind=SPACE,
        mode=f"{spec.method}:{SPACE}",
        phi0_fingerprint=None,
        targets=list(paths),
        rank=None,
    )
    return Member(exp=exp, tv=TaskVector(tau=dw, meta=meta, phi0=None, path=member.tv.path))
