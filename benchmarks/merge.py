"""Join the results of several benchmark runs into one file and table.

``python -m benchmarks.merge PATH... [--out DIR]``: each PATH is a result JSON written by
``benchmarks.run``, a part file of a stopped run (``parts-*/jax.json``), or a folder
holding either (searched recursively). Measurements are concatenated in the order given;
where several runs measured the same name on the same device kind, the last successful one
is kept (a skipped or failed entry never replaces a measured one); on different device kinds
both stay. Cross-measurement ratios, MFU and targets are recomputed over the union, pairing
measurements of the same device kind where there are several (a T5 step from one call meets
its PyTorch twin from another). Every measurement records its ``run`` (the source's time
stamp); every run's matmul peak is kept, and MFU divides by the peak of the same run (the
median of the device kind's peaks for a run that measured none). The merged file lists every
source.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import device_label, dump, now_iso, versions

STAMP_LEN = len("2026-11-23T031446Z")  # the run's time stamp that starts its file names


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += _in_folder(p)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such result file or folder")
    return out


def _in_folder(folder: Path) -> list[Path]:
    """Result files, plus the part files of runs that were stopped before writing theirs."""
    found = sorted(folder.rglob("*.json"))
    results = [q for q in found if not q.parent.name.startswith("parts-")]
    covered = {q.parent / f"parts-{q.name[:STAMP_LEN]}" for q in results}
    parts = [q for q in found if q.parent.name.startswith("parts-") and q.parent not in covered]
    return results + parts


def merge(paths: list[str]) -> dict:
    files = _files(paths)
    if not files:
        raise FileNotFoundError(f"no result files under {', '.join(paths)}")
    by_key: dict[tuple[str, str], dict] = {}
    sources = []
    for f in files:
        body = json.loads(f.read_text())
        ms = body.get("measurements")
        if ms is None:
            raise ValueError(f"{f}: not a benchmark result (no 'measurements')")
        sources.append(
            {"path": str(f), "command": body.get("command"), "date": body.get("date"), "n": len(ms)}
        )
        run = f.name[:STAMP_LEN] if f.name[:4].isdigit() else f.parent.name[-STAMP_LEN:]
        for m in ms:
            # The run a measurement came from (kept through later merges): MFU divides by the
            # matmul peak of the same run, so every run's peak is kept.
            m.setdefault("run", run)
            key = (m["name"], report.device_kind(m))  # one entry per name and device kind
            if m.get("area") == "peak":
                key = (*key, m["run"])
            old = by_key.get(key)
            if old is not None and m.get("median") is None and old.get("median") is not None:
                continue
            by_key[key] = m
    # Ratios a benchmark computed itself (scaling, pipeline headroom, disentanglement) stay;
    # the cross-measurement ones are recomputed over the union.
    measured = {k[0] for k, m in by_key.items() if m.get("median") is not None}
    # A skipped/failed entry whose name was measured on another device says nothing more.
    measurements = [
        m for k, m in by_key.items() if m.get("median") is not None or k[0] not in measured
    ]
    targets = report.finalize(measurements)
    devices = []
    for m in measurements:
        if m.get("device") and m["device"] not in devices:
            devices.append(m["device"])
    return {
        "command": "python -m benchmarks.merge " + " ".join(paths),
        "date": now_iso(),
        "device": devices[0] if devices else {"kind": "unknown"},
        "devices": devices,
        "versions": versions(),
        "sources": sources,
        "measurements": measurements,
        "targets": targets,
        "summary": report.summary(measurements),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.merge", description=__doc__.split("\n")[0]
    )
    p.add_argument("paths", nargs="+", help="result JSONs, part files or folders")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    args = p.parse_args(argv)
    result = merge(args.paths)
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    path = Path(args.out) / f"{stamp}-{device_label(result['device'])}-merged.json"
    dump(result, path)
    print(report.table(result["measurements"], result["targets"]))
    print(f"\nwrote {path} ({len(result['sources'])} sources)")
    return result


if __name__ == "__main__":
    main()
