"""Rebuild a trained model and its datamodule from an ``mrl-train`` checkpoint, without Hydra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mrl.config_checks import check_known_keys
from mrl.models.paper_layout import PaperCheckpoint
from mrl.resolvers import absolute_paths
from mrl.training.checkpoints import check_compatible, checkpoint_config, load_model_file


def load_for_eval(
    ckpt_path: str | Path, data_overrides: dict[str, Any] | None = None, paper_head: str | None = None
):
    """``(module, datamodule, train_config)`` of a checkpoint, the module in eval mode on the CPU.

    ``data_overrides`` are merged into the run's data config (another ``data_dir``, batch size, ...). A
    checkpoint of the paper's repository has none: ``data_overrides`` is then the whole data config, and
    ``paper_head`` may name its head kind (:mod:`mrl.eval.paper_model`).
    """
    ckpt = load_model_file(ckpt_path, paper_head)
    if isinstance(ckpt, PaperCheckpoint):
        from mrl.eval.paper_model import load_paper_for_eval

        return load_paper_for_eval(ckpt, ckpt_path, data_overrides)
    config = checkpoint_config(ckpt, ckpt_path)
    cfg: DictConfig = OmegaConf.create(config)
    if data_overrides:
        how = " (mrl-eval's data settings are merged into the checkpoint's data config)"
        check_known_keys(config["data"], "data", data_overrides, how=how)
        cfg.data = OmegaConf.merge(cfg.data, OmegaConf.create(dict(data_overrides)))
    # Lightning and timm are imported only once we know the checkpoint is usable.
    from mrl.training.assemble import assemble

    if cfg.get("source"):
        # A head trained on a frozen source (mrl-train source=): its stored description holds the whole
        # chain, and the data is preprocessed as the source was.
        from mrl.models.spec import ModelSpec
        from mrl.training.checkpoints import SPEC_KEY

        module, datamodule = assemble(cfg, spec=ModelSpec.from_dict(ckpt[SPEC_KEY]))
    else:
        # Rebuilt from the config, not the stored model description: the data settings given here may
        # change the images the model is built for (as for training, mrl.training.assemble).
        module, datamodule = assemble(cfg)
    check_compatible(ckpt, module, ckpt_path, config, datamodule.classes)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), datamodule, OmegaConf.to_container(cfg, resolve=True)


def fingerprint(ckpt_id: str, train_config: dict[str, Any], split: str, dtype: str, img_size: int) -> dict:
    """What exported embeddings depend on: reused only when all of it is unchanged. The checkpoint is its
    content (``mrl.eval.locations.checkpoint_id``), not its path: two paths to one file, or a copy, give
    the same embeddings; the data is the checkpoint's data config with mrl-eval's data settings merged in,
    relative paths made absolute (from another folder they name other data)."""
    data = json.loads(json.dumps(train_config.get("data", {}), default=str, sort_keys=True))
    return {
        "checkpoint_id": ckpt_id,
        "split": split,
        "dtype": dtype,
        "img_size": int(img_size),
        "data": absolute_paths(data),
    }
