"""errors.run_cli: user mistakes become one `error:` line and exit 2; bugs keep tracebacks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llora_jax import errors
from llora_jax.data import DataError, DataNotFoundError
from llora_jax.task_vectors import TaskVectorError
from llora_jax.train.loop import TrainingDiverged
from tests.conftest import data_dir


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


# ----------------------------------------------------------------------------- the real CLI

ROOT = Path(__file__).resolve().parents[1]

CLI_CASES = [
    # (arguments, what the one error line must say)
    (
        ["finetune", "--config=configs/minilm.py:tny"],
        "unknown config argument(s) 'tny'; valid: tiny",
    ),
    (
        ["finetune", "--config=configs/minilm.py:tiny", "--config.optim.lerning_rate=3"],
        "--config.optim.lerning_rate: the config has no field 'lerning_rate' (did you mean \"learning_rate\"?)",
    ),
    (
        ["finetune", "--config=configs/minilm.py:tiny", "--config.steps=abc"],
        "flag --config.steps=abc: invalid literal for int()",
    ),
    (["finetune", "--config=configs/nope.py", "--workdir=x"], "--config: "),
    (
        [
            "finetune",
            "--config=configs/minilm.py:tiny",
            "--config.steps=0",
            "--config.lora.rank=0",
            "--workdir=x",
        ],
        "2 problem(s) in the config: lora.rank must be >= 1, got 0; steps must be >= 1, got 0",
    ),
    (["finetune", "--config=configs/minilm.py:tiny"], "--workdir is required"),
    (["frobnicate"], "commands: finetune, finetune-all"),
    (["fuse", "--runs=a,b", "--fusion=tie"], "unknown fusion method(s) ['tie']"),
    (["fuse", "--runs=a,./a", "--fusion=ties"], "more than once"),
    (
        [
            "finetune-all",
            "--config=configs/minilm.py:tiny",
            "--tasks=rte,nosuchtask",
            "--workdir=wd",
            "--config.backbone=/nonexistent",
            "--config.data.data_dir=DATA",
        ],
        "unknown task 'nosuchtask'",
    ),
]


def _cli(args, cwd, extra_env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("LLORA_DATA_DIR", None)
    env.update(extra_env or {})
    script = "import sys; from llora_jax.cli.main import entry; entry(sys.argv)"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_cli_mistake_is_one_error_line_with_exit_code_2(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for args, expected in CLI_CASES:
        args = [a.replace("=DATA", f"={data_dir()}") for a in args]
        p = _cli(args, tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (args, p.stderr)
        assert lines[0].startswith("error: ") and expected in lines[0], (args, lines)
        assert not (tmp_path / "wd").exists() and not (tmp_path / "x").exists()


def test_verbose_shows_the_traceback_of_a_config_file_error(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    p = _cli(["finetune", "--config=configs/minilm.py:tny", "--verbose"], tmp_path)
    assert p.returncode == 2 and "Traceback" in p.stderr and "parse_arg" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: configs/minilm.py: unknown")
