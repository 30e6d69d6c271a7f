"""Shared test set-up: float32 CPU, no network, and small helpers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402


def data_dir() -> pathlib.Path:
    """The shared offline data (LLORA_DATA_DIR); skips when unset (fails in CI via the hook)."""
    d = os.environ.get("LLORA_DATA_DIR")
    if not d or not pathlib.Path(d).is_dir():
        pytest.skip("LLORA_DATA_DIR is not set to the shared data directory")
    return pathlib.Path(d)


def pytest_sessionfinish(session, exitstatus):
    # CI sets LLORA_FAIL_ON_SKIP=1: a skipped test there means something the suite
    # promises (the real data, the real MiniLM weights) was not checked.
    if os.environ.get("LLORA_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(
            f"LLORA_FAIL_ON_SKIP=1: {len(skipped)} test(s) skipped; failing the run", red=True
        )
        session.exitstatus = 1
