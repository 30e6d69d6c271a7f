"""Task vectors on disk: τ = φ − φ0 (Orbax) plus ``meta.json``.

Layout of a task-vector directory::

    meta.json   what the vector is (base model and its fingerprint, adapter,
                task, seed, steps, metrics, shapes) — everything needed to
                refuse an unsafe merge
    tau/        Orbax checkpoint of τ
    phi0/       Orbax checkpoint of φ0, the adapter's initialisation and
                linearization point (absent for full fine-tuning, where φ0 = θ0)

``meta.json`` holds a content checksum of τ and φ0 (``checksum``: sha256 over every
leaf's path, shape, dtype and bytes in path order), verified on every load, so a data
file damaged in place (same size) is refused instead of loaded. Vectors saved before
checksums existed still load, with a warning and ``meta["checksum_note"]``.

Saves are atomic: everything is written into a hidden temporary sibling
directory, which is renamed into place only once complete. A crash at any
point leaves no directory at the final path, and a left-over temporary
directory is never taken for a task vector.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from llora_jax import __version__
from llora_jax import tree as tree_lib
from llora_jax.errors import UserError

PyTree = Any

FORMAT_VERSION = 1
META_FILE = "meta.json"
# How meta["checksum"] is computed: tree.fingerprint (sha256 of paths, shapes, dtypes, bytes).
CHECKSUM_ALGORITHM = "sha256-tree-v1"

# adapter_kind: "lora" (τ = φ − φ0 in adapter space, φ0 stored), "full" (τ on backbone
# weights), "delta_w" (dense ΔW = s·A·B at each adapted kernel's path, for adapters whose
# φ0 is unknown, e.g. imported from PEFT; no φ0).
KINDS = ("lora", "full", "delta_w")

# Fields that must agree for task vectors to be added together. Order = the
# order in which a difference is reported.
COMPAT_FIELDS = (
    "base_model",
    "base_fingerprint",
    "adapter_kind",
    "mode",
    "targets",
    "rank",
    "alpha",
    "phi0_fingerprint",
)


class TaskVectorError(UserError, ValueError):
    """A task vector is missing, damaged, or does not fit with others."""


@dataclasses.dataclass(frozen=True)
class TaskVector:
    tau: PyTree
    meta: dict
    phi0: PyTree | None = None
    path: Path | None = None

    @property
    def task(self) -> str:
        return self.meta.get("task", "?")


def make_meta(
    *,
    base_model: str,
    base_fingerprint: str,
    adapter_kind: str,
    mode: str,
    task: str,
    seed: int,
    steps: int,
    targets: Sequence[str] = (),
    rank: int | None = None,
    alpha: float | None = None,
    phi0_fingerprint: str | None = None,
    metrics: dict | None = None,
    **extra: Any,
) -> dict:
    """The metadata dict stored with a task vector (JSON-serialisable)."""
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "adapter_kind": adapter_kind,
        "mode": mode,
        "targets": list(targets),
        "rank": rank,
        "alpha": alpha,
        "phi0_fingerprint": phi0_fingerprint,
        "task": task,
        "seed": int(seed),
        "steps": int(steps),
        "metrics": metrics or {},
        **extra,
    }


def _local_checkpointer():
    """A checkpointer that involves only this process.

    Task vectors are small host arrays written by one process; Orbax's default
    would wait for every process of a multi-host run at a barrier.
    """
    import orbax.checkpoint as ocp  # orbax is slow to import; only saving and loading need it

    me = jax.process_index()
    opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=opts)


def _orbax_save(path: Path, tree: PyTree) -> None:
    ckptr = _local_checkpointer()
    try:
        ckptr.save(path.absolute(), jax.device_get(tree))
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def _orbax_restore(path: Path) -> PyTree:
    ckptr = _local_checkpointer()
    try:
        return ckptr.restore(path.absolute())
    finally:
        ckptr.close()


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def is_task_vector(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / META_FILE).is_file() and (p / "tau").is_dir()


def save(
    path: str | os.PathLike,
    tau: PyTree,
    meta: dict,
    *,
    phi0: PyTree | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a task vector atomically; returns the final path."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise TaskVectorError(
            f"{path} already exists; pass overwrite=True (or choose another directory)"
        )
    for k in ("base_model", "base_fingerprint", "adapter_kind", "mode", "task"):
        if k not in meta:
            raise TaskVectorError(f"task-vector meta lacks {k!r}; build it with make_meta()")
    if meta["adapter_kind"] == "delta_w" and phi0 is not None:
        raise TaskVectorError("a delta_w task vector lives in weight space and has no phi0")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta["structure"] = tree_lib.structure_signature(tau)
    meta["num_params"] = tree_lib.num_params(tau)
    if phi0 is not None:
        if tree_lib.structure_signature(phi0) != meta["structure"]:
            raise TaskVectorError("phi0 and tau have different tree structures or shapes")
        meta.setdefault("phi0_fingerprint", tree_lib.fingerprint(phi0))
        if meta["phi0_fingerprint"] is None:
            meta["phi0_fingerprint"] = tree_lib.fingerprint(phi0)
    meta["checksum"] = checksums(tau, phi0)
    tmp = _tmp_sibling(path)
    try:
        tmp.mkdir()
        _orbax_save(tmp / "tau", tau)
        if phi0 is not None:
            _orbax_save(tmp / "phi0", phi0)
        # meta.json last: a directory without it is never a task vector.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if path.exists():
            trash = _tmp_sibling(path)
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike, *, with_phi0: bool = True) -> TaskVector:
    """Read a task vector, checking its tree against the shapes in meta.json."""
    path = Path(path).absolute()
    if not path.exists():
        raise TaskVectorError(f"no task vector at {path}: the directory does not exist")
    if not (path / META_FILE).is_file():
        raise TaskVectorError(
            f"{path} is not a task vector: {META_FILE} is missing (an interrupted save, "
            "or the wrong directory; task vectors are written to <workdir>/task_vector)"
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise TaskVectorError(f"{path / META_FILE} is not valid JSON: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise TaskVectorError(
            f"{path}: format_version {meta.get('format_version')!r}, this llora-jax reads "
            f"{FORMAT_VERSION}"
        )
    tau = _restore_checked(path / "tau")
    _check_structure(path / "tau", tau, meta["structure"])
    phi0 = None
    if with_phi0 and (path / "phi0").is_dir():
        phi0 = _restore_checked(path / "phi0")
        _check_structure(path / "phi0", phi0, meta["structure"])
    meta = _verify_checksums(path, meta, tau, phi0)
    return TaskVector(tau=tau, meta=meta, phi0=phi0, path=path)


def checksums(tau: PyTree, phi0: PyTree | None = None) -> dict:
    """The ``meta["checksum"]`` entry: content hashes of τ and φ0."""
    return {
        "algorithm": CHECKSUM_ALGORITHM,
        "tau": tree_lib.fingerprint(tau),
        "phi0": None if phi0 is None else tree_lib.fingerprint(phi0),
    }


def _restore_checked(where: Path) -> PyTree:
    try:
        return _orbax_restore(where)
    except Exception as err:  # a damaged or truncated Orbax folder: name it, say what to do
        raise TaskVectorError(
            f"{where} could not be read ({type(err).__name__}: {err}); the task vector is "
            "damaged: fine-tune the run again or restore the folder from a copy"
        ) from err


def _verify_checksums(path: Path, meta: dict, tau: PyTree, phi0: PyTree | None) -> dict:
    recorded = meta.get("checksum")
    if recorded is None:
        note = "no checksum (saved by an older llora-jax): its content was not verified"
        warnings.warn(f"task vector {path}: {note}", stacklevel=3)
        return {**meta, "checksum_note": note}
    if recorded.get("algorithm") != CHECKSUM_ALGORITHM:
        raise TaskVectorError(
            f"{path / META_FILE}: unknown checksum algorithm {recorded.get('algorithm')!r} "
            f"(this llora-jax knows {CHECKSUM_ALGORITHM}); upgrade llora-jax"
        )
    for name, tree in (("tau", tau), ("phi0", phi0)):
        if tree is None or recorded.get(name) is None:
            continue
        if tree_lib.fingerprint(tree) != recorded[name]:
            raise TaskVectorError(
                f"{path / name} does not match the checksum in {META_FILE}: its data was "
                "damaged or changed after it was saved; fine-tune the run again or restore "
                "the folder from a copy"
            )
    return meta


def _check_structure(where: Path, tree: PyTree, expected: dict) -> None:
    got = tree_lib.structure_signature(tree)
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
    raise TaskVectorError(
        f"{where} does not match the structure recorded in meta.json: "
        f"missing {missing[:3]}, unexpected {extra[:3]}, "
        + ", ".join(f"{n}: {got[n]} != {expected[n]}" for n in wrong[:3])
    )


def check_compatible(metas: Sequence[dict | TaskVector]) -> None:
    """Raise, naming the field, when task vectors cannot be combined."""
    metas = [m.meta if isinstance(m, TaskVector) else m for m in metas]
    if not metas:
        raise TaskVectorError("no task vectors given")
    ref = metas[0]
    for m in metas[1:]:
        for field in COMPAT_FIELDS:
            if field == "base_model" and _same_weights(ref, m):
                continue  # the same base weights at another path or under another name
            if m.get(field) != ref.get(field):
                raise TaskVectorError(
                    f"task vectors for {ref.get('task')!r} and {m.get('task')!r} differ in "
                    f"{field}: {ref.get(field)!r} vs {m.get(field)!r}; only vectors trained from "
                    "the same base weights with the same adapter set-up can be merged"
                )
        if m.get("structure") != ref.get("structure"):
            raise TaskVectorError(
                f"task vectors for {ref.get('task')!r} and {m.get('task')!r} have different "
                "parameter trees"
            )


def _same_weights(a: dict, b: dict) -> bool:
    fa, fb = a.get("base_fingerprint"), b.get("base_fingerprint")
    return bool(fa) and fa == fb


def on_device(t: TaskVector) -> TaskVector:
    """``t`` with τ (and φ0) moved to the default device once, for repeated merging."""
    phi0 = None if t.phi0 is None else jax.device_put(t.phi0)
    return dataclasses.replace(t, tau=jax.device_put(t.tau), phi0=phi0)


def load_many(paths: Sequence[str | os.PathLike]) -> list[TaskVector]:
    """Load several task vectors and refuse the set unless they are compatible."""
    tvs = [load(p) for p in paths]
    check_compatible(tvs)
    return tvs
