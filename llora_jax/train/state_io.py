"""A single run's Orbax checkpoints: the train state and the data position, saved together.

Each step folder holds two items (``ocp.args.Composite``): ``state`` (the train state)
and ``data`` (JSON: the step and, for a streaming batch source, its ``get_state()``), so
a resumed run restores its state and the exact position of its batches from one
committed step. ``open_at_newest_valid`` picks the step to resume: the newest one that
validates (markers, and in a single-process run a real restore), moving damaged newer
ones aside with a warning (``checkpoints.newest_valid_step``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llora_jax.train import checkpoints

PyTree = Any


def make_manager(ckpt_dir: Path, keep: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True)
    return ocp.CheckpointManager(ckpt_dir.absolute(), options=opts)


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, data_state: dict) -> None:
    """Start an asynchronous save of ``state`` and ``data_state`` as step ``step``."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
    )


def _restore(manager: ocp.CheckpointManager, step: int, abstract: PyTree) -> tuple[PyTree, dict]:
    got = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
        ),
    )
    return got["state"], dict(got["data"])


def open_at_newest_valid(
    ckpt_dir: Path, keep: int, abstract: PyTree, *, main: bool
) -> tuple[ocp.CheckpointManager, int, PyTree | None, dict | None]:
    """(manager, start step, restored state or None, restored data position or None).

    Process 0 validates the steps (in a single-process run by restoring them; restores
    are collective in a multi-host run, so there only the commit markers are checked) and
    moves damaged ones aside; then every process opens a fresh manager (the old one
    cached the step list) and restores the newest step.
    """
    single = jax.process_count() == 1
    restored: dict[int, tuple[PyTree, dict]] = {}
    if main and ckpt_dir.is_dir():
        probe = make_manager(ckpt_dir, keep) if single else None

        def restore(step: int) -> None:
            restored[step] = _restore(probe, step, abstract)

        checkpoints.newest_valid_step(
            ckpt_dir,
            restore if single else None,
            warn=lambda msg: warnings.warn(msg, stacklevel=2),
        )
        if probe is not None:
            probe.close()
    _barrier()
    manager = make_manager(ckpt_dir, keep)
    step = manager.latest_step()
    if step is None:
        return manager, 0, None, None
    state, data_state = restored.get(step) or _restore(manager, step, abstract)
    return manager, int(step), state, data_state


def _barrier() -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llora_jax.train.state_io")
