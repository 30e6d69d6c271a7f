"""The capacity study's report (placeholder until the tables are written)."""

from __future__ import annotations

from pathlib import Path


def write_capacity_report(collected: dict, out: Path) -> Path:
    path = Path(out) / "report.md"
    path.write_text(f"# {collected['study']}\n\nblocks: {', '.join(collected['blocks'])}\n")
    return path
