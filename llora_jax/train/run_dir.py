"""A run directory that knows what it holds: run record, lock, checkpoint hygiene.

* **Run record** (``run.json``): every field that determines the run's result (config
  fields, backbone fingerprint, data fingerprint, package version) and their hash.
  Re-running a workdir with different fields is refused by ``check_resume``, naming each
  field as ``old -> new``, unless only *safe* fields differ (how long to train, how
  often to log or save) or the user starts over with ``restart`` (``--restart``).
* **Lock** (``workdir_lock``): one live writer per workdir; a killed holder's lock is
  free at once (``flock`` is released by the kernel when the process dies).
* **Checkpoint hygiene**: Orbax step directories are listed and validated; a damaged
  newest step is moved aside with a warning and the newest valid one is used; temporary
  directories left by a killed save are removed before the next save.

Typical use by the training loop (the lock spans everything that writes)::

    fields = run_dir.run_fields(config_dict, backbone_fingerprint=..., data_fingerprint=...)
    with run_dir.workdir_lock(workdir):
        changed = run_dir.prepare_workdir(workdir, fields, start_over=flags.restart)
        # (restart if asked; check_resume; write run.json; remove stale Orbax tmp dirs)
        step = run_dir.newest_valid_step(workdir / "checkpoints", restore=...)
        ...  # train from `step`, export
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llora_jax import __version__
from llora_jax.errors import UserError

# The lock and checkpoint helpers live in their own modules; re-exported for one import.
from llora_jax.train.checkpoints import (
    checkpoint_steps,
    newest_valid_step,
    remove_stale_tmp,
    validate_checkpoint,
)
from llora_jax.train.run_lock import WorkdirLocked, lock_path, workdir_lock

__all__ = [
    "RUN_FILE",
    "SAFE_FIELDS",
    "RunMismatch",
    "WorkdirLocked",
    "check_resume",
    "checkpoint_steps",
    "flat_fields",
    "lock_path",
    "newest_valid_step",
    "prepare_workdir",
    "read_run_record",
    "remove_stale_tmp",
    "restart",
    "run_fields",
    "run_fingerprint",
    "validate_checkpoint",
    "workdir_lock",
    "write_run_record",
]

RUN_FILE = "run.json"
RUN_FORMAT_VERSION = 1

# Fields that may change between an interrupted run and its resumption: they decide how
# long to train and what is logged or saved, not what a step computes. ``steps`` extends
# (or shortens) a run; with the cosine schedule the decay is rebuilt for the new total, so
# an extended run is not bit-equal to a fresh run of that length (constant schedule: it is).
# Mesh fields: a run preempted on 8 devices may resume on 4 (same global batches; only
# the reduction order of floating-point sums changes).
SAFE_FIELDS = (
    "steps",
    "log_every",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "progress",
    "tensorboard",
    "eval_batch_size",
    "mesh.*",
)

# Config fields that name a location, dropped where the content's fingerprint is known.
LOCATION_FIELDS = ("backbone", "data.data_dir")

# What a workdir holds once a run has started writing into it.
_RUN_OUTPUTS = ("checkpoints", "task_vector", "metrics.json", "metrics.jsonl")


class RunMismatch(UserError):
    """A workdir holds a run made with other result-determining fields."""


def flat_fields(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b": value}`` (lists and scalars are leaves)."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flat_fields(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _canonical(value: Any) -> Any:
    """JSON-stable form: tuples become lists, so a value survives a round trip unchanged."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_fields(
    config: Mapping[str, Any],
    *,
    backbone_fingerprint: str | None,
    data_fingerprint: str | None,
    package_version: str = __version__,
) -> dict[str, Any]:
    """The result-determining fields of a run: the flattened config plus provenance.

    ``config``: the run's config as a (nested) dict, e.g. ``json.loads(c.to_json())``.
    Where a content fingerprint is given, the config field that only says *where* that
    content lives (``LOCATION_FIELDS``) is left out: the same weights or data moved to
    another path are the same run.
    """
    fields = flat_fields(_canonical(dict(config)))
    located = {"backbone": backbone_fingerprint, "data.data_dir": data_fingerprint}
    for name, content in located.items():
        if content is not None:
            fields.pop(name, None)
    fields["backbone_fingerprint"] = backbone_fingerprint
    fields["data_fingerprint"] = data_fingerprint
    fields["package_version"] = package_version
    return fields


def _is_safe(name: str, safe_fields: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in safe_fields)


