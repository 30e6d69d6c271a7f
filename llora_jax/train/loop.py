"""ONE training loop for one run or a group of runs; resumable; exports task vectors.

A run (``Run``) is what differs between runs of one method: workdir, seed, learning
rate, head, training data, evaluation callbacks and metadata. ``fit`` trains R runs:

* R = 1 (``group=False``): the plain jitted step, Orbax checkpoints (train state and
  data position, ``state_io``) every ``ckpt_every`` steps at healthy steps, resumed from
  the newest valid one in ``workdir/checkpoints``, so a resumed run sees exactly the
  batches it would have seen: arrays are seeded permutations indexed by step; a
  streaming source (``Run.batches``, e.g. ``data.streaming.make_batch_iterator``) has
  its ``get_state()`` saved and restored. Backbone weights may be sharded
  (``frozen_shardings``).
* R > 1 (or ``group=True``): the step vmapped over (train state, head, φ0, batch,
  dropout key) with the backbone broadcast (``group``), no mid-run checkpoints (a study
  resumes a group run by run, skipping members whose task vector exists).

Both share the run records and workdir locks (``resume``), the mesh, logging
(metrics.jsonl + TensorBoard), progress bar, health guard (``guard``) and export
(``export.export_run``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from llora_jax import data, forward
from llora_jax import tree as tree_lib
from llora_jax.errors import UserError
from llora_jax.fusion.frozen_cores import freeze
from llora_jax.train import group, resume, run_dir, sharding, state_io, step
from llora_jax.train.export import export_run
from llora_jax.train.guard import Guard, Interval, TrainingDiverged
from llora_jax.train.health import HealthRule
from llora_jax.train.metrics_log import MetricsLog
from llora_jax.train.optim import OptimConfig, make_optimizer
from llora_jax.train.stream import Positions
from llora_jax.types import AdapterSpec, TaskModel

PyTree = Any


__all__ = ["LoopConfig", "Run", "TrainingDiverged", "finetune", "fit"]


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
    health: HealthRule = HealthRule()  # when a step is healthy / the run diverged


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One run: what differs from the other runs of a ``fit`` call.

    ``head``: this task's head (every run's head has the same shapes).
    ``evaluate(trainable, phi0)``: validation metrics every ``eval_every`` steps;
    ``final_eval(trainable, phi0)``: the final {"val/...": ..., "test/...": ...} written to
    ``metrics.json`` and the task vector's meta. ``meta``: extra task-vector metadata
    (names the "task").

    Training data: ``train_arrays`` (equal-length arrays, batched by ``data.batches``) or
    ``batches``, a streaming source with ``get_state()`` / ``set_state()`` (e.g.
    ``data.streaming.make_batch_iterator(..., num_epochs=None)``; single runs only).
    Provenance for ``run.json``: ``config`` (the run's config as a nested dict; default:
    the loop's own settings in the config's field names) and ``data_fingerprint`` (the
    task's ``task_fingerprint`` digest; default: a hash of ``train_arrays``). ``files``:
    {name: text} written into the workdir once it is claimed (e.g. ``config.json``).
    """

    workdir: str | os.PathLike
    seed: int
    learning_rate: float
    head: PyTree
    train_arrays: dict[str, np.ndarray] | None
    final_eval: Callable[[PyTree, PyTree], dict] | None = None
    evaluate: Callable[[PyTree, PyTree], dict] | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    batches: Any = None
    config: Mapping[str, Any] | None = None
    data_fingerprint: str | None = None
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # (batch_size, start_step) -> host batches resumable by step, instead of seeded epochs
    # of train_arrays (e.g. ``data.mixture.mixture_batches`` for a multi-task run).
    batch_fn: Callable[[int, int], Any] | None = None
    # Start from this trainable state instead of the initialisation (φ0 stays the
    # initialisation's: τ is exported relative to it), e.g. a fused adapter φ0 + τ_merged.
    start: PyTree | None = None
    # Boolean tree shaped like the trainable state: elements held fixed bit for bit
    # (``fusion.frozen_cores.freeze``), e.g. every task's core region. One run at a time.
    frozen: PyTree | None = None

    def __post_init__(self) -> None:
        # train_arrays may come with batch_fn (then only the data fingerprint reads them).
        if self.batches is not None and (self.batch_fn is not None or self.train_arrays):
            raise ValueError(f"Run {self.workdir}: a streaming source (batches) comes alone")
        if self.train_arrays is None and self.batches is None and self.batch_fn is None:
            raise ValueError(f"Run {self.workdir}: give train_arrays, batches or batch_fn")


