"""errors.run_cli: user mistakes become one `error:` line and exit 2; bugs keep tracebacks."""

import subprocess
import sys
import textwrap

import pytest

from llora_jax import errors
from llora_jax.data import DataError, DataNotFoundError
from llora_jax.task_vectors import TaskVectorError
from llora_jax.train.loop import TrainingDiverged


def _raise(err):
    raise err


def test_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        errors.run_cli(_raise, False, errors.UserError("bad value x\nuse y"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: bad value x; use y\n"


def test_verbose_adds_the_traceback(capsys):
    with pytest.raises(SystemExit):
        errors.run_cli(_raise, True, errors.ConfigError("steps must be >= 1"))
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("error: steps must be >= 1")


def test_programming_errors_propagate_unchanged():
    with pytest.raises(KeyError, match="oops"):
        errors.run_cli(_raise, False, KeyError("oops"))
    # A plain ValueError is not a user error: it keeps its traceback.
    with pytest.raises(ValueError, match="plain"):
        errors.run_cli(_raise, False, ValueError("plain"))


def test_return_value_passes_through():
    assert errors.run_cli(lambda a, b=0: a + b, False, 1, b=2) == 3


@pytest.mark.parametrize(
    "cls, base",
    [
        (DataError, ValueError),
        (DataNotFoundError, FileNotFoundError),
        (TaskVectorError, ValueError),
        (TrainingDiverged, RuntimeError),
        (errors.ConfigError, ValueError),
    ],
)
def test_library_errors_are_user_errors_and_keep_their_old_base(cls, base):
    assert issubclass(cls, errors.UserError) and issubclass(cls, base)


def test_real_process_exit_code_and_stderr(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from llora_jax import errors
            from llora_jax.data import DataError
            def main(kind):
                if kind == "user":
                    raise DataError("train.jsonl line 3: label 'x' is not a number")
                raise ZeroDivisionError("bug")
            errors.run_cli(main, "--verbose" in sys.argv, sys.argv[1])
            """
        )
    )
    user = subprocess.run([sys.executable, script, "user"], capture_output=True, text=True)
    assert user.returncode == 2
    assert user.stderr == "error: train.jsonl line 3: label 'x' is not a number\n"
    bug = subprocess.run([sys.executable, script, "bug"], capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ZeroDivisionError" in bug.stderr
