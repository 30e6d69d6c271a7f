"""Device time per kernel in a ``jax.profiler`` trace: where a profiled pass spent the GPU.

    python -m benchmarks.trace_summary TRACE_DIR_OR_FILE [--top N]

Reads the ``*.trace.json.gz`` that ``jax.profiler.trace`` writes (e.g. ``make bench-text
ARGS="--profile DIR"``) and sums the durations of the events on the device's streams by kernel
name: total ms, share of the device's busy time, and how many launches.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def trace_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    found = sorted(p.rglob("*.trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {p}: pass a jax.profiler trace dir")
    return found[-1]


def kernel_table(path: str | Path) -> list[tuple[str, float, float, int]]:
    """[(kernel, total ms, share of device busy time, launches)], largest first."""
    events = json.load(gzip.open(trace_file(path)))["traceEvents"]
    devices = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "/device:" in e.get("args", {}).get("name", "")
    }
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices and e.get("dur"):
            total[e["name"]] += float(e["dur"])
            count[e["name"]] += 1
    busy = sum(total.values()) or 1.0
    return [(k, v / 1e3, v / busy, count[k]) for k, v in total.most_common()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    rows = kernel_table(a.trace)
    print(f"device busy {sum(r[1] for r in rows):.1f} ms in {sum(r[3] for r in rows)} launches")
    for name, ms, share, n in rows[: a.top]:
        print(f"{ms:9.1f} ms {100 * share:5.1f}% {n:6d}x  {name[:100]}")


if __name__ == "__main__":
    main()
