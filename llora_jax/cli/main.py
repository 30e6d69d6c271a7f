"""Thin command-line entry point: ``llora <command> --config=...`` (``python -m llora_jax.cli``).

Commands:
  finetune      fine-tune one task; writes <workdir>/task_vector and metrics.json
  finetune-all  fine-tune every task listed in --tasks into <workdir>/<task>/<method>
  fuse          merge the task vectors of --runs (every subset), choose hyper-parameters
                on validation, score on test; writes results.json + report.md to --out
  disentangle   disentanglement-error heatmap for the two task vectors of --runs
  report        tables and figures from --results=results.json
  study         run a whole study (experiments/<study>/study.py)

Every library function takes explicit arguments; only this file and
``experiment.py`` read configs.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from llora_jax import experiment
from llora_jax.cli import analysis as cli_analysis
from llora_jax.cli import predict as cli_predict
from llora_jax.data import DataError, DataNotFoundError
from llora_jax.study import runner as study
from llora_jax.study.spec import StudySpecError
from llora_jax.task_vectors import TaskVectorError
from llora_jax.train.loop import TrainingDiverged

COMMANDS = ("finetune", "finetune-all", "fuse", "disentangle", "report", "study", "predict")

_CONFIG = config_flags.DEFINE_config_file("config", None, "fine-tuning config file (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory of the run")
_TASKS = flags.DEFINE_list("tasks", [], "tasks for finetune-all / fuse / study")
_RUNS = flags.DEFINE_list("runs", [], "run directories (each with config.json and task_vector/)")
_FUSION = flags.DEFINE_list(
    "fusion", [], "fusion methods for `fuse` (default: task_arithmetic,ties)"
)
_RESULTS = flags.DEFINE_string("results", None, "results.json for `report`")
_OUT = flags.DEFINE_string("out", None, "output directory for fuse / disentangle / report")
_STUDY = flags.DEFINE_string("study", None, "study file (experiments/<study>/study.py)")
_STUDY_ARG = flags.DEFINE_string("study_arg", "", "argument passed to the study's get_study()")
_SET = flags.DEFINE_multi_string(
    "set",
    [],
    "study: set a study field, field=value (e.g. seeds=[1,2]), or a fine-tuning config field, "
    "config.<dotted.key>=value (e.g. config.steps=10); repeatable",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() first (multi-host GPU / TPU pods)"
)


def _need(flag, name: str):
    if flag.value is None:
        raise app.UsageError(f"--{name} is required for this command")
    return flag.value


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: llora <command> [flags]; commands: {', '.join(COMMANDS)}")
    cmd = argv[1]
    # Orbax and absl log every checkpoint step at INFO; keep the console for progress bars.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if cmd == "finetune":
        c = _need(_CONFIG, "config")
        metrics = experiment.run_finetune(c, _need(_WORKDIR, "workdir"))
        print(f"task vector: {os.path.join(_WORKDIR.value, 'task_vector')}")
        for k, v in sorted(metrics.items()):
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    elif cmd == "finetune-all":
        c = _need(_CONFIG, "config")
        tasks = _TASKS.value
        if not tasks:
            raise app.UsageError("--tasks=a,b,c is required for finetune-all")
        cache = experiment.BackboneCache()
        root = _need(_WORKDIR, "workdir")
        for t in tasks:
            ct = c.copy_and_resolve_references()
            ct.task = t
            wd = os.path.join(root, t, c.method)
            print(f"== {t} -> {wd}")
            experiment.run_finetune(ct, wd, cache)
    elif cmd == "study":
        study.run_study_file(
            _need(_STUDY, "study"),
            _STUDY_ARG.value,
            out=_OUT.value,
            sets=_SET.value,
        )
    elif cmd == "predict":
        cli_predict.run()
    else:
        cli_analysis.run(
            cmd, runs=_RUNS.value, fusion=_FUSION.value, out=_OUT.value, results=_RESULTS.value
        )


def _main_with_clear_errors(argv: list[str]) -> None:
    try:
        main(argv)
    except (DataError, DataNotFoundError, TaskVectorError, TrainingDiverged, StudySpecError) as e:
        # Errors a user can cause and fix: the message says how; no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    # Configs import `configs.common`: make the repository root importable.
    sys.path.insert(0, os.getcwd())
    app.run(_main_with_clear_errors)


if __name__ == "__main__":
    entry()
