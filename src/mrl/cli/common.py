"""What every mrl command shares: config location, resolvers, and how user errors are reported."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mrl.errors import MRLError, user_message


def register_resolvers() -> None:
    """``${mrl_uid:}``: a short random id, fixed for the whole config (cached), added to output dir
    names so that jobs started in the same second never share a directory."""
    if not OmegaConf.has_resolver("mrl_uid"):
        OmegaConf.register_new_resolver("mrl_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
    if not OmegaConf.has_resolver("mrl_linear_lr"):
        OmegaConf.register_new_resolver("mrl_linear_lr", linear_lr)


def linear_lr(base_lr: float, base_batch: int, batch_per_device: int, devices: int, nodes: int = 1) -> float:
    """``${mrl_linear_lr:base_lr,base_batch,batch,devices,nodes}``: the linear scaling rule (Goyal et al.),
    so a recipe tuned for one global batch keeps working on fewer or more GPUs. ``devices`` must be a
    count (a recipe that uses this sets ``trainer.devices`` explicitly, not -1)."""
    if int(devices) < 1 or int(nodes) < 1:
        raise MRLError(
            f"The learning rate scales with the number of GPUs, but trainer.devices={devices} and "
            f"trainer.num_nodes={nodes}; set trainer.devices=<number of GPUs per node>."
        )
    return float(base_lr) * int(batch_per_device) * int(devices) * int(nodes) / int(base_batch)


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
