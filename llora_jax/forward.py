"""The forward pass of a task model under each fine-tuning method.

The readout (``types.TaskModel``) turns backbone calls into task outputs (class logits, label-word
scores, token logits). It receives ``call``, a function that runs the backbone
with whatever weights or adapter the method uses, so the same readout serves
full fine-tuning, LoRA, L-LoRA and the whole-model linearization:

* ``full``:         call runs the module on the trainable copy of θ
* ``lora``/``l_lora``: call runs the frozen θ0 with the adapter attached
* ``l_lora_model``: the whole readout is linearized in φ around φ0
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llora_jax import adapters
from llora_jax import tree as tree_lib
from llora_jax.types import AdapterSpec, TaskModel, check_method

PyTree = Any


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
            return adapters.apply(
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
    return adapters.linearized_call(
        lambda p: with_adapter(p, "lora"), phi0, tree_lib.sub(trainable, phi0)
    )


def full_trainable(tm: TaskModel) -> PyTree:
    """The backbone weights that full fine-tuning trains (all, or those matching full_ft_targets)."""
    if not tm.full_ft_targets:
        return tm.params
    return tree_lib.unflatten(tree_lib.select(tm.params, tm.full_ft_targets))


def merge_full(params: PyTree, trainable: PyTree) -> PyTree:
    flat = dict(tree_lib.flatten(params))
    flat.update(tree_lib.flatten(trainable))
    return tree_lib.unflatten(flat)


def init_trainable(
    tm: TaskModel, spec: AdapterSpec, key: jax.Array
) -> tuple[PyTree, PyTree | None]:
    """(initial trainable state, φ0). For ``full`` φ0 is None (the start is θ0 itself)."""
    if check_method(spec.method) == "full":
        return full_trainable(tm), None
    phi0 = adapters.init_lora(key, tm.params, spec.lora)
    return phi0, phi0


def init_key(seed: int, task: str | None, spec: AdapterSpec) -> jax.Array:
    """The key a run's adapter is initialised from: ``key(seed)``, folded with the CRC-32 of
    the task name when ``spec.lora.a0 == "per_task"`` (stable across processes and
    machines, unlike ``hash``), so each task of a seed gets its own A0."""
    key = jax.random.key(int(seed))
    if spec.method == "full" or spec.lora.a0 == "shared":
        return key
    if not task:
        raise ValueError("a per-task A0 (lora.a0='per_task') needs the run's task name")
    # 31 bits: fold_in takes a 32-bit integer.
    return jax.random.fold_in(key, zlib.crc32(task.encode()) & 0x7FFFFFFF)


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    w = weight.astype(jnp.float32)
    return jnp.sum(values.astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_loss(outputs: dict, batch: dict) -> jax.Array:
    logits = outputs["logits"].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def argmax_predict(outputs: dict, batch: dict) -> jax.Array:
    return jnp.argmax(outputs["logits"], axis=-1)