def finetune(
    tm: TaskModel,
    spec: AdapterSpec,
    oc: OptimConfig,
    lc: LoopConfig,
    train_arrays: dict[str, np.ndarray] | None,
    workdir: str | os.PathLike,
    *,
    evaluate: Callable[[PyTree, PyTree], dict] | None = None,
    final_eval: Callable[[PyTree, PyTree], dict] | None = None,
    meta: dict | None = None,
    mesh: Mesh | None = None,
    frozen_shardings: PyTree | None = None,
    restart: bool = False,
    **run_fields: Any,
) -> dict:
    """Fine-tune one run (``fit`` with R = 1); returns its final metrics.

    ``run_fields``: the other ``Run`` fields (``batches``, ``config``, ``data_fingerprint``,
    ``files``)."""
    run = Run(
        workdir=workdir,
        seed=lc.seed,
        learning_rate=oc.learning_rate,
        head=tm.head,
        train_arrays=train_arrays,
        final_eval=final_eval,
        evaluate=evaluate,
        meta=dict(meta or {}),
        **run_fields,
    )
    return fit(
        tm, spec, oc, lc, [run], mesh=mesh, frozen_shardings=frozen_shardings, restart=restart
    )[0]


def fit(
    tm: TaskModel,
    spec: AdapterSpec,
    oc: OptimConfig,
    lc: LoopConfig,
    runs: Sequence[Run],
    *,
    mesh: Mesh | None = None,
    frozen_shardings: PyTree | None = None,
    group_step: bool | None = None,
    restart: bool = False,
) -> list[dict]:
    """Fine-tune every run; export each run's task vector and metrics.json.

    ``tm`` gives the shared frozen part (module, backbone weights, readout, loss,
    predict; its head is unused: every run brings one). ``oc.learning_rate`` and
    ``lc.seed`` are ignored (each run brings its own); everything else is shared.
    ``group_step``: vmap the step over the runs (default: when there is more than one).
    ``restart``: move each workdir's old run aside and start over (``--restart``).

    Before the first step, process 0 locks every workdir for the whole call, refuses to
    resume a workdir recorded with other result-determining fields (``run.json``), and
    records this run's (``resume.claim``). A single run resumes from its newest valid
    checkpoint (state and data position); checkpoints are saved only at healthy steps
    and a divergence raises ``TrainingDiverged`` (``guard``).

    Dropout in a group: run r's key is ``jax.random.key(seed_r + 1, impl=lc.rng_impl)`` as
    in its single run. Under vmap a threefry key draws exactly its single run's bits; an
    rbg key does not (jax batches ``rng_bit_generator`` by drawing the whole (R, ...) block
    from the first member's key), so members get distinct, independent dropout masks that
    depend on their group. With dropout off (or threefry keys) a group reproduces the
    single runs up to float rounding (tests/train/test_group.py).
    Returns every run's final metrics, in order.
    """
    group.check_runs(runs)
    stacked = len(runs) > 1 if group_step is None else group_step
    if stacked and any(_trains_alone(r) for r in runs):
        raise ValueError(
            "fit: a run with its own batch source (batches, batch_fn), start or frozen "
            "elements trains alone (group_step=False)"
        )
    if stacked and frozen_shardings is not None:
        raise ValueError("fit: sharded backbone weights (frozen_shardings) need one run at a time")
    dirs = [Path(r.workdir).absolute() for r in runs]
    main = jax.process_index() == 0
    backbone = resume.backbone_fingerprint(tm.params) if main else None
    fields = [_run_fields(spec, oc, lc, r, backbone) if main else {} for r in runs]
    with resume.claim(dirs, fields, [r.files for r in runs], restart=restart, main=main):
        return _fit_claimed(tm, spec, oc, lc, runs, dirs, stacked, mesh, frozen_shardings, backbone)


def _trains_alone(run: Run) -> bool:
    """A run with its own batch source, start or frozen elements has its own program."""
    return any(x is not None for x in (run.batches, run.batch_fn, run.start, run.frozen))


