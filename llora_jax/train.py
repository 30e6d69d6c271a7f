"""Sharded fine-tuning: one jitted step, a resumable loop, task-vector export.

Frozen state (backbone θ0, frozen head, φ0) and trainable state (φ, or the
trained backbone weights for full fine-tuning, plus optimizer state and step)
are separate arguments; the optimizer only ever sees the trainable part, and
the train state is donated. Batches come from ``data.batches`` (a seeded
permutation per epoch, resumable at any step), so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from llora_jax import model as M
from llora_jax import sharding as S
from llora_jax import task_vectors as tv
from llora_jax import tree as T
from llora_jax.errors import UserError

PyTree = Any


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # "adamw" | "adam" | "sgd"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" (warm-up + cosine decay) | "constant" (warm-up + constant)
    warmup_steps: int = 0
    total_steps: int = 100
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    b1: float = 0.9
    b2: float = 0.999


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """The configured optimizer; its learning rate lives in the optimizer state.

    The schedule's shape (warm-up, cosine/constant) is built with peak 1 and the rate is
    an injected hyper-parameter, so runs that differ only in learning rate (a sweep)
    share one compiled train step. Equals optax.adamw/adam/sgd with the scheduled rate.
    """
    if oc.warmup_steps >= oc.total_steps and oc.warmup_steps > 0:
        raise ValueError(
            f"warmup_steps ({oc.warmup_steps}) must be smaller than the number of steps "
            f"({oc.total_steps})"
        )
    warmup, total = max(oc.warmup_steps, 0), max(oc.total_steps, 1)
    if oc.schedule == "cosine":
        shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total, 0.0)
    elif oc.schedule == "constant":
        shape = (
            optax.join_schedules(
                [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)],
                [warmup],
            )
            if warmup > 0
            else optax.constant_schedule(1.0)
        )
    else:
        raise ValueError(f"unknown schedule {oc.schedule!r}; valid: cosine, constant")
    if oc.optimizer == "adamw":
        core = [
            optax.scale_by_adam(b1=oc.b1, b2=oc.b2),
            optax.add_decayed_weights(oc.weight_decay),
        ]
    elif oc.optimizer == "adam":
        core = [optax.scale_by_adam(b1=oc.b1, b2=oc.b2)]
    elif oc.optimizer == "sgd":
        core = []
    else:
        raise ValueError(f"unknown optimizer {oc.optimizer!r}; valid: adamw, adam, sgd")
    clip = [optax.clip_by_global_norm(oc.clip_norm)] if oc.clip_norm else []
    rate = optax.inject_hyperparams(optax.scale)(step_size=-float(oc.learning_rate))
    opt = optax.chain(*clip, *core, optax.scale_by_schedule(shape), rate)
    if oc.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=oc.grad_accum)
    return opt


# ----------------------------------------------------------------------------- step


def make_train_step(
    tm: M.TaskModel, spec: M.AdapterSpec, optimizer: optax.GradientTransformation
) -> Callable:
    """step(state, frozen, batch, rng) -> (state, metrics), pure and jittable.

    frozen = {"params": θ0, "head": frozen head, "phi0": φ0}. A non-finite loss
    leaves the state unchanged and is reported in metrics["nonfinite"].
    """

    def loss_fn(trainable, frozen, batch, rng):
        tmx = dataclasses.replace(tm, params=frozen["params"], head=frozen["head"])
        out = M.forward(tmx, spec, trainable, frozen["phi0"], batch, train=True, rng=rng)
        per_ex = tm.loss(out, batch)
        loss = M.weighted_mean(per_ex, batch["weight"])
        pred = tm.predict(out, batch)
        acc = M.weighted_mean((pred == batch["label"]).astype(jnp.float32), batch["weight"])
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


# ----------------------------------------------------------------------------- loop


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    total_steps: int = 100
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 50  # 0 = no checkpoints (short runs whose task vector is the result)
    keep_checkpoints: int = 2
    progress: bool = True
    # PRNG behind dropout: "rbg" compiles far faster than "threefry" (a T5-base step: most
    # of its compile time was threefry's dropout bits), with the same statistics.
    rng_impl: str = "rbg"
    tensorboard: bool = True  # event files under <workdir>/tensorboard beside metrics.jsonl


_STEPS: dict = {}


def _ckpt_manager(workdir: Path, lc: LoopConfig):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(
        max_to_keep=lc.keep_checkpoints, save_interval_steps=1, create=True
    )
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=opts)


def finetune(
    tm: M.TaskModel,
    spec: M.AdapterSpec,
    oc: OptimConfig,
    lc: LoopConfig,
    train_arrays: dict[str, np.ndarray],
    workdir: str | os.PathLike,
    *,
    evaluate: Callable[[PyTree, PyTree], dict] | None = None,
    final_eval: Callable[[PyTree, PyTree], dict] | None = None,
    meta: dict | None = None,
    mesh: Mesh | None = None,
    frozen_shardings: PyTree | None = None,
) -> dict:
    """Fine-tune, resuming from ``workdir/checkpoints`` if present; export the task vector.

    ``evaluate(trainable, phi0)`` returns validation metrics (called every
    ``eval_every`` steps); ``final_eval`` returns the final {"val/...": ...,
    "test/...": ...} written to ``workdir/metrics.json`` and the task vector's meta.
    Returns that final metrics dict.
    """
    import orbax.checkpoint as ocp

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or S.make_mesh()
    optimizer = make_optimizer(dataclasses.replace(oc, total_steps=lc.total_steps))
    trainable0, phi0 = M.init_trainable(tm, spec, jax.random.key(lc.seed))
    repl = S.replicated(mesh)
    frozen = {"params": tm.params, "head": tm.head, "phi0": phi0}
    frozen_sh = {
        "params": frozen_shardings
        if frozen_shardings is not None
        else jax.tree.map(lambda _: repl, tm.params),
        "head": jax.tree.map(lambda _: repl, tm.head),
        "phi0": jax.tree.map(lambda _: repl, phi0),
    }
    frozen = jax.device_put(frozen, frozen_sh)
    state_shape = jax.eval_shape(lambda t: init_state(t, optimizer), trainable0)
    state_sh = jax.tree.map(lambda _: repl, state_shape)
    if spec.method == "full" and frozen_shardings is not None:
        trainable_sh = T.unflatten(
            {n: T.flatten(frozen_sh["params"])[n] for n in T.flatten(trainable0)}
        )
        state_sh = {
            "step": repl,
            "trainable": trainable_sh,
            "opt_state": jax.tree.map(lambda _: repl, state_shape["opt_state"]),
        }
    # Runs that differ only in data, seed, task or learning rate (same model functions,
    # optimizer and mesh; the rate is optimizer state) share one jitted step.
    oc_key = dataclasses.replace(oc, learning_rate=0.0)
    key = (*M.functions_key(tm, spec), oc_key, lc.total_steps, mesh, frozen_shardings is None)
    step_fn = _STEPS.get(key)
    if step_fn is None:
        step_fn = _STEPS[key] = jax.jit(
            make_train_step(tm, spec, optimizer),
            in_shardings=(state_sh, frozen_sh, S.batch_sharding(mesh), repl),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )

    mngr = _ckpt_manager(workdir, lc)
    start = mngr.latest_step()
    if start is None:
        state = jax.jit(lambda t: init_state(t, optimizer), out_shardings=state_sh)(trainable0)
        start = 0
    else:
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, state_sh
        )
        state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
    from llora_jax import data

    # Seeded per-epoch permutations, this process's slice of every global batch, resumable
    # at any step; batches are moved to the devices in a background thread.
    batches = data.prefetch_to_device(
        data.batches(train_arrays, lc.batch_size, seed=lc.seed, epochs=None, start_step=start),
        size=2,
        sharding=S.batch_sharding(mesh),
    )
    rng = jax.random.key(lc.seed + 1, impl=lc.rng_impl)
    from llora_jax.metrics_log import MetricsLog

    log = MetricsLog(workdir, tensorboard=lc.tensorboard, enabled=jax.process_index() == 0)

    bar = None
    if lc.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=lc.total_steps, initial=start, desc=f"{spec.method}", unit="step")
    t0, n0 = time.perf_counter(), start
    try:
        for step in range(start, lc.total_steps):
            batch = next(batches)
            state, metrics = step_fn(state, frozen, batch, rng)
            done = step + 1
            last = done == lc.total_steps
            ckpt = lc.ckpt_every > 0 and (done % lc.ckpt_every == 0 or last)
            if done % lc.log_every == 0 or last or ckpt:
                m = jax.device_get(metrics)
                if int(m["nonfinite"]):
                    raise TrainingDiverged(
                        f"non-finite loss or gradient at step {done} (loss={float(m['loss'])}); "
                        + (
                            f"the last good checkpoint is kept in {workdir / 'checkpoints'}. "
                            if lc.ckpt_every > 0
                            else "checkpoints are off (ckpt_every=0). "
                        )
                        + "Lower the learning rate or enable gradient clipping."
                    )
                dt = time.perf_counter() - t0
                rate = (done - n0) * lc.batch_size / max(dt, 1e-9)
                row = {"step": done, **{k: float(v) for k, v in m.items()}, "examples_per_s": rate}
                log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{rate:.0f}")
            if evaluate and lc.eval_every and done % lc.eval_every == 0 and not last:
                vm = evaluate(state["trainable"], phi0)
                log.write({"step": done, **vm})
            if ckpt:
                mngr.save(done, args=ocp.args.StandardSave(state))
            if bar is not None:
                bar.update(1)
    finally:
        batches.close()  # stops the prefetch thread
        log.close()
        if bar is not None:
            bar.close()
        mngr.wait_until_finished()
        mngr.close()

    trainable = state["trainable"]
    metrics = final_eval(trainable, phi0) if final_eval else {}
    tau = T.sub(trainable, trainable0 if spec.method == "full" else phi0)
    tau = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tau)
    if jax.process_index() == 0:
        _export(workdir, tm, spec, tau, phi0, metrics, lc, meta or {})
    return metrics


def _export(workdir, tm, spec, tau, phi0, metrics, lc, meta, base_fingerprint=None) -> None:
    """Write the task vector and metrics.json. ``base_fingerprint``: T.fingerprint(tm.params)
    if already known (a group exports many runs of one backbone; hashing it takes ~0.1 s)."""
    cfg = spec.lora
    is_full = spec.method == "full"
    fields = dict(
        base_model=tm.base_model,
        base_fingerprint=base_fingerprint or T.fingerprint(tm.params),
        adapter_kind="full" if is_full else "lora",
        mode=spec.method,
        task=meta.pop("task", "unknown"),
        seed=lc.seed,
        steps=lc.total_steps,
        targets=list(tm.full_ft_targets) if is_full else list(cfg.targets),
        rank=None if is_full else cfg.rank,
        alpha=None if is_full else cfg.alpha,
        metrics=metrics,
    )
    full_meta = tv.make_meta(**fields, **meta)
    phi0_host = (
        None if phi0 is None else jax.tree.map(lambda x: np.asarray(jax.device_get(x)), phi0)
    )
    tv.save(workdir / "task_vector", tau, full_meta, phi0=phi0_host, overwrite=True)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
