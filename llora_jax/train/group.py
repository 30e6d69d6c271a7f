"""Groups of runs trained at once: the checks, the stacked state and the (R, B, ...) batches.

A study fine-tunes many small runs (every task, seed and learning rate) on one frozen
backbone. On an accelerator one such run is latency-bound, so R runs that share the
backbone, the adapter spec and the optimizer (apart from the learning rate) train
together: ``step.make_train_step``'s step is vmapped over (train state, head, φ0,
batch, dropout key) with the backbone broadcast, so every step processes R batches.
Each member starts where its single run would start (φ0 from its seed), sees the
batches its single run would see, and writes the same outputs (``loop.fit``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llora_jax import data
from llora_jax import tree as tree_lib
from llora_jax.train import sharding, step
from llora_jax.train.optim import OptimConfig, make_optimizer
from llora_jax.types import AdapterSpec, TaskModel

PyTree = Any


def group_key(tm: TaskModel) -> tuple:
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
        shapes(tm.head),
    )


def shapes(tree: PyTree) -> tuple:
    if tree is None:
        return ()
    return tuple(
        (n, tuple(np.shape(x)), str(jnp.asarray(x).dtype))
        for n, x in tree_lib.flatten(tree).items()
    )


def shared_configs(ocs: Sequence[Any], lcs: Sequence[Any]) -> tuple[Any, Any]:
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


def check_runs(runs: Sequence[Any]) -> None:
    """Refuse no runs, two runs with one workdir, or heads of different shapes."""
    if not runs:
        raise ValueError("fit: no runs given; pass at least one Run")
    dirs = [Path(r.workdir).absolute() for r in runs]
    if len(set(dirs)) != len(dirs):
        dup = next(d for d in dirs if dirs.count(d) > 1)
        raise ValueError(f"fit: two runs write the same workdir {dup}")
    own = [r.workdir for r in runs if getattr(r, "batches", None) is not None]
    if own and len(runs) > 1:
        raise ValueError(
            f"fit: run {own[0]} brings its own batches (a multi-task mixture) and trains "
            "alone; fit it in its own call"
        )
    ref = shapes(runs[0].head)
    for r in runs[1:]:
        got = shapes(r.head)
        if got != ref:
            diff = sorted(set(got) ^ set(ref))
            raise ValueError(
                f"fit: the head of run {r.workdir} differs in shape from the head of run "
                f"{runs[0].workdir} ({diff[:4]}); pad heads to one shape (e.g. "
                "text_encoder.pad_classes) or train them in separate groups"
            )


def take(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _shared_fields(runs: Sequence[Any]) -> list[str]:
    """Fields every run has with one per-row shape and dtype (stackable into (R, B, ...)).

    Others (STS-B's float "score" beside its binned "label") are dropped: the train step
    reads only what the loss and readout need, which every task of one group has.
    """

    def sig(arrays: dict, k: str) -> tuple:
        v = np.asarray(arrays[k])
        return v.shape[1:], v.dtype

    first = runs[0].train_arrays
    return [
        k
        for k in first
        if all(k in r.train_arrays and sig(r.train_arrays, k) == sig(first, k) for r in runs)
    ]


def _group_batches(runs: Sequence[Any], batch_size: int, batch_sh: NamedSharding) -> Iterator:
    """(R, B, ...) batches on the devices: run r's rows are its single run's batches."""
    fields = _shared_fields(runs)
    streams = [
        data.batches({k: r.train_arrays[k] for k in fields}, batch_size, seed=r.seed, epochs=None)
        for r in runs
    ]

    def stacked() -> Iterator[dict]:
        for rows in zip(*streams):
            yield {k: np.stack([b[k] for b in rows]) for k in rows[0]}

    return data.prefetch_to_device(stacked(), size=2, sharding=batch_sh)


def setup(
    tm: TaskModel,
    spec: AdapterSpec,
    oc: OptimConfig,
    lc: Any,
    runs: Sequence[Any],
    starts: Sequence[tuple[PyTree, PyTree]],
    mesh: Mesh,
) -> step.StepSetup:
    """Stacked state (each run's own rate in its optimizer state: one program for any mix of
    rates), stacked heads and φ0, the vmapped step and the (R, B, ...) batches."""
    repl = sharding.replicated(mesh)
    states = [
        step.init_state(t, make_optimizer(dataclasses.replace(oc, learning_rate=r.learning_rate)))
        for (t, _), r in zip(starts, runs)
    ]
    state = jax.device_put(tree_lib.stack(states), repl)
    del states
    phi0s = [phi0 for _, phi0 in starts]
    frozen = jax.device_put(
        {
            "params": tm.params,
            "head": tree_lib.stack([r.head for r in runs]) if runs[0].head is not None else None,
            "phi0": None if phi0s[0] is None else tree_lib.stack(phi0s),
        },
        repl,
    )
    rngs = jax.device_put(
        jnp.stack([jax.random.key(int(r.seed) + 1, impl=lc.rng_impl) for r in runs]), repl
    )
    return step.StepSetup(
        state=state,
        frozen=frozen,
        step_fn=step.step_for(tm, spec, oc, mesh, group=True),
        batches=_group_batches(runs, lc.batch_size, step.group_batch_sharding(mesh)),
        rngs=rngs,
    )
