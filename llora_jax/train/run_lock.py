"""One live writer per workdir: ``with workdir_lock(workdir): ...``.

The lock is an ``flock`` on a sibling file ``<parent>/.<name>.lock`` (a sibling, so that
``--restart`` can move the workdir aside while the lock is held, and so that a workdir
that does not exist yet can be locked). The kernel releases an ``flock`` when its holder
dies, even by SIGKILL, so a killed run never leaves a lock behind: the next run takes
the file over. The file holds the holder's pid, host and start time, for the message a
second run gets.

In a multi-host run only one process (``jax.process_index() == 0``) should take it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from llora_jax.errors import UserError

__all__ = ["WorkdirLocked", "lock_path", "workdir_lock"]


class WorkdirLocked(UserError):
    """Another live process is writing the workdir."""


def lock_path(workdir: str | os.PathLike) -> Path:
    workdir = Path(workdir).absolute()
    return workdir.parent / f".{workdir.name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process (its details are not written yet)"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"


def _open_locked(path: Path) -> int:
    """An fd holding an exclusive flock on ``path`` (the file now at that path)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        # The previous holder may have unlinked the file between our open and our flock:
        # then we hold a lock on an orphan inode; open the path again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold the workdir's lock for the block; refuse (``WorkdirLocked``) if it is held.

    Yields the lock file's path. Not re-entrant: a second ``workdir_lock`` on the same
    workdir in the same process is refused too (two writers, whichever the process).
    """
    path = lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _open_locked(path)
    except BlockingIOError:
        raise WorkdirLocked(
            f"{Path(workdir).absolute()} is in use by {_holder(path)} ({path}); two runs "
            "writing one workdir would corrupt it. Wait for that run to end, stop it, or "
            "choose another --workdir"
        ) from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        # Unlink while still holding the lock, so that no waiter locks a file that is
        # about to disappear (a waiter that opened it already re-checks the inode).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
