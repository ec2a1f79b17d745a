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


def hydra_quote(text: str) -> str:
    """``text`` as one quoted value of Hydra's override grammar (for ``key=<value>``)."""
    from hydra.core.override_parser.types import Quote, QuotedString

    return QuotedString(text=text, quote=Quote.single).with_quotes()


def _parses(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(arg)
    except HydraException:  # the lexer's errors are no OverrideParseException
        return False
    return True


def _plain_text(part: str) -> bool:
    """A value a shell user means as text, not as Hydra syntax: a path (``/``, ``~``, ``.``) or a word
    with characters outside ASCII; not a list, dict, quoted string or interpolation."""
    if not part or part[0] in "[{'\"" or "${" in part:
        return False
    return "/" in part or part[0] in "~." or not part.isascii()


def hydra_argv(argv: list[str]) -> list[str]:
    """``argv`` with every value Hydra's grammar cannot read but a shell user means as plain text quoted
    the way Hydra wants it: ``ckpt_path=/data/mes runs é/last.ckpt`` (the shell took the user's quotes
    away) becomes ``ckpt_path='/data/mes runs é/last.ckpt'``. Hydra's grammar takes no character outside
    ASCII, nor ``( ) # &`` unquoted, and would stop with a parser traceback. A comma-separated sweep keeps
    its commas (each path quoted on its own); values Hydra reads, and Hydra syntax that is wrong
    (``head.nesting=[4,8``), are left for Hydra to judge. Every command's pre-checks and Hydra then read
    the same, unquoted values (:func:`command_line_value`)."""
    out = argv[:1]
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or _parses(arg):
            out.append(arg)
            continue
        parts = value.split(",")
        quoted = ",".join(
            hydra_quote(p) if _plain_text(p) and not _parses(f"{key}={p}") else p for p in parts
        )
        out.append(f"{key}={quoted}" if _parses(f"{key}={quoted}") else arg)
    return out


def command_line_value(argv: list[str], key: str) -> str | None:
    """The last value ``argv`` gives ``key`` (``key=value``, ``+key=``, ``++key=``) as Hydra reads it
    (quotes and escapes removed); None when it gives none, null, a sweep, or one Hydra must interpolate
    first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    value = None
    for arg in argv[1:]:
        name, sep, _ = arg.partition("=")
        if sep and not arg.startswith("-") and name.lstrip("+~") == key:
            try:
                parsed = OverridesParser.create().parse_override(arg).value()
            except HydraException:  # the lexer's errors are no OverrideParseException
                parsed = None  # Hydra reports it
            value = None if parsed is None or isinstance(parsed, (list, dict)) else parsed
            value = None if value is not None and not isinstance(value, (str, int, float)) else value
    text = None if value is None else str(value)
    return text if text and "${" not in text else None


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