def _run_fields(spec, oc, lc, run: Run, backbone: str | None) -> dict:
    config = run.config
    if config is None:
        config = resume.loop_fields(spec, oc, lc, run.seed, run.learning_rate)
    data_fp = run.data_fingerprint or resume.arrays_fingerprint(run.train_arrays)
    return run_dir.run_fields(config, backbone_fingerprint=backbone, data_fingerprint=data_fp)


def _fit_claimed(tm, spec, oc, lc, runs, dirs, stacked, mesh, frozen_shardings, backbone):
    mesh = mesh or sharding.make_mesh()
    oc = dataclasses.replace(oc, total_steps=lc.total_steps)
    starts = [
        forward.init_trainable(tm, spec, forward.init_key(r.seed, r.meta.get("task"), spec))
        for r in runs
    ]
    starts = [(r.start, p0) if r.start is not None else (t, p0) for r, (t, p0) in zip(runs, starts)]
    phi0s = [phi0 for _, phi0 in starts]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    if stacked:
        setup = group.setup(tm, spec, oc, lc, runs, starts, mesh)
    else:
        setup = _single_setup(tm, spec, oc, lc, runs[0], starts[0], mesh, frozen_shardings)
    state, start = setup.state, setup.start
    main = jax.process_index() == 0
    if main:
        for d in dirs:
            resume.truncate_metrics(d, start)  # rows after the checkpoint are written again
    logs = [MetricsLog(d, tensorboard=lc.tensorboard, enabled=main) for d in dirs]
    guard = Guard(lc.health, dirs, [r.learning_rate for r in runs], start)
    interval = Interval()
    bar = None
    if lc.progress and main:
        label = spec.method if len(runs) == 1 else f"{spec.method} ×{len(runs)}"
        bar = tqdm(total=lc.total_steps, initial=start, desc=label, unit="step")
    t0, n0 = time.perf_counter(), start
    try:
        for done in range(start + 1, lc.total_steps + 1):
            state, metrics = setup.step_fn(state, setup.frozen, next(setup.batches), setup.rngs)
            if setup.positions is not None:
                setup.positions.consumed()
            interval.add(metrics)
            last = done == lc.total_steps
            ckpt = setup.manager is not None and (done % lc.ckpt_every == 0 or last)
            if done % lc.log_every == 0 or last or ckpt:
                m = jax.device_get(metrics)
                m = m if stacked else {k: np.asarray(v)[None] for k, v in m.items()}
                seen = jax.device_get(interval.take())
                guard.check(done, m, seen, state["trainable"], stacked)
                # Each run's own throughput (a group processes R times as many).
                rate = (done - n0) * lc.batch_size / max(time.perf_counter() - t0, 1e-9)
                for i, log in enumerate(logs):
                    row = {k: float(v[i]) for k, v in m.items()}
                    row["grad_norm_max"] = float(np.atleast_1d(seen["grad_norm_max"])[i])
                    log.write({"step": done, **row, "examples_per_s": rate})
                if bar is not None:
                    loss = float(np.mean(m["loss"]))
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{len(runs) * rate:.0f}")
            if lc.eval_every and done % lc.eval_every == 0 and not last:
                for i, run in enumerate(runs):
                    if run.evaluate is not None:
                        trainable = _trainable(state, i, stacked)
                        logs[i].write({"step": done, **run.evaluate(trainable, phi0s[i])})
            if ckpt and guard.all_healthy:  # never keep an unhealthy state as "last good"
                state_io.save(setup.manager, done, state, setup.positions.state())
                guard.last_checkpoint = done
            if bar is not None:
                bar.update(1)
    finally:
        setup.batches.close()  # stops the prefetch thread
        for log in logs:
            log.close()
        if bar is not None:
            bar.close()
        if setup.manager is not None:
            setup.manager.wait_until_finished()
            setup.manager.close()
    skipped = setup.positions.skipped if setup.positions is not None else None
    return _finish(tm, spec, lc, runs, state, starts, dirs, stacked, backbone, skipped)


def _trainable(state: dict, i: int, stacked: bool) -> PyTree:
    return group.take(state["trainable"], i) if stacked else state["trainable"]


