"""The train step: one pure function for one run, jitted alone or vmapped over a group of runs.

Frozen state (backbone θ0, frozen head, φ0) and trainable state (φ, or the trained
backbone weights for full fine-tuning, plus optimizer state and step) are separate
arguments; the optimizer only ever sees the trainable part, and the train state is
donated. Compiled steps come from one bounded cache (``compiled_step``): runs that
differ only in data, seed, task or learning rate (the rate is optimizer state) share one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llora_jax import forward
from llora_jax.train import sharding
from llora_jax.train.optim import OptimConfig, make_optimizer
from llora_jax.types import AdapterSpec, TaskModel

PyTree = Any


def make_train_step(
    tm: TaskModel, spec: AdapterSpec, optimizer: optax.GradientTransformation
) -> Callable:
    """step(state, frozen, batch, rng) -> (state, metrics), pure and jittable.

    frozen = {"params": θ0, "head": frozen head, "phi0": φ0}. A non-finite loss
    leaves the state unchanged and is reported in metrics["nonfinite"].
    """

    def loss_fn(trainable, frozen, batch, rng):
        tmx = dataclasses.replace(tm, params=frozen["params"], head=frozen["head"])
        out = forward.forward(tmx, spec, trainable, frozen["phi0"], batch, train=True, rng=rng)
        per_ex = tm.loss(out, batch)
        loss = forward.weighted_mean(per_ex, batch["weight"])
        pred = tm.predict(out, batch)
        acc = forward.weighted_mean((pred == batch["label"]).astype(jnp.float32), batch["weight"])
        return loss, acc

    def step(state, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["trainable"], frozen, batch, rng
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "trainable": keep(trainable, state["trainable"]),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        metrics = {
            "loss": loss,
            "accuracy": acc,
            "grad_norm": optax.tree.norm(grads),
            "nonfinite": (~ok).astype(jnp.int32),
        }
        return new_state, metrics

    return step


def init_state(trainable: PyTree, optimizer: optax.GradientTransformation) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
    }


@dataclasses.dataclass
class StepSetup:
    """What the training loop steps through: state, frozen inputs, the compiled step, batches."""

    state: PyTree
    frozen: dict
    step_fn: Callable
    batches: Any  # an iterator with close()
    rngs: jax.Array
    start: int = 0
    manager: Any = None  # Orbax CheckpointManager of a single run with checkpoints
    positions: Any = None  # stream.Positions of a single run (its data position)


def group_batch_sharding(mesh: Mesh) -> NamedSharding:
    """(R, B, ...) group batches: members unsharded, each member's batch split like a single run's."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))


@functools.lru_cache(maxsize=32)
def compiled_step(
    module: Any,
    readout: Callable,
    loss: Callable,
    predict: Callable,
    spec: AdapterSpec,
    oc: OptimConfig,
    mesh: Mesh,
    group: bool,
) -> Callable:
    """The jitted, donated train step of a task model's functions (single run or vmapped group).

    Bounded (32 programs): a study compiles one step per (method, optimizer shape, mesh).
    ``oc`` must carry learning_rate 0 (the rate is optimizer state). All state and frozen
    inputs are replicated; the FSDP case with sharded backbone weights goes through
    ``sharded_step``.
    """
    tm = TaskModel(module=module, params=None, readout=readout, loss=loss, predict=predict)
    step = make_train_step(tm, spec, make_optimizer(oc))
    repl = sharding.replicated(mesh)
    if group:
        # The backbone is broadcast (one copy for every member); the rest is per member.
        axes = (0, {"params": None, "head": 0, "phi0": 0}, 0, 0)
        return jax.jit(
            jax.vmap(step, in_axes=axes),
            in_shardings=(repl, repl, group_batch_sharding(mesh), repl),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
    return jax.jit(
        step,
        in_shardings=(repl, repl, sharding.batch_sharding(mesh), repl),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


def sharded_step(
    tm: TaskModel,
    spec: AdapterSpec,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: PyTree,
    frozen_shardings: PyTree,
) -> Callable:
    """A single run's step with explicit shardings (FSDP / tensor-parallel backbones; not cached:
    such runs are few and their shardings are trees)."""
    repl = sharding.replicated(mesh)
    return jax.jit(
        make_train_step(tm, spec, optimizer),
        in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh), repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )


def step_for(tm: TaskModel, spec: AdapterSpec, oc: OptimConfig, mesh: Mesh, group: bool):
    """``compiled_step`` keyed by what the program depends on (not the weights or the rate)."""
    return compiled_step(
        tm.module,
        tm.readout,
        tm.loss,
        tm.predict,
        spec,
        dataclasses.replace(oc, learning_rate=0.0),
        mesh,
        group,
    )
