"""Checkpoint hygiene for an Orbax ``CheckpointManager`` directory.

Layout written by Orbax (0.12): ``<ckpt_dir>/<step>/`` per committed step, holding
``_CHECKPOINT_METADATA`` and (locally and on GCS) ``commit_success.txt``, plus one folder
per item (``state/``, ``data/``) with its ``_METADATA`` (a JSON item: ``metadata``). A save that was killed leaves
``<step>.orbax-checkpoint-tmp-<n>`` behind; such folders are never a checkpoint.

* ``remove_stale_tmp`` deletes those temporary folders. Call it under the workdir lock
  before the manager is created (so that no save of this run is in flight).
* ``validate_checkpoint`` checks a step folder's markers and, given a ``restore``
  callable, that it actually restores.
* ``newest_valid_step`` returns the newest valid step and moves damaged newer ones
  aside (to ``<ckpt_dir>.damaged/``, never deleted) with a warning, so that the manager
  can later save those step numbers again.
"""

from __future__ import annotations

import datetime
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_steps", "newest_valid_step", "remove_stale_tmp", "validate_checkpoint"]

TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")
# An item's own metadata: ``_METADATA`` (pytree items), ``metadata`` (JSON items).
ITEM_METADATA = ("_METADATA", "metadata")


def checkpoint_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Step numbers of the step folders in ``ckpt_dir`` (temporary folders excluded), sorted."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def remove_stale_tmp(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary folders of killed saves in ``ckpt_dir``; returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    stale = sorted(p for p in ckpt_dir.iterdir() if TMP_MARKER in p.name)
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return stale


def validate_checkpoint(
    step_dir: str | os.PathLike, restore: Callable[[int], Any] | None = None
) -> str | None:
    """None when ``step_dir`` is a usable checkpoint, else the reason it is not.

    ``restore(step)``: optional; when given, the step must also restore without error
    (e.g. ``lambda s: mngr.restore(s, args=ocp.args.StandardRestore(abstract_state))``).
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "not a directory"
    if not step_dir.name.isdigit():
        return f"{step_dir.name!r} is not a step number"
    if not any((step_dir / m).is_file() for m in COMMIT_MARKERS):
        return f"no commit marker ({' or '.join(COMMIT_MARKERS)}): the save never finished"
    items = [p for p in step_dir.iterdir() if p.is_dir()]
    if not items:
        return "no checkpoint items inside"
    for item in items:
        if not any((item / m).is_file() for m in ITEM_METADATA):
            return f"item {item.name!r} lacks {' or '.join(ITEM_METADATA)}"
    if restore is not None:
        try:
            restore(int(step_dir.name))
        except Exception as err:  # any failure to read it back makes it unusable
            return f"restore failed ({type(err).__name__}: {err})"
    return None


def _move_aside(step_dir: Path) -> Path:
    damaged = step_dir.parent.with_name(f"{step_dir.parent.name}.damaged")
    damaged.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = damaged / f"{step_dir.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = damaged / f"{step_dir.name}-{stamp}-{n}"
    os.replace(step_dir, target)
    return target


def newest_valid_step(
    ckpt_dir: str | os.PathLike,
    restore: Callable[[int], Any] | None = None,
    *,
    warn: Callable[[str], None] | None = None,
) -> int | None:
    """The newest step of ``ckpt_dir`` that validates; damaged newer ones are moved aside.

    Returns None when no step is valid (the run starts from step 0). ``warn`` receives one
    message per damaged step (default: ``warnings.warn``).
    """
    ckpt_dir = Path(ckpt_dir)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    for step in reversed(checkpoint_steps(ckpt_dir)):
        reason = validate_checkpoint(ckpt_dir / str(step), restore)
        if reason is None:
            return step
        moved = _move_aside(ckpt_dir / str(step))
        warn(
            f"checkpoint step {step} in {ckpt_dir} is damaged ({reason}); moved it to "
            f"{moved} and falling back to the previous checkpoint"
        )
    return None
