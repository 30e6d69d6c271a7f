"""Directories written whole or not at all: built under a hidden temporary name beside the
target, renamed into place at the end, removed if anything fails (imports and exports)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(out: Path, what: str, *, create: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` (an existing
    ``out`` is removed first: callers check ``overwrite`` before), on failure it is removed.
    ``create=False`` leaves creating the folder to the caller (e.g. ``task_vectors.save``)."""
    stage = out.parent / f".{out.name}.{what}-{uuid.uuid4().hex[:8]}"
    try:
        if create:
            stage.mkdir(parents=True)
        yield stage
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
