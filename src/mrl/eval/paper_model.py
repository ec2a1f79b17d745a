"""``mrl-eval`` on a checkpoint of the paper's repository (RAIVNLab/MRL): the model comes from the
weights (:mod:`mrl.models.paper_layout`), the data from ``mrl-eval``'s ``data`` setting, since those
files hold no data config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mrl.errors import MRLError
from mrl.models.paper_layout import PAPER_EVAL_SIZE, SOURCE, PaperCheckpoint
from mrl.training.checkpoints import load_paper_weights

log = logging.getLogger(__name__)

DATA_EXAMPLE = (
    "+data=imagefolder data.root=<ImageNet dir with train/ and val/ class folders> (the paper's evaluation: "
    "resize to 256, center crop 224), or +data=imagenet data.input_dir=<shards from mrl-prepare-data> "
    f"data.eval_img_size={PAPER_EVAL_SIZE}"
)


def load_paper_for_eval(paper: PaperCheckpoint, path: str | Path, data: dict[str, Any] | None):
    """``(module, datamodule, config)`` as :func:`mrl.eval.model.load_for_eval` returns them: the paper's
    model (:attr:`PaperCheckpoint.spec`) in eval mode on the CPU, the datamodule of ``data`` (a whole data
    config) with the paper's evaluation preprocessing, and the config of an ``mrl-train`` run with this
    model (and where its weights came from, ``paper_checkpoint``)."""
    if not data or "_target_" not in data:
        given = f" (got data={data})" if data else ""
        raise MRLError(
            f"{path} is a checkpoint of the paper's repository ({SOURCE}): it holds the weights only, no "
            f"data config{given}. Tell mrl-eval which data set to evaluate on with a whole data config: "
            f"{DATA_EXAMPLE}. Its classes must be the model's {paper.num_classes}, in the same order."
        )
    spec = paper.spec
    cfg = OmegaConf.create({"data": data, **spec.to_config()})
    from mrl.training.assemble import assemble

    # the weights are checked before the data is listed (an ImageNet tree takes a while)
    module, datamodule = assemble(cfg, spec, lambda model: load_paper_weights(model, paper, path))
    if datamodule.in_chans != spec.in_chans or datamodule.num_classes != spec.num_classes:
        raise MRLError(
            f"{path} ({paper.describe()}) classifies RGB images into {paper.num_classes} classes, but the "
            f"data ({data['_target_']}) has {datamodule.num_classes} classes of "
            f"{datamodule.in_chans}-channel images. Evaluate on the data set it was trained for: "
            f"{DATA_EXAMPLE}."
        )
    if datamodule.eval_img_size != PAPER_EVAL_SIZE:
        # kept (a smaller crop is a quick check, a larger one a study of its own), but said: data=imagenet
        # crops at 256 for mrl's own models, which is not the paper's evaluation of these weights
        log.warning(
            "Evaluating %s at a %d px center crop; the paper evaluates it at %d px (data.eval_img_size=%d).",
            path,
            datamodule.eval_img_size,
            PAPER_EVAL_SIZE,
            PAPER_EVAL_SIZE,
        )
    config = {**OmegaConf.to_container(cfg, resolve=True), "paper_checkpoint": paper.describe()}
    return module.eval(), datamodule, config
