"""A frozen backbone + a readout = a task model that any fine-tuning method drives.

The readout turns backbone calls into task outputs (class logits, label-word
scores, token logits). It receives ``call``, a function that runs the backbone
with whatever weights or adapter the method uses, so the same readout serves
full fine-tuning, LoRA, L-LoRA and the whole-model linearization:

* ``full``:         call runs the module on the trainable copy of θ
* ``lora``/``l_lora``: call runs the frozen θ0 with the adapter attached
* ``l_lora_model``: the whole readout is linearized in φ around φ0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llora_jax import adapters as ad
from llora_jax import tree as T

PyTree = Any

METHODS = ("full", "lora", "l_lora", "l_lora_model")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(
            f"unknown fine-tuning method {method!r}; valid methods: {', '.join(METHODS)}"
        )
    return method


@dataclasses.dataclass(frozen=True)
class TaskModel:
    """Everything about a model for one task that is not trained.

    readout(call, batch, head, train) -> outputs (a dict; "logits" for classification)
    loss(outputs, batch) -> per-example loss, shape (B,)
    predict(outputs, batch) -> per-example predictions, shape (B,)
    """

    module: nn.Module
    params: PyTree
    readout: Callable[..., dict]
    loss: Callable[[dict, dict], jax.Array]
    predict: Callable[[dict, dict], jax.Array]
    head: PyTree = None
    base_model: str = "unknown"
    # Restrict full fine-tuning to these parameter paths (regexes); () = all.
    full_ft_targets: tuple[str, ...] = ()
    # The readout also takes packed batches (``llora_jax.packing``: several inputs per
    # row, predictions shaped like the batch's slots); evaluation then packs token inputs.
    packable: bool = False


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """How the trainable part is attached."""

    method: str = "lora"
    lora: ad.LoraConfig = ad.LoraConfig()

    @property
    def mode(self) -> str:
        return self.method


def forward(
    tm: TaskModel,
    spec: AdapterSpec,
    trainable: PyTree,
    phi0: PyTree | None,
    batch: dict,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
) -> dict:
    """Outputs of the task model with the trainable state of ``spec.method``.

    For ``full`` the trainable state is the (sub)tree of backbone weights that
    trains, merged over the frozen ones; for the LoRA methods it is φ.
    """
    method = check_method(spec.method)
    rngs = None
    lora_rng = None
    if train and rng is not None:
        k1, lora_rng = jax.random.split(rng)
        rngs = {"dropout": k1}
    kwargs = {"rngs": rngs} if rngs else {}

    if method == "full":
        params = merge_full(tm.params, trainable)

        def call(*args, **kw):
            return tm.module.apply({"params": params}, *args, **kwargs, **kw)

        return tm.readout(call, batch, tm.head, train)

    cfg = spec.lora

    def with_adapter(phi, mode):
        def call(*args, **kw):
            return ad.apply(
                tm.module,
                tm.params,
                phi,
                *args,
                mode=mode,
                phi0=phi0,
                scale=cfg.scale,
                dropout=cfg.dropout if train else 0.0,
                dropout_rng=lora_rng,
                **kwargs,
                **kw,
            )

        return tm.readout(call, batch, tm.head, train)

    if method in ("lora", "l_lora"):
        return with_adapter(trainable, method)
    return ad.linearized_call(lambda p: with_adapter(p, "lora"), phi0, T.sub(trainable, phi0))


def functions_key(tm: TaskModel, spec: AdapterSpec) -> tuple:
    """What a compiled program of this task model depends on besides its arguments.

    Weights and heads are passed as arguments, so task models that share these
    functions (e.g. every task of one sentence encoder) can share compiled programs.
    """
    return (tm.module, tm.readout, tm.loss, tm.predict, spec)


def full_trainable(tm: TaskModel) -> PyTree:
    """The backbone weights that full fine-tuning trains (all, or those matching full_ft_targets)."""
    if not tm.full_ft_targets:
        return tm.params
    return T.unflatten(T.select(tm.params, tm.full_ft_targets))


def merge_full(params: PyTree, trainable: PyTree) -> PyTree:
    flat = dict(T.flatten(params))
    flat.update(T.flatten(trainable))
    return T.unflatten(flat)


def init_trainable(
    tm: TaskModel, spec: AdapterSpec, key: jax.Array
) -> tuple[PyTree, PyTree | None]:
    """(initial trainable state, φ0). For ``full`` φ0 is None (the start is θ0 itself)."""
    if check_method(spec.method) == "full":
        return full_trainable(tm), None
    phi0 = ad.init_lora(key, tm.params, spec.lora)
    return phi0, phi0


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    w = weight.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_loss(outputs: dict, batch: dict) -> jax.Array:
    logits = outputs["logits"].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def argmax_predict(outputs: dict, batch: dict) -> jax.Array:
    return jnp.argmax(outputs["logits"], axis=-1)
