"""What the loop does to its run directories before the first step: lock, check, record.

``claim(runs, fields, restart)`` is a context manager held for the whole of ``fit``
(training and export): process 0 takes each workdir's lock (``run_lock``), moves an
old run aside on ``--restart``, refuses a resume with other result-determining fields
(``run_dir.check_resume``), writes ``run.json`` and the run's extra files (its
``config.json``), and removes temporary folders of killed Orbax saves. Other processes
of a multi-host run wait at a barrier until process 0 is done.

``loop_fields`` describes a run that has no config (a library call of ``fit``) in the
config's field names, so the same safe-field rules apply; ``backbone_fingerprint``
hashes a backbone once per process; ``truncate_metrics`` drops ``metrics.jsonl`` rows a
resumed run will write again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llora_jax import tree as tree_lib
from llora_jax.train import run_dir

PyTree = Any

# Backbones hashed in this process: (the tree, its fingerprint) by id(tree). The tree is
# kept so that its id cannot be reused by another object; a study holds one or two.
_BACKBONE_FINGERPRINTS: dict[int, tuple[PyTree, str]] = {}
_MAX_BACKBONES = 4


def backbone_fingerprint(params: PyTree) -> str:
    """``tree.fingerprint(params)``, computed once per backbone per process."""
    key = id(params)
    if key not in _BACKBONE_FINGERPRINTS:
        if len(_BACKBONE_FINGERPRINTS) >= _MAX_BACKBONES:
            _BACKBONE_FINGERPRINTS.pop(next(iter(_BACKBONE_FINGERPRINTS)))
        _BACKBONE_FINGERPRINTS[key] = (params, tree_lib.fingerprint(params))
    return _BACKBONE_FINGERPRINTS[key][1]


def arrays_fingerprint(arrays: Mapping[str, Any] | None) -> str | None:
    """A content hash of training arrays (numeric fields; strings are not hashed here)."""
    if arrays is None:
        return None
    numeric = {k: np.asarray(v) for k, v in arrays.items() if np.asarray(v).dtype != object}
    return tree_lib.fingerprint(numeric)


def loop_fields(spec: Any, oc: Any, lc: Any, seed: int, learning_rate: float) -> dict:
    """A run without a config, described in the config's field names (``configs/common.py``)."""
    optim = dataclasses.asdict(oc)
    optim.pop("total_steps", None)  # the config's "steps" (a safe field)
    optim["learning_rate"] = float(learning_rate)
    loop = dataclasses.asdict(lc)
    loop.pop("health", None)
    loop["steps"] = loop.pop("total_steps")
    loop["seed"] = int(seed)
    return {"method": spec.method, "lora": dataclasses.asdict(spec.lora), "optim": optim, **loop}


def truncate_metrics(workdir: Path, after_step: int) -> int:
    """Drop ``metrics.jsonl`` rows of steps after ``after_step`` (a resumed run writes them
    again); atomic rewrite. Returns how many rows were dropped."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            step = int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue  # a line cut by a kill: dropped with the rows after it
        if step <= after_step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale_exports(workdir: Path) -> None:
    """Temporary task-vector folders of an export that was killed (never a task vector)."""
    for p in workdir.glob(".task_vector.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def claim(
    dirs: Sequence[Path],
    fields: Sequence[Mapping[str, Any]],
    extra_files: Sequence[Mapping[str, str]],
    *,
    restart: bool,
    main: bool,
) -> Iterator[None]:
    """Hold every workdir's lock (process 0) and prepare each one (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        if main:
            for d, f, files in zip(dirs, fields, extra_files):
                stack.enter_context(run_dir.workdir_lock(d))
                changed = run_dir.prepare_workdir(d, f, start_over=restart)
                if changed:
                    print(f"{d}: resuming with changed {', '.join(changed)}", file=sys.stderr)
                for name, text in files.items():
                    _write_atomic(d / name, text)
                _remove_stale_exports(d)
        sync("llora_jax.train.resume.claim")
        yield
