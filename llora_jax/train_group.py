"""Group training: fine-tune R runs of one method at once with one vmapped train step.

A study fine-tunes many small runs (every task, seed and learning rate) on one frozen
backbone. On an accelerator one such run is latency-bound, so R runs that share the
backbone, the adapter spec and the optimizer (apart from the learning rate) train
together: ``train.make_train_step``'s step is vmapped over (train state, head, φ0,
batch, dropout key) with the backbone broadcast, so every step processes R batches.

Each member starts where its single run (``train.finetune``) would start (φ0 from its
seed), sees the batches its single run would see, and writes the same outputs (task
vector, metrics.json, metrics.jsonl rows). With dropout off the group reproduces the
single runs up to float rounding; with dropout on it does under a threefry key
implementation but not under rbg (see ``finetune_group``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llora_jax import model as M
from llora_jax import sharding as S
from llora_jax import train as TR
from llora_jax import tree as T

PyTree = Any

# Compiled group steps, like train._STEPS. jit specialises on shapes, so one entry
# serves every group size R (each size compiles once and is kept in jit's own cache).
_STEPS: dict = {}


@dataclasses.dataclass(frozen=True, eq=False)
class GroupMember:
    """One run of a group: what differs from the other members.

    ``head``: this task's head (every member's head has the same shapes).
    ``final_eval(trainable, phi0)`` / ``evaluate(trainable, phi0)``: as in train.finetune.
    ``meta``: extra task-vector metadata; must name the "task".
    """

    workdir: str | os.PathLike
    seed: int
    learning_rate: float
    head: PyTree
    train_arrays: dict[str, np.ndarray]
    final_eval: Callable[[PyTree, PyTree], dict] | None = None
    evaluate: Callable[[PyTree, PyTree], dict] | None = None
    meta: dict = dataclasses.field(default_factory=dict)


def group_key(tm: M.TaskModel) -> tuple:
    """Task models with equal keys can train in one group (one compiled step).

    The backbone is compared by identity: a study loads it once for every task
    (BackboneCache), and comparing its values would cost a pass over every weight.
    """
    return (
        tm.module,
        tm.readout,
        tm.loss,
        tm.predict,
        id(tm.params),
        tm.base_model,
        tuple(tm.full_ft_targets),
        _shapes(tm.head),
    )


def _shapes(tree: PyTree) -> tuple:
    if tree is None:
        return ()
    return tuple(
        (n, tuple(np.shape(x)), str(jnp.asarray(x).dtype)) for n, x in T.flatten(tree).items()
    )


def shared_configs(
    ocs: Sequence[TR.OptimConfig], lcs: Sequence[TR.LoopConfig]
) -> tuple[TR.OptimConfig, TR.LoopConfig]:
    """The one OptimConfig and LoopConfig of a group; members may differ only in rate and seed.

    Raises ValueError naming the first field that differs in anything else.
    """
    for kind, items, free in (("OptimConfig", ocs, "learning_rate"), ("LoopConfig", lcs, "seed")):
        if not items:
            raise ValueError(f"shared_configs: no {kind}s given")
        for i, x in enumerate(items[1:], 1):
            for f in dataclasses.fields(x):
                a, b = getattr(items[0], f.name), getattr(x, f.name)
                if f.name != free and a != b:
                    raise ValueError(
                        f"{kind}.{f.name} differs within the group ({a!r} for member 0, {b!r} "
                        f"for member {i}); a group shares everything but {free}: train such "
                        "runs in separate groups"
                    )
    return ocs[0], lcs[0]


def check_members(members: Sequence[GroupMember]) -> None:
    """Refuse an empty group, two members with one workdir, or heads of different shapes."""
    if not members:
        raise ValueError("finetune_group: the group is empty; pass at least one GroupMember")
    dirs = [Path(m.workdir).absolute() for m in members]
    if len(set(dirs)) != len(dirs):
        dup = next(d for d in dirs if dirs.count(d) > 1)
        raise ValueError(f"finetune_group: two members write the same workdir {dup}")
    ref = _shapes(members[0].head)
    for m in members[1:]:
        got = _shapes(m.head)
        if got != ref:
            diff = sorted(set(got) ^ set(ref))
            raise ValueError(
                f"finetune_group: the head of member {m.workdir} differs in shape from the head "
                f"of member {members[0].workdir} ({diff[:4]}); pad heads to one shape (e.g. "
                "text_encoder.pad_classes) or train them in separate groups"
            )


def _take(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _shared_fields(members: Sequence[GroupMember]) -> list[str]:
    """Fields every member has with one per-row shape and dtype (stackable into (R, B, ...)).

    Others (STS-B's float "score" beside its binned "label") are dropped: the train step
    reads only what the loss and readout need, which every task of one group has.
    """

    def sig(arrays: dict, k: str) -> tuple:
        v = np.asarray(arrays[k])
        return v.shape[1:], v.dtype

    first = members[0].train_arrays
    return [
        k
        for k in first
        if all(k in m.train_arrays and sig(m.train_arrays, k) == sig(first, k) for m in members)
    ]


def _group_batches(
    members: Sequence[GroupMember], batch_size: int, sharding: NamedSharding
) -> Iterator[dict]:
    """(R, B, ...) batches on the devices: member r's rows are its single run's batches."""
    from llora_jax import data

    fields = _shared_fields(members)
    streams = [
        data.batches({k: m.train_arrays[k] for k in fields}, batch_size, seed=m.seed, epochs=None)
        for m in members
    ]

    def stacked() -> Iterator[dict]:
        for rows in zip(*streams):
            yield {k: np.stack([b[k] for b in rows]) for k in rows[0]}

    return data.prefetch_to_device(stacked(), size=2, sharding=sharding)


def _group_step(tm, spec, optimizer, oc, lc, mesh) -> Callable:
    """The jitted, vmapped, donated train step of a group (cached across groups)."""
    # The learning rate is optimizer state, so it is not part of the key.
    key = (
        *M.functions_key(tm, spec),
        dataclasses.replace(oc, learning_rate=0.0),
        lc.total_steps,
        mesh,
    )
    fn = _STEPS.get(key)
    if fn is None:
        repl = S.replicated(mesh)
        batch_sh = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
        step = TR.make_train_step(tm, spec, optimizer)
        # The backbone is broadcast (one copy for every member); the rest is per member.
        axes = (0, {"params": None, "head": 0, "phi0": 0}, 0, 0)
        fn = _STEPS[key] = jax.jit(
            jax.vmap(step, in_axes=axes),
            in_shardings=(repl, repl, batch_sh, repl),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
    return fn


def finetune_group(
    tm: M.TaskModel,
    spec: M.AdapterSpec,
    oc: TR.OptimConfig,
    lc: TR.LoopConfig,
    members: Sequence[GroupMember],
    *,
    mesh: Mesh | None = None,
) -> list[dict]:
    """Fine-tune every member at once; export each member's task vector like train.finetune.

    ``tm`` gives the shared frozen part (module, backbone weights, readout, loss,
    predict; its own head is unused: every member brings one). ``oc.learning_rate`` and
    ``lc.seed`` are ignored (each member brings its own); everything else is shared.

    Dropout: member r's key is ``jax.random.key(seed_r + 1, impl=lc.rng_impl)`` as in its
    single run. Under vmap a threefry key (``rng_impl="threefry2x32"``) draws exactly its
    single run's bits. An rbg key does not: jax batches ``rng_bit_generator`` by drawing
    the whole (R, ...) block from the *first* member's key (jax/_src/lax/control_flow/
    loops.py, ``_rng_bit_generator_batching_rule``, checked with jax 0.10 and 0.11), so
    members get distinct, independent dropout masks, but not their single runs' ones:
    a member's masks depend on its group (the first member's seed and its position).
    Results stay deterministic for a given group. With dropout off (or threefry keys)
    the group reproduces the single runs up to float rounding (tests/test_train_group.py).

    No mid-run checkpoints: ``lc.ckpt_every`` is ignored, a group always starts at step
    0, and a study resumes at the granularity of whole runs (it skips members whose task
    vector exists). Metric rows are written every ``lc.log_every`` steps and at the end
    (a single run with checkpoints also logs at checkpoint steps). A non-finite loss in
    any member raises ``train.TrainingDiverged`` naming that member's workdir.
    Returns every member's final metrics, in order.
    """
    check_members(members)
    mesh = mesh or S.make_mesh()
    repl = S.replicated(mesh)
    n = len(members)
    oc = dataclasses.replace(oc, total_steps=lc.total_steps)
    optimizer = TR.make_optimizer(oc)
    starts = [M.init_trainable(tm, spec, jax.random.key(int(m.seed))) for m in members]
    phi0s = [phi0 for _, phi0 in starts]
    # Each member's initial state carries its own rate (optimizer state): one program
    # serves any mix of rates.
    states = [
        TR.init_state(t, TR.make_optimizer(dataclasses.replace(oc, learning_rate=m.learning_rate)))
        for (t, _), m in zip(starts, members)
    ]
    state = jax.device_put(T.stack(states), repl)
    del states
    frozen = jax.device_put(
        {
            "params": tm.params,
            "head": T.stack([m.head for m in members]) if members[0].head is not None else None,
            "phi0": None if phi0s[0] is None else T.stack(phi0s),
        },
        repl,
    )
    step_fn = _group_step(tm, spec, optimizer, oc, lc, mesh)
    rngs = jax.device_put(
        jnp.stack([jax.random.key(int(m.seed) + 1, impl=lc.rng_impl) for m in members]), repl
    )
    batch_sh = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    from llora_jax.metrics_log import MetricsLog

    main = jax.process_index() == 0
    dirs = [Path(m.workdir).absolute() for m in members]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    logs = [MetricsLog(d, tensorboard=lc.tensorboard, enabled=main) for d in dirs]
    batches = _group_batches(members, lc.batch_size, batch_sh)
    bar = None
    if lc.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=lc.total_steps, desc=f"{spec.method} ×{n}", unit="step")
    t0 = time.perf_counter()
    try:
        for step in range(lc.total_steps):
            state, metrics = step_fn(state, frozen, next(batches), rngs)
            done = step + 1
            last = done == lc.total_steps
            if done % lc.log_every == 0 or last:
                m = jax.device_get(metrics)
                _check_finite(m, dirs, done)
                # Each member's own throughput (the group processes n times as many).
                rate = done * lc.batch_size / max(time.perf_counter() - t0, 1e-9)
                for i, log in enumerate(logs):
                    row = {k: float(v[i]) for k, v in m.items()}
                    log.write({"step": done, **row, "examples_per_s": rate})
                if bar is not None:
                    loss = float(np.mean(m["loss"]))
                    bar.set_postfix(mean_loss=f"{loss:.4f}", ex_s=f"{n * rate:.0f}")
            if lc.eval_every and done % lc.eval_every == 0 and not last:
                for i, mem in enumerate(members):
                    if mem.evaluate is not None:
                        vm = mem.evaluate(_take(state["trainable"], i), phi0s[i])
                        logs[i].write({"step": done, **vm})
            if bar is not None:
                bar.update(1)
    finally:
        batches.close()  # stops the prefetch thread
        for log in logs:
            log.close()
        if bar is not None:
            bar.close()

    results = []
    fingerprint = T.fingerprint(tm.params) if main else None  # once for every member
    for i, mem in enumerate(members):
        trainable = _take(state["trainable"], i)
        metrics = mem.final_eval(trainable, phi0s[i]) if mem.final_eval else {}
        # As train.finetune: τ = φ − φ0 (full fine-tuning: θ − θ0 of the trained subtree).
        tau = T.sub(trainable, starts[i][0] if spec.method == "full" else phi0s[i])
        tau = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tau)
        if main:
            lc_i = dataclasses.replace(lc, seed=int(mem.seed))
            TR._export(dirs[i], tm, spec, tau, phi0s[i], metrics, lc_i, dict(mem.meta), fingerprint)
        results.append(metrics)
    return results


def _check_finite(m: dict, dirs: Sequence[Path], done: int) -> None:
    bad = [i for i, x in enumerate(np.asarray(m["nonfinite"])) if int(x)]
    if bad:
        i = bad[0]
        loss = float(m["loss"][i])
        others = f" (and {len(bad) - 1} other members)" if len(bad) > 1 else ""
        raise TR.TrainingDiverged(
            f"{dirs[i]}: non-finite loss or gradient at step {done} (loss={loss}){others}; "
            "group training keeps no checkpoints, nothing of the group was exported. Lower "
            "the learning rate or enable gradient clipping."
        )
