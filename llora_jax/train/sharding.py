"""Mesh, logical-axis rules and shardings: one code path from a CPU to a TPU pod.

The mesh has axes ("data", "fsdp", "model"). Batches are split over
("data", "fsdp") (FSDP is data parallelism whose weights are also split);
backbone weights carry logical axis names ("embed", "mlp", "qkv", ...) that a
rule set maps to mesh axes. Adapters and optimizer state are small and stay
replicated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axis. "replicated": pure data parallelism (the default;
# adapters fine-tuned on a frozen base rarely need more). "fsdp": the embedding
# dimension of every weight is split over the fsdp axis. "tp": additionally the
# MLP / attention inner dimensions over the model axis.
RULES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "replicated": (),
    "fsdp": (("embed", "fsdp"),),
    "tp": (("embed", "fsdp"), ("mlp", "model"), ("qkv", "model"), ("heads", "model")),
}


def make_mesh(
    data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "model") mesh over all (or the given) devices; -1 = the rest."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp, model]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} x model={model}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {n}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_spec() -> PartitionSpec:
    return PartitionSpec(("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rules(name: str) -> tuple[tuple[str, str | None], ...]:
    if name not in RULES:
        raise ValueError(f"unknown sharding rules {name!r}; valid: {', '.join(RULES)}")
    return RULES[name]


def logical_specs(boxed_abstract_params: PyTree) -> PyTree:
    """Logical PartitionSpecs from an (abstract) boxed init, e.g. jax.eval_shape(module.init, ...)."""
    return nn.get_partition_spec(boxed_abstract_params)


def param_shardings(
    specs: PyTree, mesh: Mesh, rule_name: str = "replicated", shapes: PyTree | None = None
) -> PyTree:
    """NamedShardings for backbone weights from their logical specs.

    A dimension whose size is not divisible by its mesh axis stays replicated
    (e.g. a vocabulary of 32,128 over 3 devices) rather than failing.
    """
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules(rule_name))
    if shapes is None:
        return shardings

    def fit(sh, shape):
        spec = list(sh.spec) + [None] * (len(shape.shape) - len(sh.spec))
        for i, ax in enumerate(spec):
            if ax is None:
                continue
            names = ax if isinstance(ax, tuple) else (ax,)
            size = math.prod(mesh.shape[a] for a in names)
            if shape.shape[i] % size:
                spec[i] = None
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(fit, shardings, shapes)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    sh = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sh), tree)
