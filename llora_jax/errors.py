"""Errors a user can cause, and the one place that turns them into one CLI line.

A ``UserError`` is a mistake the user can fix (a bad config value, a missing file,
a run directory that holds another run): its message names what is wrong and how
to fix it, so the CLI prints it as one ``error: ...`` line with exit code 2 and no
traceback. Every other exception is a programming error and keeps its traceback.

Error classes of the library that describe user mistakes subclass ``UserError``
besides their historical base (``DataError(UserError, ValueError)``), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

__all__ = [
    "USER_ERROR_EXIT_CODE",
    "ConfigError",
    "UsageError",
    "UserError",
    "exit_with",
    "one_line",
    "run_cli",
]

USER_ERROR_EXIT_CODE = 2  # the usual exit status of a command-line usage mistake


class UserError(Exception):
    """A mistake the user can cause and fix; the message says how, in one line."""


class ConfigError(UserError, ValueError):
    """A configuration value or config-file argument that cannot be used."""


class UsageError(UserError):
    """A command line that cannot be run: an unknown command or flag, a missing flag."""


def one_line(message: str) -> str:
    """``message`` on one line (newlines become "; "), so logs and shells keep it whole."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts)


def exit_with(err: UserError, *, verbose: bool = False, stream: TextIO | None = None) -> NoReturn:
    """Print ``error: <message>`` (plus the traceback when verbose) and exit with code 2."""
    stream = stream or sys.stderr
    if verbose:
        traceback.print_exception(type(err), err, err.__traceback__, file=stream)
    print(f"error: {one_line(str(err)) or type(err).__name__}", file=stream)
    raise SystemExit(USER_ERROR_EXIT_CODE)


def run_cli(fn: Callable[..., Any], verbose: bool = False, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)``; a ``UserError`` becomes one ``error:`` line and exit 2.

    Programming errors (anything that is not a ``UserError``) propagate unchanged with
    their traceback: hiding them would hide the bug.
    """
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        exit_with(err, verbose=verbose)