def _finish(tm, spec, lc, runs, state, starts, dirs, stacked, backbone, skipped) -> list[dict]:
    """Final evaluation and export of every run (τ = φ − φ0; full: θ − θ0 of the trained part).

    ``skipped``: corrupt images a streaming source skipped (into metrics.json)."""
    main = jax.process_index() == 0
    results = []
    for i, run in enumerate(runs):
        trainable = _trainable(state, i, stacked)
        start, phi0 = starts[i]
        metrics = run.final_eval(trainable, phi0) if run.final_eval else {}
        if skipped is not None:
            metrics = {**metrics, "data/skipped_corrupt": skipped}
        tau = tree_lib.sub(trainable, start if spec.method == "full" else phi0)
        if main:
            export_run(
                dirs[i],
                tm,
                spec,
                tau,
                phi0,
                metrics,
                seed=int(run.seed),
                steps=lc.total_steps,
                meta=run.meta,
                base_fingerprint=backbone,
            )
        results.append(metrics)
    return results


def _single_setup(tm, spec, oc, lc, run, start_phi0, mesh, frozen_shardings) -> step.StepSetup:
    """State (restored from the newest checkpoint if any), shardings and batches of one run."""
    trainable0, phi0 = start_phi0
    optimizer = make_optimizer(dataclasses.replace(oc, learning_rate=run.learning_rate))
    if run.frozen is not None:
        optimizer = freeze(optimizer, run.frozen)
    repl = sharding.replicated(mesh)
    frozen = {"params": tm.params, "head": run.head, "phi0": phi0}
    frozen_sh = {
        "params": frozen_shardings
        if frozen_shardings is not None
        else jax.tree.map(lambda _: repl, tm.params),
        "head": jax.tree.map(lambda _: repl, run.head),
        "phi0": jax.tree.map(lambda _: repl, phi0),
    }
    frozen = jax.device_put(frozen, frozen_sh)
    state_shape = jax.eval_shape(lambda t: step.init_state(t, optimizer), trainable0)
    state_sh = jax.tree.map(lambda _: repl, state_shape)
    if run.frozen is not None and frozen_shardings is None:
        # The frozen mask is part of the optimizer: this run's own program (not cached).
        step_fn = jax.jit(step.make_train_step(tm, spec, optimizer), donate_argnums=0)
    elif frozen_shardings is None:
        step_fn = step.step_for(tm, spec, oc, mesh, group=False)
    else:
        if spec.method == "full":
            flat_sh = tree_lib.flatten(frozen_sh["params"])
            state_sh = {
                "step": repl,
                "trainable": tree_lib.unflatten(
                    {n: flat_sh[n] for n in tree_lib.flatten(trainable0)}
                ),
                "opt_state": jax.tree.map(lambda _: repl, state_shape["opt_state"]),
            }
        step_fn = step.sharded_step(tm, spec, optimizer, mesh, state_sh, frozen_sh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, state_sh
    )
    manager, start, state, data_state = None, 0, None, None
    if lc.ckpt_every > 0:
        manager, start, state, data_state = state_io.open_at_newest_valid(
            Path(run.workdir).absolute() / "checkpoints",
            lc.keep_checkpoints,
            abstract,
            main=jax.process_index() == 0,
        )
    if start > lc.total_steps:
        manager.close()
        raise UserError(
            f"{run.workdir} holds a checkpoint at step {start}, past steps={lc.total_steps}; "
            f"set steps >= {start} to resume it, or start over with --restart"
        )
    if state is None:
        state = jax.jit(lambda t: step.init_state(t, optimizer), out_shardings=state_sh)(trainable0)
    if run.batches is not None:
        # A streaming source: its position is restored from the checkpoint's data item.
        positions = Positions(run.batches, start, data_state)
    elif run.batch_fn is not None:
        # Batches that are a function of the step (mixtures): resumed by the step alone.
        positions = Positions(run.batch_fn(lc.batch_size, start), start, None)
    else:
        # Seeded per-epoch permutations, this process's slice of every global batch,
        # resumable at any step.
        arrays = data.batches(
            run.train_arrays, lc.batch_size, seed=run.seed, epochs=None, start_step=start
        )
        positions = Positions(arrays, start, None)
    # Batches are moved to the devices in a background thread.
    batches = data.prefetch_to_device(positions, size=2, sharding=sharding.batch_sharding(mesh))
    rng = jax.random.key(int(run.seed) + 1, impl=lc.rng_impl)
    return step.StepSetup(state, frozen, step_fn, batches, rng, start, manager, positions)
