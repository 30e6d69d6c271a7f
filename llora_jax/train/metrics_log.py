"""Metric rows to <workdir>/metrics.jsonl and TensorBoard event files under <workdir>/tensorboard/."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def _scalar(value: Any) -> float | None:
    """The value as a float if it is a real numeric scalar (Python, numpy, 0-d array), else None."""
    try:
        a = np.asarray(value)
    except Exception:  # objects numpy cannot take: not a scalar
        return None
    if a.ndim != 0 or a.dtype.kind not in "biuf":
        return None
    return float(a)


class MetricsLog:
    """Writes training/eval metric rows to <workdir>/metrics.jsonl and TensorBoard event files.

    Rows are appended (runs resume into the same workdir); each MetricsLog opens a new events file
    in <workdir>/tensorboard/, which TensorBoard merges. Both files are flushed after every row, so
    a crash loses nothing and TensorBoard shows a live run. With enabled=False (processes other
    than 0 of a multi-host run) every method is a no-op and no file is created.
    """

    def __init__(
        self, workdir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb_dir = Path(workdir) / "tensorboard"
        self._tb = None
        self._closed = False
        if not enabled:
            return
        if tensorboard:
            try:  # lazy: only TensorBoard output needs tensorboardX
                from tensorboardX import RecordWriter
                from tensorboardX.proto.event_pb2 import Event
                from tensorboardX.proto.summary_pb2 import (
                    Summary,  # tensorboardX only when TensorBoard files are on
                )
            except ImportError as e:
                raise ImportError(
                    "MetricsLog(tensorboard=True) needs the tensorboardX package: "
                    "`pip install tensorboardX`, or pass tensorboard=False."
                ) from e
            self._event, self._summary = Event, Summary
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            # Synchronous writes (tensorboardX's SummaryWriter queues events to a thread, and its
            # flush() does not wait for the queue). The pid and random suffix keep a writer opened
            # within the same second (a quick resume) from overwriting the previous file.
            self.tb_dir.mkdir(exist_ok=True)
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            name += f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._tb = RecordWriter(str(self.tb_dir / name))
            self._write_event(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write_event(self, event: Any) -> None:
        self._tb.write(event.SerializeToString())
        self._tb.flush()

    def write(self, row: dict) -> None:
        """Appends one JSON line; logs each numeric scalar (all but "step") to TensorBoard."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"MetricsLog for {self.path} is closed; open a new one to write.")
        if "step" not in row:
            raise KeyError(f"metric row needs a 'step' key; got keys {sorted(row)}")
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self._tb is not None:
            values = []
            for key, value in row.items():
                v = _scalar(value) if key != "step" else None
                if v is not None:  # lists, strings, None...: JSONL only
                    values.append(self._summary.Value(tag=key, simple_value=v))
            if values:
                summary = self._summary(value=values)
                event = self._event(wall_time=time.time(), step=int(row["step"]), summary=summary)
                self._write_event(event)

    def flush(self) -> None:
        """Flushes to disk (write() already does; kept for callers that flush explicitly)."""
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer; calling it again does nothing."""
        if self._tb is not None and not self._closed:
            self._tb.close()
        self._closed = True

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
