"""What ``mrl-train`` and ``mrl-eval`` check before they write anything or start work.

Each feature's checks judge its single values (:mod:`mrl.training.checks` an ``mrl-train`` config's,
:mod:`mrl.eval.checks` an ``mrl-eval`` config's, with the generic ones of :mod:`mrl.config_checks`);
this module runs them and adds the checks that need a little more: building the optimizer and schedule
on a stand-in parameter (so any setting their factories reject is refused now, not after the first
epoch), composing ``evaluate=``'s mrl-eval config, and, once the model is built, the metric and size
names that depend on its measured embedding size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mrl.config_checks import check_known_keys
from mrl.errors import MRLError
from mrl.training.checks import check_optimized_metric, check_train_config, logged_stages


def plain(cfg: Any) -> dict[str, Any]:
    """A resolved config as plain dicts and lists (what the checks take)."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def resolve(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every interpolation resolved; one that cannot be (a missing key, a bad resolver
    argument) is a user error naming it."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        where = f" (in {err.full_key})" if getattr(err, "full_key", None) else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MRLError(
            f"The config cannot be resolved: {reason}{where}. Fix the override or interpolation (${{...}}) "
            "it names."
        ) from err


# What every mrl-train run directory's resolved_config.yaml holds (the groups train() builds from).
RUN_CONFIG_KEYS = ("data", "backbone", "head", "trainer", "paths")


def check_run_config_file(path: Path) -> None:
    """``resume=``'s ``resolved_config.yaml`` must be a readable mrl-train config."""
    try:
        config = OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
        reason = _reason(err)
        if isinstance(err, yaml.MarkedYAMLError) and err.problem and err.problem_mark:
            reason = f"{err.problem} at line {err.problem_mark.line + 1}"  # not the whole quoted context
        raise MRLError(
            f"{path} is corrupt and cannot be read ({reason}), so this run cannot be resumed. Restore the "
            "file from a copy, or start a new run."
        ) from None
    missing = [
        k for k in RUN_CONFIG_KEYS if not OmegaConf.is_dict(config) or not OmegaConf.is_dict(config.get(k))
    ]
    if missing:
        raise MRLError(
            f"{path} is not a complete mrl-train config (no {', '.join(missing)}), so this run cannot be "
            "resumed. "
            "Restore the file from a copy, or start a new run."
        )


def check_train(cfg: DictConfig) -> None:
    """Every check of an ``mrl-train`` config that runs without data or model (seconds at most)."""
    config = plain(cfg)
    check_train_config(config)
    data = config.get("data") or {}
    check_known_keys(data, "data", how="; settings added with +data.<key>=... must be ones it takes")
    check_views(config)
    probe_optimizer(config)
    if config.get("evaluate") is not None:
        check_evaluate(cfg)


def check_views(config: dict[str, Any]) -> None:
    """Several views of each image (a contrastive objective) need a datamodule that serves them: one that
    cannot is refused now (``configure_views`` refuses it too, for configs that skip the CLI)."""
    import importlib

    from mrl.data.base import views_refusal

    views = (config.get("objective") or {}).get("views", 1)
    target = str((config.get("data") or {}).get("_target_", ""))
    if views == 1 or not target.startswith("mrl."):
        return
    module, _, name = target.rpartition(".")
    datamodule = getattr(importlib.import_module(module), name, None)
    if datamodule is not None and not getattr(datamodule, "multi_view", False):
        raise MRLError(views_refusal(views, name))


def probe_optimizer(config: dict[str, Any]) -> None:
    """Build the configured optimizer and schedule for one stand-in parameter: the factories' own
    checks (unknown optimizer name, bad betas, schedule settings) then fail here, before training."""
    import torch
    from hydra.utils import instantiate

    optim, sched = config.get("optim") or {}, config.get("sched") or {}
    if not optim.get("_target_"):
        return
    try:
        optimizer = instantiate(optim)(torch.nn.Linear(2, 2))
    except Exception as err:  # the factories raise many types (ValueError, AssertionError, TypeError, ...)
        raise MRLError(
            f"The optimizer settings do not work: {_reason(err)}. Check the optim.* overrides "
            f"(optim={optim.get('opt', optim.get('_target_'))}; conf/optim/ has the defaults)."
        ) from err
    if not sched.get("_target_"):
        return
    epochs = (config.get("trainer") or {}).get("max_epochs")
    try:
        instantiate(sched)(
            optimizer, num_epochs=max(1, epochs or 1), updates_per_epoch=10, step_on_epochs=False
        )
    except Exception as err:
        raise MRLError(
            f"The learning-rate schedule settings do not work: {_reason(err)}. Check the sched.* overrides "
            "(conf/sched/ has the defaults), or use sched=none for a constant learning rate."
        ) from err


def check_evaluate(cfg: DictConfig) -> None:
    """``evaluate=``: mrl-eval's config for this job, composed and checked now rather than after training."""
    from mrl.eval.after_training import eval_config_after_training
    from mrl.eval.checks import check_eval_config
    from mrl.eval.neighbour_counts import check_neighbours

    out = Path(str(OmegaConf.select(cfg, "paths.output_dir", default=".")))
    eval_cfg = plain(eval_config_after_training(cfg.evaluate, out / "checkpoint.ckpt", out, cfg))
    check_eval_config(eval_cfg, prefix="evaluate.")
    data = plain(cfg).get("data") or {}
    extra = eval_cfg.get("data") or {}
    check_known_keys(data, "evaluate.data", extra, how=" (evaluate.data is merged into the data config)")
    check_neighbours(eval_cfg, {**data, **extra}, prefix="evaluate.")


def check_built(cfg: DictConfig, nesting: list[int], has_top5: bool) -> None:
    """The checks that need the built model's sizes: ``optimized_metric`` and ``evaluate.sizes``."""
    config = plain(cfg)
    check_optimized_metric(config.get("optimized_metric"), nesting, logged_stages(config), has_top5)
    sizes = (config.get("evaluate") or {}).get("sizes") if isinstance(config.get("evaluate"), dict) else None
    bad = sorted({int(d) for d in sizes or []} - set(nesting))
    if bad:
        raise MRLError(
            f"evaluate.sizes={sizes} includes sizes the model is not trained at: {bad}. Choose among its "
            f"sizes {nesting} (or drop evaluate.sizes for all of them)."
        )


def check_eval(cfg: DictConfig) -> None:
    """Every check of an ``mrl-eval`` config that runs before the checkpoint is read."""
    import torch

    from mrl.eval.checks import check_eval_config

    config = plain(cfg)
    check_eval_config(config)
    device = str(config.get("device", "auto"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MRLError(f"device={device} but no CUDA GPU is available here; use device=cpu or device=auto.")


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text.rstrip(".")
