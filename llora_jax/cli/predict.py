"""``llora predict``: batch prediction over a bank of adapters, one adapter per input row.

    llora predict --bank DIR --input rows.jsonl --out preds.jsonl [--capacity C] [--batch-size B]

``DIR`` holds task-vector directories (one per adapter, named by its folder: what
``finetune`` / ``finetune-all`` / ``study`` / ``import-peft`` write). Each row of
``rows.jsonl`` is ``{"adapter": <folder name> | null, <the task's fields>, "id": ...}``
(``null`` = the bare base model; such a row needs ``"task"`` when the bank serves
several tasks). The task models (backbone, head, encoding) come from the fine-tuning
config stored in each task vector's ``meta.json``; for adapters without one (imported
PEFT adapters) pass ``--config=<config file>``. Every row is checked before any model
loads; the output appears only when complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from absl import flags

from llora_jax import experiment
from llora_jax.errors import UserError, run_cli
from llora_jax.serving import row_tasks
from llora_jax.serving.bank import AdapterBank
from llora_jax.serving.predict import PredictInputError, predict_file, read_rows

_BANK = flags.DEFINE_string("bank", None, "predict: directory of task-vector directories")
_INPUT = flags.DEFINE_string("input", None, "predict: rows.jsonl, one {adapter, fields} a line")
_CAPACITY = flags.DEFINE_integer(
    "capacity", 64, "predict: adapters held on the device at once (LRU cache slots)"
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "predict: rows per batch (fixed batch shape)")
flags.DEFINE_alias("batch-size", "batch_size")
_IMPL = flags.DEFINE_enum(
    "impl",
    "auto",
    ["auto", "gather", "ragged", "onehot", "shared_a", "dense"],
    "predict: routed implementation (auto chooses by bank kind and size)",
)


class PredictUsageError(UserError, ValueError):
    """A missing flag or an unusable bank for ``llora predict``."""


def predict_command(
    bank_dir: str | Path,
    input_jsonl: str | Path,
    out_jsonl: str | Path,
    *,
    capacity: int = 64,
    batch_size: int = 32,
    config: Any | None = None,
    impl: str = "auto",
    progress: bool = True,
) -> dict:
    """Everything ``llora predict`` does, as a function (tests and scripts call it)."""
    if capacity < 1 or batch_size < 1:
        raise PredictUsageError(
            f"--capacity and --batch-size must be >= 1, got {capacity} and {batch_size}"
        )
    try:
        bank = AdapterBank.from_directory(bank_dir, capacity=capacity)
    except ValueError as e:
        raise PredictUsageError(f"--bank {bank_dir}: {e}") from e
    # Every row is parsed and its adapter checked before any model loads.
    read_rows(bank, input_jsonl)
    # One config: every row is its task's; else each adapter's stored config.
    tasks = (
        row_tasks.row_task_from_config(config, experiment.BackboneCache())
        if config is not None
        else row_tasks.tasks_from_configs(bank.metas)
    )
    out = predict_file(
        bank,
        tasks,
        input_jsonl,
        out_jsonl,
        batch_size=batch_size,
        impl=impl,
        progress=progress,
    )
    logging.info("memory: %s", bank.memory_report())
    return out


def run() -> None:
    """The ``predict`` command with its flags (``--out`` and ``--config`` are main's)."""
    missing = [f"--{n}" for n, v in (("bank", _BANK.value), ("input", _INPUT.value)) if v is None]
    if flags.FLAGS.out is None:
        missing.append("--out")
    if missing:
        raise PredictUsageError(
            f"llora predict needs {', '.join(missing)}: llora predict --bank DIR "
            "--input rows.jsonl --out preds.jsonl [--capacity C] [--batch-size B]"
        )
    # A UserError (bad rows, unknown adapters, a bank that cannot serve) is one line.
    summary = run_cli(
        predict_command,
        False,
        _BANK.value,
        _INPUT.value,
        flags.FLAGS.out,
        capacity=_CAPACITY.value,
        batch_size=_BATCH.value,
        config=flags.FLAGS.config,
        impl=_IMPL.value,
    )
    print(f"{summary['rows']} predictions: {summary['out']}")


__all__ = ["PredictInputError", "PredictUsageError", "predict_command", "run"]
