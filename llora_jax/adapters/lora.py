"""LoRA adapter parameters as plain pytrees.

An adapter tree mirrors the backbone's module tree down to each adapted
``nn.Dense`` and holds ``{"A": (in, r), "B": (r, out)}`` there, e.g.
``encoder/layer_0/attention/self/query/A``. The branch of one layer is

    g(x; A, B) = s · (drop(x) A) B,     s = alpha / rank

Initialisation follows HF PEFT: A ~ Kaiming-uniform with a = sqrt(5) on the
(r, in) weight, i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0 (or, as an option,
small Gaussian values so that the linearization point has B0 != 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from llora_jax import tree as tree_lib

PyTree = Any

ADAPTER_LEAVES = ("A", "B")

# A LoRA scale s: one float for every layer, or {module path: s} when layers differ (adapters
# imported from PEFT with rank_pattern / alpha_pattern).
Scale = float | Mapping[str, float]


def layer_scale(scale: Scale, path: str) -> float:
    """The scale of the layer at module ``path`` (``scale`` is one float or a per-layer map)."""
    if not isinstance(scale, Mapping):
        return scale
    if path not in scale:
        raise ValueError(f"per-layer LoRA scales have no entry for layer {path!r}")
    return scale[path]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What a LoRA adapter is. Everything here goes into task-vector metadata."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    # "zero": B0 = 0 (HF PEFT default). "normal": B0 ~ N(0, b0_std^2), for studying
    # a linearization point where the adapter is already active.
    init_b: str = "zero"
    b0_std: float = 0.02
    # "shared": A0 from the run's seed (every task of a seed starts from one A0).
    # "per_task": the seed's key folded with a stable hash of the task name
    # (``forward.init_key``), so each task writes into its own input subspace; such task
    # vectors live in different bases and merge only as dense ΔW (``fusion.weight_space``).
    a0: str = "shared"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init_b not in ("zero", "normal"):
            raise ValueError(f"init_b must be 'zero' or 'normal', got {self.init_b!r}")
        if self.a0 not in ("shared", "per_task"):
            raise ValueError(f"a0 must be 'shared' or 'per_task', got {self.a0!r}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}


def target_modules(params: PyTree, targets: Sequence[str]) -> list[str]:
    """Module paths ("a/b/query") of the dense kernels that ``targets`` select.

    Patterns are matched (``re.search``) against kernel paths such as
    ``encoder/layer_0/attention/self/query/kernel``; a pattern with no match
    raises, listing the available kernels. Only 2-D ``kernel`` leaves (dense
    layers) can be adapted.
    """
    if not targets:
        raise ValueError(
            "LoRA needs at least one target regex (e.g. the backbone's DEFAULT_LORA_TARGETS)"
        )
    flat = tree_lib.flatten(params)
    kernels = [n for n, v in flat.items() if n.endswith("/kernel") and jnp.ndim(v) == 2]
    chosen = tree_lib.select_paths(kernels, targets)
    return [n[: -len("/kernel")] for n in chosen]


def init_lora(key: jax.Array, params: PyTree, cfg: LoraConfig) -> PyTree:
    """φ0: a nested dict {module path...: {"A", "B"}} for every targeted dense layer."""
    flat = tree_lib.flatten(params)
    out: dict[str, jax.Array] = {}
    for i, mod in enumerate(target_modules(params, cfg.targets)):
        kernel = flat[mod + "/kernel"]
        d_in, d_out = kernel.shape
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(ka, (d_in, cfg.rank), jnp.float32, -bound, bound)
        if cfg.init_b == "zero":
            b = jnp.zeros((cfg.rank, d_out), jnp.float32)
        else:
            b = cfg.b0_std * jax.random.normal(kb, (cfg.rank, d_out), jnp.float32)
        out[mod + "/A"] = a
        out[mod + "/B"] = b
    return tree_lib.unflatten(out)


def branch(layer: PyTree, x: jax.Array, scale: float) -> jax.Array:
    """g(x; A, B) = s · (x A) B for one layer (dropout is applied to x by the caller)."""
    a = layer["A"].astype(x.dtype)
    b = layer["B"].astype(x.dtype)
    return scale * ((x @ a) @ b)


def layer_delta_w(layer: PyTree, scale: float) -> jax.Array:
    """ΔW = s · A B of one layer, in the kernel's (in, out) orientation."""
    return scale * (layer["A"].astype(jnp.float32) @ layer["B"].astype(jnp.float32))


def adapter_layers(phi: PyTree) -> dict[str, PyTree]:
    """{module path: {"A", "B"}} view of a nested adapter tree."""
    flat = tree_lib.flatten(phi)
    mods = sorted({n.rsplit("/", 1)[0] for n in flat})
    return {m: {leaf: flat[f"{m}/{leaf}"] for leaf in ADAPTER_LEAVES} for m in mods}


def delta_w(phi: PyTree, scale: Scale, phi0: PyTree | None = None, mode: str = "lora") -> dict:
    """Per-layer weight change that the adapter applies, {module path: ΔW}.

    ``lora``: s·A B. ``l_lora`` (per-branch linearization around φ0) is linear in
    φ: s·[A0 B0 + A0 (B − B0) + (A − A0) B0]. ``l_lora_model`` linearizes the
    whole network, which is not a weight change, so it has no ΔW.
    """
    layers = adapter_layers(phi)
    if mode == "lora":
        return {m: layer_delta_w(lay, layer_scale(scale, m)) for m, lay in layers.items()}
    if mode == "l_lora":
        if phi0 is None:
            raise ValueError("l_lora's ΔW needs phi0 (the linearization point)")
        layers0 = adapter_layers(phi0)
        out = {}
        for m, lay in layers.items():
            a0 = layers0[m]["A"].astype(jnp.float32)
            b0 = layers0[m]["B"].astype(jnp.float32)
            a = lay["A"].astype(jnp.float32)
            b = lay["B"].astype(jnp.float32)
            out[m] = layer_scale(scale, m) * (a0 @ b0 + a0 @ (b - b0) + (a - a0) @ b0)
        return out
    raise ValueError(
        f"mode {mode!r} has no weight-space merge; only 'lora' and 'l_lora' adapters can be "
        "merged into dense weights ('l_lora_model' linearizes the whole network)"
    )


def merge_into_params(
    params: PyTree, phi: PyTree, scale: Scale, phi0: PyTree | None = None, mode: str = "lora"
) -> PyTree:
    """Backbone params with each adapted kernel replaced by W0 + ΔW (export / fast inference)."""
    flat = dict(tree_lib.flatten(params))
    for mod, dw in delta_w(phi, scale, phi0, mode).items():
        key = mod + "/kernel"
        if key not in flat:
            raise ValueError(f"adapter layer {mod!r} has no kernel {key!r} in the backbone params")
        w = flat[key]
        flat[key] = (w.astype(jnp.float32) + dw).astype(w.dtype)
    return tree_lib.unflatten(flat)
