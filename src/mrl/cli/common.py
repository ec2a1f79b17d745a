"""What every mrl command shares: config location, resolvers, and how user errors are reported."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from mrl.errors import MRLError, user_message


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
