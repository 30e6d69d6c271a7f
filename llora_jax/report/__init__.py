"""Study reports: ``results.json`` -> tables (``summary``), ``report.md`` (``markdown``), PNGs (``figures``)."""

from llora_jax.report.summary import (
    SECTIONS,
    load_results,
    render_markdown,
    stat,
    summarize,
    write_report,
)

__all__ = ["SECTIONS", "load_results", "render_markdown", "stat", "summarize", "write_report"]
