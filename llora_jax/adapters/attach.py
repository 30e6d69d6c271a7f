"""The one mechanism that attaches adapters to any Linen model.

Backbones know nothing about adapters. While a model runs, every call of an
``nn.Dense`` whose module path has an entry in the adapter tree is intercepted
(``flax.linen.intercept_methods``) and the adapter branch is added to its
output. Three modes share the same adapter parameters φ:

* ``lora``:         y = x W0 + g(x; φ)
* ``l_lora``:       y = x W0 + g(x; φ0) + ∂φ g(x; φ0)·(φ − φ0)   (each branch
                    linearized in its own parameters; the paper's L-LoRA)
* ``l_lora_model``: F(φ) = f(φ0) + ∂φ f(φ0)·(φ − φ0)             (the whole
                    model linearized in the adapter parameters)

Interception happens at trace time, so all of this composes with ``jit``,
``grad`` and ``vmap``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llora_jax import tree as tree_lib
from llora_jax.adapters.linearize import linearized_call
from llora_jax.adapters.lora import Scale, adapter_layers, branch, layer_scale

PyTree = Any

MODES = ("lora", "l_lora", "l_lora_model")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown adapter mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def _dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dense_interceptor(
    layer_paths: Collection[str],
    delta_fn: Callable[[str, jax.Array], jax.Array],
    used: set[str],
) -> Callable:
    """An interceptor that adds ``delta_fn(path, x)`` to every adapted ``nn.Dense`` output.

    ``layer_paths`` are module paths ("encoder/layer_0/attention/self/query"); a Dense call
    whose path is among them returns ``y + delta_fn(path, x)`` (x cast to y's dtype), and its
    path is added to ``used`` so that callers can check every adapted layer was reached.
    The single-adapter modes here and the routed (per-example) mode in
    :mod:`llora_jax.adapters.routed` share it.
    """

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
            return next_fun(*args, **kwargs)
        path = "/".join(mod.path)
        if path not in layer_paths:
            return next_fun(*args, **kwargs)
        used.add(path)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        return y + delta_fn(path, x.astype(y.dtype)).astype(y.dtype)

    return interceptor


def apply_intercepted(
    module: nn.Module,
    params: PyTree,
    args: tuple,
    kwargs: dict,
    *,
    interceptor: Callable,
    layer_paths: Collection[str],
    used: set[str],
    method: Any,
    rngs: dict | None,
) -> Any:
    """``module.apply`` under ``interceptor``; a full forward pass must reach every layer."""
    with nn.intercept_methods(interceptor):
        out = module.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)
    missing = sorted(set(layer_paths) - used)
    if missing and (method is None or method == "__call__"):
        # A full forward pass must reach every adapted layer; otherwise the adapter
        # tree does not fit this model (wrong paths) and training would be silently wrong.
        raise ValueError(
            f"{len(missing)} adapter layers were never called by the model, e.g. {missing[:3]}; "
            "the adapter was made for a different backbone or with wrong target paths"
        )
    return out


def _branch_delta(
    phi: PyTree,
    phi0: PyTree | None,
    mode: str,
    scale: Scale,
    dropout: float,
    dropout_rng: jax.Array | None,
) -> tuple[dict, Callable[[str, jax.Array], jax.Array]]:
    layers = adapter_layers(phi)
    layers0 = adapter_layers(phi0) if phi0 is not None else None

    def delta(path: str, x: jax.Array) -> jax.Array:
        layer = layers[path]
        s = layer_scale(scale, path)
        if dropout > 0.0 and dropout_rng is not None:
            # One mask per layer, derived from the path: stable across retraces.
            x = _dropout(x, dropout, jax.random.fold_in(dropout_rng, zlib.crc32(path.encode())))
        if mode == "l_lora":
            layer0 = layers0[path]
            tangent = jax.tree.map(lambda p, p0: p - p0, layer, layer0)
            g0, dg = jax.jvp(lambda p: branch(p, x, s), (layer0,), (tangent,))
            return g0 + dg
        return branch(layer, x, s)

    return layers, delta


def _apply_branchwise(
    module: nn.Module,
    params: PyTree,
    phi: PyTree,
    args: tuple,
    kwargs: dict,
    *,
    mode: str,
    scale: Scale,
    phi0: PyTree | None,
    dropout: float,
    dropout_rng: jax.Array | None,
    method: Any,
    rngs: dict | None,
) -> Any:
    used: set[str] = set()
    layers, delta = _branch_delta(phi, phi0, mode, scale, dropout, dropout_rng)
    return apply_intercepted(
        module,
        params,
        args,
        kwargs,
        interceptor=dense_interceptor(layers, delta, used),
        layer_paths=layers,
        used=used,
        method=method,
        rngs=rngs,
    )


def apply(
    module: nn.Module,
    params: PyTree,
    phi: PyTree,
    *args: Any,
    mode: str = "lora",
    scale: Scale,
    phi0: PyTree | None = None,
    dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    method: Any = None,
    rngs: dict | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``module.apply`` with the adapter φ attached in the given mode.

    ``params`` are the frozen backbone weights, ``phi`` the adapter tree (from
    :func:`llora_jax.adapters.lora.init_lora`), ``phi0`` its linearization
    point (required by ``l_lora`` and ``l_lora_model``). ``scale`` is one float, or
    {module path: s} for adapters whose layers have different ranks or α. Adapter dropout is on
    only when ``dropout > 0`` and ``dropout_rng`` is given. ``rngs`` are the
    backbone's own rngs (e.g. ``{"dropout": key}``); extra positional and keyword
    arguments go to the model.
    """
    check_mode(mode)
    if mode != "lora" and phi0 is None:
        raise ValueError(f"mode {mode!r} needs phi0, the adapter's linearization point")
    common = dict(
        scale=scale,
        dropout=dropout,
        dropout_rng=dropout_rng,
        method=method,
        rngs=rngs,
    )
    if mode in ("lora", "l_lora"):
        return _apply_branchwise(module, params, phi, args, kwargs, mode=mode, phi0=phi0, **common)

    def f(p):
        return _apply_branchwise(module, params, p, args, kwargs, mode="lora", phi0=None, **common)

    return linearized_call(f, phi0, tree_lib.sub(phi, phi0))