def run_fingerprint(fields: Mapping[str, Any], safe_fields: Iterable[str] = SAFE_FIELDS) -> str:
    """sha256 of the canonical JSON of the result-determining (non-safe) fields."""
    safe_fields = tuple(safe_fields)
    kept = {k: v for k, v in _canonical(dict(fields)).items() if not _is_safe(k, safe_fields)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def write_run_record(workdir: str | os.PathLike, fields: Mapping[str, Any]) -> Path:
    """Write ``<workdir>/run.json`` atomically (temp file, then rename)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = {
        "format_version": RUN_FORMAT_VERSION,
        "fingerprint": run_fingerprint(fields),
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fields": _canonical(dict(fields)),
    }
    tmp = workdir / f".{RUN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, workdir / RUN_FILE)
    return workdir / RUN_FILE


def read_run_record(workdir: str | os.PathLike) -> dict | None:
    """The run record of ``workdir``, or None when it has none."""
    file = Path(workdir) / RUN_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise RunMismatch(
            f"{file} is not valid JSON ({err}); the run record is damaged: start over with "
            "--restart (the old run is moved aside, not deleted)"
        ) from err
    if not isinstance(record, dict) or "fields" not in record:
        raise RunMismatch(f"{file} has no 'fields'; start over with --restart")
    return record


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value)


_MISSING = object()


def check_resume(
    workdir: str | os.PathLike,
    new_fields: Mapping[str, Any],
    safe_fields: Iterable[str] = SAFE_FIELDS,
) -> list[str]:
    """Refuse to resume ``workdir`` with different result-determining fields.

    Returns the names of the safe fields that changed (the caller logs them and rewrites
    the record); ``[]`` for a fresh or identical run. Raises ``RunMismatch`` naming every
    differing field as ``old -> new``, or when the workdir holds run outputs but no record
    (a run made before run records existed: nothing can be checked).
    """
    workdir = Path(workdir)
    safe_fields = tuple(safe_fields)
    record = read_run_record(workdir)
    if record is None:
        found = [n for n in _RUN_OUTPUTS if (workdir / n).exists()]
        if found:
            raise RunMismatch(
                f"{workdir} holds a run ({', '.join(found)}) but no {RUN_FILE}, so what it "
                "would resume cannot be checked; start over with --restart (moves it to "
                f"{workdir.name}.old-<time>) or choose another --workdir"
            )
        return []
    old = record["fields"]
    new = _canonical(dict(new_fields))
    changed, refused = [], []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, _MISSING), new.get(name, _MISSING)
        if a == b:
            continue
        (changed if _is_safe(name, safe_fields) else refused).append(
            f"{name}: {_show(a)} -> {_show(b)}"
        )
    if refused:
        raise RunMismatch(
            f"{workdir} holds a run made with other settings, so resuming it would mix two "
            f"runs: {'; '.join(refused)}. Put the old values back to resume it, start over "
            f"with --restart (the old run is moved to {workdir.name}.old-<time>), or choose "
            "another --workdir"
        )
    return [c.split(":")[0] for c in changed]


def restart(workdir: str | os.PathLike, *, now: datetime.datetime | None = None) -> Path | None:
    """Move ``workdir`` aside to ``<workdir>.old-<UTC time>``; returns the new path.

    Nothing is deleted. Returns None when ``workdir`` does not exist.
    """
    workdir = Path(workdir).absolute()
    if not workdir.exists():
        return None
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    target = workdir.with_name(f"{workdir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = workdir.with_name(f"{workdir.name}.old-{stamp}-{n}")
    os.replace(workdir, target)
    return target


def prepare_workdir(
    workdir: str | os.PathLike,
    fields: Mapping[str, Any],
    *,
    start_over: bool = False,
    safe_fields: Iterable[str] = SAFE_FIELDS,
    ckpt_subdir: str = "checkpoints",
) -> list[str]:
    """Everything a run does to its workdir before training; call it under the lock.

    Moves an old run aside when ``start_over`` (``--restart``); refuses a resume with other fields
    (``RunMismatch``); writes ``run.json``; removes temporary folders of killed Orbax
    saves. Returns the safe fields that changed since the recorded run (to log them).
    """
    workdir = Path(workdir)
    if start_over:
        restart(workdir)
    changed = check_resume(workdir, fields, safe_fields)
    write_run_record(workdir, fields)
    remove_stale_tmp(workdir / ckpt_subdir)
    return changed
