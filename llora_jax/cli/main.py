"""Thin command-line entry point: ``llora <command> --config=...`` (``python -m llora_jax.cli``).

Commands:
  finetune      fine-tune one task; writes <workdir>/task_vector and metrics.json
  finetune-all  fine-tune every task listed in --tasks into <workdir>/<task>/<method>
  fuse          merge the task vectors of --runs (every subset), choose hyper-parameters
                on validation, score on test; writes results.json + report.md to --out
  disentangle   disentanglement-error heatmap for the two task vectors of --runs
  report        tables and figures from --results=results.json
  study         run a whole study (experiments/<study>/study.py)

Errors a user can cause (a bad flag, config value or config-file argument, missing
data, a workdir that holds another run, a divergence...) end the command with one
``error: ...`` line and exit code 2 (``errors.run_cli``); ``--verbose`` adds the
traceback. Flags are parsed inside that wrapper, so that an error raised while the
config file is read is one line too. Programming errors keep their traceback.

A new command is a function taking no arguments, registered in ``COMMANDS`` (other
modules of ``llora_jax.cli`` define theirs and are registered here, one line each).
Every library function takes explicit arguments; only this package and
``experiment.py`` read configs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import jax
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from llora_jax import config_checks, errors, experiment, fusion
from llora_jax.cli import analysis as cli_analysis
from llora_jax.study import runner as study

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
_RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "finetune / finetune-all: move the workdir's old run to <workdir>.old-<time> and start "
    "over (needed to re-run a workdir with other settings)",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "show the traceback of an error")


def _need(flag, name: str):
    if flag.value is None:
        raise errors.UsageError(f"--{name} is required for this command")
    return flag.value


def _config():
    """The --config, validated (types, ranges, names) before any data or weights load."""
    c = _need(_CONFIG, "config")
    try:
        c = c.copy_and_resolve_references()
    except OSError as err:  # ml_collections reports an unreadable config file on first use
        raise errors.UsageError(f"--config: {errors.one_line(str(err))}") from err
    config_checks.validate_run_config(c)
    return c


def finetune() -> None:
    c, wd = _config(), _need(_WORKDIR, "workdir")
    metrics = experiment.run_finetune(c, wd, restart=_RESTART.value)
    print(f"task vector: {os.path.join(wd, 'task_vector')}")
    for k, v in sorted(metrics.items()):
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


def finetune_all() -> None:
    c, root = _config(), _need(_WORKDIR, "workdir")
    if not _TASKS.value:
        raise errors.UsageError("--tasks=a,b,c is required for finetune-all")
    configs = []
    for t in _TASKS.value:
        ct = c.copy_and_resolve_references()
        ct.task = t
        config_checks.validate_run_config(ct)
        configs.append(ct)
    for ct in configs:  # every task's data, before the first one trains
        experiment.load_splits(ct)
    cache = experiment.BackboneCache()
    for ct in configs:
        wd = os.path.join(root, ct.task, c.method)
        print(f"== {ct.task} -> {wd}")
        experiment.run_finetune(ct, wd, cache, restart=_RESTART.value)


def run_study() -> None:
    study.run_study_file(_need(_STUDY, "study"), _STUDY_ARG.value, out=_OUT.value, sets=_SET.value)


def analysis(cmd: str) -> Callable[[], None]:
    def command() -> None:
        names = list(_FUSION.value)
        if names:
            config_checks.validate_fusion_names(names, fusion.FUSION_METHODS)
        cli_analysis.run(
            cmd, runs=_RUNS.value, fusion=names, out=_OUT.value, results=_RESULTS.value
        )

    return command


COMMANDS: dict[str, Callable[[], None]] = {
    "finetune": finetune,
    "finetune-all": finetune_all,
    "fuse": analysis("fuse"),
    "disentangle": analysis("disentangle"),
    "report": analysis("report"),
    "study": run_study,
}


def main(argv: list[str]) -> None:
    """Run the command named in ``argv`` (flags already parsed)."""
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise errors.UsageError(
            f"usage: llora <command> [flags]; commands: {', '.join(COMMANDS)}"
            + (f" (got {' '.join(argv[1:])!r})" if len(argv) > 1 else "")
        )
    # Orbax and absl log every checkpoint step at INFO; keep the console for progress bars.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    COMMANDS[argv[1]]()


def _causes(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _flag_error(err: Exception, argv: list[str]) -> BaseException:
    """The error to report for ``err``, raised while the flags (and the config file) parse."""
    # The innermost: ml_collections re-raises a config file's error as a copy whose message
    # embeds the traceback; the original (e.g. configs/common.py's ConfigError) is inside.
    for cause in reversed(_causes(err)):
        if isinstance(cause, errors.UserError):
            return cause
    if isinstance(err, flags.Error):
        lines = [line for line in str(err).splitlines() if line.strip()]
        # A config file that raised: absl's message embeds its traceback; keep the error line.
        text = f"{lines[0]} {lines[-1]}" if any("Traceback" in x for x in lines) else str(err)
        return errors.UsageError(errors.one_line(text))
    if isinstance(err, (AttributeError, KeyError)):  # --config.<field> of no such field
        name = next((c.args[0] for c in reversed(_causes(err)) if c.args), str(err))
        hint = re.search(r'Did you mean "([^"]+)"', str(err))
        fix = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a]
        flag = given[0] if given else f"--config.{name}"
        return errors.UsageError(
            f"{flag}: the config has no field {name!r}{fix}; the fields are those of the "
            "config file (configs/common.py and its extras)"
        )
    if isinstance(err, OSError):  # the config file cannot be read
        return errors.UsageError(f"--config: {errors.one_line(str(err))}")
    return err


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every user mistake turned into a ``UserError``."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
        reported = _flag_error(err, argv)
        if reported is err:
            raise
        if any(reported is c for c in _causes(err)):
            raise reported from None  # its own traceback is where the config file raised
        raise reported from err


def _run(argv: list[str]) -> None:
    main(parse_flags(argv))


def entry(argv: list[str] | None = None) -> None:
    """The ``llora`` console script."""
    sys.path.insert(0, os.getcwd())  # configs import `configs.common`
    argv = list(sys.argv if argv is None else argv)
    # Known before the flags parse: a parse error is reported with its traceback too.
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True", "-verbose") for a in argv)
    errors.run_cli(_run, verbose, argv)


if __name__ == "__main__":
    entry()
