"""The run's loggers from config, and W&B's online/offline decision (credentials, server reachable)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, open_dict

from mrl.instantiate import instantiate

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node or not node.get("_target_"):
            continue
        if node._target_.endswith("WandbLogger") and not node.get("offline", False):
            node = wandb_online_or_offline(node)
        # plain dicts and lists: wandb.init validates its `settings` and rejects an OmegaConf node
        logger = instantiate(node, _convert_="all")
        if isinstance(logger, WandbLogger):
            # Lightning always passes anonymous=None, which wandb warns about on every run (no effect)
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    return loggers


def wandb_online_or_offline(node: DictConfig) -> DictConfig:
    """Online W&B without credentials (or without a reachable server) logs offline instead of failing
    the job: the run directory can be uploaded later with ``wandb sync``."""
    if os.environ.get("WANDB_MODE") == "":
        # An empty WANDB_MODE (e.g. `WANDB_MODE= mrl-train`) makes wandb reject its own settings; it
        # means "not set".
        del os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return node
    # Checked without wandb.login(): a failed login leaves wandb's global settings in a state where the
    # offline run afterwards still asks for a key.
    if not wandb_credentials_available():
        reason = "no W&B credentials found (run `wandb login` or set WANDB_API_KEY)"
    else:
        reason = wandb_server_unreachable()
        if reason is None:
            return node
    log.warning(
        "logger.wandb.offline=false but %s: logging offline instead; upload later with `wandb sync`.", reason
    )
    warnings.warn(f"W&B online requested but {reason}; logging offline.", stacklevel=2)
    node = node.copy()
    with open_dict(node):
        node.offline = True
    return node


def wandb_credentials_available() -> bool:
    """An API key in WANDB_API_KEY or in the netrc entry of the W&B host (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_server_unreachable(timeout: float = 5.0) -> str | None:
    """Why the W&B server cannot be reached (None when it can). A TCP connection is enough to tell: with
    credentials but no network, wandb.init would instead wait for its init timeout (90 s) and then fail
    the job."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"the W&B server {url.hostname}:{port} is not reachable ({err.strerror or err})"


def define_metrics(run: Any, sizes: list[int], depth_stages: Sequence[int] = ()) -> None:
    """How W&B shows the run's metrics: epoch-level curves against ``epoch``, and each size's validation
    accuracy (and top-5) summarised by its best and its last value, the loss by its lowest and last, so
    the runs table and sweep views show every size's best accuracy without custom code. Exact names,
    not globs: they take precedence over Lightning's ``*`` -> ``trainer/global_step`` definition.
    ``depth_stages``: the earlier stages' accuracies (``head.depth_stages``) are shown the same way."""
    run.define_metric("epoch")
    for name in sorted(aggregated(sizes, depth_stages)):
        run.define_metric(name, step_metric="epoch", summary="min,last" if name == "val/loss" else "max,last")


def aggregated(sizes: list[int], depth_stages: Sequence[int] = ()) -> set[str]:
    """The keys :func:`define_metrics` summarises itself (the final summary must not overwrite them)."""
    prefixes = ["", *(f"depth{s}/" for s in depth_stages)]
    return {
        f"{stage}/{prefix}{name}@{d}"
        for d in sizes
        for prefix in prefixes
        for stage, name in (("val", "acc"), ("val", "top5"), ("train", "acc"))
        if not (prefix and name == "top5")
    } | {"val/loss"}
