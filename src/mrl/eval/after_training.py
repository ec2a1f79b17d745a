"""Evaluate a training job's checkpoint with ``mrl-eval`` right after training (``evaluate=...``).

A sweep that trains many models (``experiments/fashion_mnist_compare.yaml``) needs every job evaluated
the same way; doing it inside the job keeps one command per experiment and puts ``report.json`` in
``<job dir>/eval/`` where ``mrl-report`` finds it. The eval config is ``conf/eval.yaml`` composed with
Hydra's compose API (so its defaults stay the single source), merged with the job's ``evaluate`` node.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from mrl.errors import MRLError
from mrl.eval.locations import EVAL_SUBDIR, after_training_dir, checkpoint_id, evaluation_settings
from mrl.resolvers import evaluation_key

log = logging.getLogger(__name__)


def compose_eval_config() -> DictConfig:
    """``conf/eval.yaml`` with its defaults, without Hydra's own config (no output dir is created)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mrl.config_path import config_dir
    from mrl.resolvers import register_resolvers

    register_resolvers()
    if GlobalHydra.instance().is_initialized():  # inside mrl-train: the same config search path
        return compose("eval", overrides=["ckpt_path=unset"])
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("eval", overrides=["ckpt_path=unset"])


def eval_config_after_training(
    settings: dict[str, Any] | DictConfig, ckpt_path: Path, job_dir: Path, train_cfg: DictConfig
) -> DictConfig:
    """The ``mrl-eval`` config for ``ckpt_path``: eval defaults < ``settings``; output in
    ``job_dir/eval/<ckpt stem>-<id>_<key>`` (``<key>``: :func:`~mrl.resolvers.evaluation_key` of its
    settings; ``job_dir/eval`` while the checkpoint does not exist yet, as in the pre-flight check), W&B
    like the training job (same project, group and mode; none when it had none)."""
    base = compose_eval_config()
    OmegaConf.set_struct(base, True)  # a misspelt key is an error, not a silently ignored setting
    OmegaConf.set_struct(base.data, False)  # data overrides are checked against the data config itself
    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_container(settings, resolve=True)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.create(settings or {}))
    except Exception as err:  # omegaconf raises several types for an unknown or mistyped key
        raise MRLError(_settings_error(settings, base, err)) from None
    trained_wandb = (train_cfg.get("logger") or {}).get("wandb")
    with open_dict(cfg):
        cfg.ckpt_path = str(ckpt_path)
        key = evaluation_key(evaluation_settings(cfg))  # a place per checkpoint and evaluation settings
        cfg.paths.output_dir = str(
            after_training_dir(job_dir, ckpt_path, checkpoint_id(ckpt_path), key)
            if Path(ckpt_path).is_file()
            else job_dir / EVAL_SUBDIR
        )
        cfg.paths.log_dir = str(job_dir)
        if trained_wandb and trained_wandb.get("_target_"):
            for key in ("project", "offline", "tags"):
                cfg.logger.wandb[key] = trained_wandb.get(key)
            cfg.logger.wandb.group = cfg.logger.wandb.get("group") or trained_wandb.get("group")
            cfg.logger.wandb.name = f"eval:{trained_wandb.get('name') or job_dir.name}"
        else:
            cfg.logger = {}
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def _settings_error(settings: Any, base: DictConfig, err: Exception) -> str:
    """Which ``evaluate`` key is wrong and what the valid ones are (omegaconf's own text names neither
    the ``evaluate.`` prefix nor the alternatives)."""
    key = getattr(err, "full_key", None)
    if not key:
        return (
            f"evaluate={settings} does not fit mrl-eval's settings (conf/eval.yaml): "
            f"{' '.join(str(err).split())} "
            "Use keys of conf/eval.yaml, e.g. evaluate.methods.adaptive_retrieval=false."
        )
    parent, _, _ = str(key).rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(err, ConfigKeyError) and OmegaConf.is_dict(node):
        where = f"evaluate.{parent}" if parent else "evaluate"
        return (
            f"evaluate.{key} is not an mrl-eval setting. The valid {where} keys are: "
            f"{', '.join(map(str, node))} (conf/eval.yaml)."
        )
    reason = " ".join(str(err).splitlines()[0].split())
    return f"evaluate.{key} is not valid: {reason}. See conf/eval.yaml for what it takes."


def evaluate_after_training(
    settings: dict[str, Any] | DictConfig, ckpt_path: Path | None, job_dir: Path, train_cfg: DictConfig
) -> dict[str, Any]:
    """``evaluate=...``: run every enabled ``mrl-eval`` evaluator on the checkpoint the training job's
    test used (``ckpt_path``; None when the job wrote none); return the report."""
    from mrl.eval.run import evaluate

    if ckpt_path is None or not Path(ckpt_path).is_file():
        raise MRLError(
            f"evaluate=... needs a checkpoint of this run to evaluate, but none was written ({ckpt_path}). "
            "Keep the default checkpoint callbacks (callbacks=default) or drop the evaluate setting."
        )

    cfg = eval_config_after_training(settings, ckpt_path, job_dir, train_cfg)
    log.info("evaluating %s into %s", ckpt_path, cfg.paths.output_dir)
    return evaluate(cfg)
