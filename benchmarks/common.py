"""Shared plumbing: timing statistics, environment description, result records.

Every measurement is a dict with the same fields (see :data:`MEASUREMENT_FIELDS`):
``name``, ``area``, ``config``, ``device``, ``versions``, ``unit``, ``median``, ``p10``,
``p90``, ``q25``, ``q75``, ``n``, ``derived`` (throughputs, FLOPs, memory, ...) and
``ratios`` (filled in where a comparison exists). A failed measurement keeps the same
fields with ``median`` None and the error text in ``error``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MEASUREMENT_FIELDS = (
    "name",
    "area",
    "config",
    "device",
    "versions",
    "unit",
    "median",
    "p10",
    "p90",
    "q25",
    "q75",
    "n",
    "derived",
    "ratios",
    "error",
)


def stats(samples: list[float] | np.ndarray) -> dict[str, float]:
    """Median and spread of timing samples (seconds)."""
    x = np.asarray(samples, np.float64)
    if x.size == 0:
        return {"median": None, "p10": None, "p90": None, "q25": None, "q75": None, "n": 0}
    q = np.percentile(x, [10, 25, 50, 75, 90])
    return {
        "median": float(q[2]),
        "p10": float(q[0]),
        "p90": float(q[4]),
        "q25": float(q[1]),
        "q75": float(q[3]),
        "n": int(x.size),
        "min": float(x.min()),
        "mean": float(x.mean()),
    }


def time_repeated(
    run_once: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, repeats: int
) -> list[float]:
    """Wall time of ``repeats`` calls of ``run_once``, each synchronised with the device.

    ``sync(result)`` must block until the device work of that call has finished
    (``jax.block_until_ready`` or ``torch.cuda.synchronize``).
    """
    for _ in range(warmup):
        sync(run_once())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(run_once())
        out.append(time.perf_counter() - t0)
    return out


def versions() -> dict[str, str | None]:
    """Versions of the packages that matter here (None where not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    from importlib import metadata

    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def jax_device() -> dict[str, Any]:
    import jax

    devs = jax.devices()
    d = devs[0]
    return {
        "platform": d.platform,
        "kind": getattr(d, "device_kind", str(d)),
        "count": len(devs),
        "backend": jax.default_backend(),
    }


def device_label(dev: dict[str, Any]) -> str:
    kind = str(dev.get("kind", "unknown")).replace(" ", "-")
    return "".join(c for c in kind if c.isalnum() or c in "-_.") or "unknown"


def measurement(
    name: str,
    area: str,
    config: dict,
    samples: list[float] | None = None,
    *,
    unit: str = "s",
    derived: dict | None = None,
    device: dict | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    s = stats(samples or [])
    return {
        "name": name,
        "area": area,
        "config": dict(config),
        "device": device,
        "versions": None,  # filled by Recorder.add
        "unit": unit,
        **s,
        "samples": [float(v) for v in samples[:64]] if samples else [],
        "derived": dict(derived or {}),
        "ratios": {},
        "error": error,
    }


class Recorder:
    """Collects measurements; rewrites ``path`` (JSON) after each one so a killed run keeps them."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: dict | None = None,
        deadline: float | None = None,
    ):
        """``deadline``: a ``time.time()`` after which remaining measurements are skipped."""
        self.path = Path(path) if path else None
        self.device = device
        self.items: list[dict] = []
        self.versions = versions()
        self.deadline = deadline
        self.area_wall_s: dict[str, float] = {}

    def skip_all(self, cases: Any, area: str, reason: str) -> None:
        """Record every case (anything with ``name`` and ``config()``) as skipped."""
        for c in cases:
            self.add(measurement(c.name, area, c.config(), error=f"skipped: {reason}"))

    def timed_area(self, area: str):
        """Context manager adding the wall time of a block to ``area_wall_s[area]``."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.area_wall_s[area] = self.area_wall_s.get(area, 0.0) + (
                    time.perf_counter() - t0
                )
                self.flush()

        return cm()

    def over_budget(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def fits(self, seconds: float) -> bool:
        """Whether work estimated at ``seconds`` ends before the deadline."""
        return seconds <= self.seconds_left()

    def add(self, m: dict) -> dict:
        m["device"] = m["device"] or self.device
        m["versions"] = self.versions
        self.items.append(m)
        label = f"{m['median'] * 1e3:9.2f} ms" if m["median"] is not None else "   failed"
        print(f"[bench] {m['name']:<48s} {label}", flush=True)
        if m.get("error"):
            print(f"[bench]   error: {m['error'].splitlines()[-1][:200]}", flush=True)
        self.flush()
        return m

    def guard(
        self, name: str, area: str, config: dict, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``fn(*args, **kwargs)``; on an exception (or when over budget) record a failure."""
        if self.over_budget():
            self.add(measurement(name, area, config, error="skipped: time budget exhausted"))
            return None
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001  (one failed config must not end the run)
            self.add(measurement(name, area, config, error=traceback.format_exc(limit=6)))

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        body = {"measurements": self.items, "area_wall_s": self.area_wall_s}
        tmp.write_text(portable(json.dumps(body, indent=1, default=_json_default)))
        tmp.replace(self.path)


def portable(text: str) -> str:
    """``text`` without this machine's paths (result files are committed and shared): the
    working directory's prefix dropped (tracebacks, commands), a device call's output
    folder written ``$OUT``."""
    text = text.replace(os.getcwd() + os.sep, "")
    out = os.environ.get("OUT")
    return text.replace(out.rstrip(os.sep) + os.sep, "$OUT/") if out else text


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def dump(obj: Any, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(portable(json.dumps(obj, indent=1, default=_json_default)))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line(module: str = "benchmarks.run") -> str:
    """The command that ran ``module`` with this process's arguments."""
    return " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]])
