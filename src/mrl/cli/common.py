"""What every mrl command shares: config location, resolvers, and how user errors are reported."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from mrl.errors import MRLError, user_message
from mrl.files import unwritable


def report_user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print an :class:`MRLError` as one paragraph and exit 1 (a traceback only with HYDRA_FULL_ERROR=1)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MRLError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            fail(user_message(err))
        except OmegaConfBaseException as err:
            # The last resort for a config that cannot be read where it is first used (an interpolation of
            # a missing key, a value of the wrong type): a user error, not a crash.
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            fail(
                f"The config cannot be used: {reason}. Fix the override or interpolation (${{...}}) it names."
            )

    return wrapper


TRACEBACK_HINT = "(Set HYDRA_FULL_ERROR=1 for the full traceback.)"


def fail(message: str, hint: str | None = TRACEBACK_HINT) -> None:
    """Print ``message`` as one paragraph (the terminal wraps it), then ``hint``, and exit 1. Commands
    that are not Hydra apps pass their own hint, or None."""
    text = " ".join(message.split())
    print(f"\nError: {text}" + (f"\n{hint}" if hint else ""), file=sys.stderr, flush=True)
    sys.exit(1)


# Hydra's flags that print and exit: they write nothing.
INFO_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")


def command_line_value(argv: list[str], key: str) -> str | None:
    """The last value ``argv`` gives ``key`` (``key=value``, ``+key=``, ``++key=``), unquoted; None when
    it gives none or one Hydra must interpolate first."""
    value = None
    for arg in argv[1:]:
        name, sep, given = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = given.strip().strip("'\"")
    return value if value and "${" not in value else None


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv[1:])


def named_job_dir(argv: list[str]) -> Path | None:
    """The directory a Hydra command's job (or sweep, with -m) writes into when the command line names it
    (``hydra.run.dir=``, ``hydra.sweep.dir=``); None when Hydra will compose it."""
    value = command_line_value(argv, "hydra.sweep.dir" if is_multirun(argv) else "hydra.run.dir")
    return Path(value).expanduser().absolute() if value else None


def check_output_location(argv: list[str], consequence: str) -> None:
    """Fail before Hydra creates anything when the output location cannot be written.

    Hydra makes the job directory itself, before any of our code runs, and reports a failure there
    with a traceback; so the directory named on the command line (or ``MRL_LOG_DIR``, default
    ``logs``) is checked here: its nearest existing ancestor must be a writable directory.
    ``consequence`` ends the message: what did not happen (``no training started``).
    """
    if any(a in INFO_FLAGS for a in argv[1:]):
        return
    log_dir = command_line_value(argv, "paths.log_dir") or os.environ.get("MRL_LOG_DIR") or "logs"
    path = named_job_dir(argv) or Path(log_dir).expanduser().absolute()
    reason = unwritable(path)
    if reason:
        what = "write into" if path.is_dir() else "create"
        fail(
            f"Cannot {what} the output directory {path}: {reason}. Choose a writable place with "
            f"paths.log_dir=<dir>, hydra.run.dir=<dir> or MRL_LOG_DIR=<dir>; nothing was written and "
            f"{consequence}."
        )
