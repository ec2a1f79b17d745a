"""``hydra.utils.instantiate`` for mrl: our own user errors come through as themselves, and a component
that its settings fail to build becomes a user error naming its config node."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import OmegaConf

from mrl.errors import MRLError


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own user errors through unwrapped.

    Hydra wraps every exception raised by a target in an ``InstantiationException``; an
    :class:`MRLError` inside must reach the CLI as itself, to be printed as one clear paragraph.
    """
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err.__cause__
        while cause is not None:  # Hydra may wrap it twice (an import error locating the target)
            if isinstance(cause, MRLError):
                raise cause from None
            cause = cause.__cause__
        from lightning.pytorch.utilities.exceptions import MisconfigurationException

        if isinstance(err.__cause__, MisconfigurationException):
            raise  # the trainer's own message, worded by train() below
        raise config_error(node, err) from err


def config_error(node: Any, err: InstantiationException) -> MRLError:
    """The last resort for a component that its settings fail to build (the pre-flight checks in
    :mod:`mrl.config_checks` catch the known cases first): a user error naming the config node."""
    cause = err.__cause__ or err
    key = str(getattr(node, "_get_full_key", lambda _: "")(None) or "") if OmegaConf.is_config(node) else ""
    target = node.get("_target_") if hasattr(node, "get") else None
    where = f"{key} ({target})" if key else str(target or "a component")
    text = " ".join(str(cause).split()) or type(cause).__name__
    return MRLError(
        f"Could not build {where} from its settings: {type(cause).__name__}: {text}. Check the "
        f"{key + '.*' if key else 'related'} overrides; if they look right, rerun with HYDRA_FULL_ERROR=1 "
        "and report the traceback."
    )
