"""One config -> the LightningModule and the datamodule it trains or evaluates on, built together.

:func:`assemble` is the one place that builds both, for training (:mod:`mrl.training.job`) and for
``mrl-eval`` (:mod:`mrl.eval.model`, :mod:`mrl.eval.paper_model`): the model from its description
(:class:`~mrl.models.spec.ModelSpec`, made from the config for the data's images unless given), the
datamodule from ``cfg.data``, configured once for that model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from omegaconf import DictConfig, OmegaConf

from mrl.data.base import MRLDataModule
from mrl.instantiate import instantiate
from mrl.models.backbone import build_with_upsizing
from mrl.models.build import ModelParts, build_parts, spec_from_config
from mrl.models.spec import TIMM, ModelSpec, data_preprocessing
from mrl.training.finetune import FinetuneSettings
from mrl.training.module import MatryoshkaLitModule
from mrl.training.posthoc_module import PosthocLitModule

log = logging.getLogger(__name__)


def assemble(
    cfg: DictConfig,
    spec: ModelSpec | None = None,
    load_weights: Callable[[MatryoshkaLitModule], None] | None = None,
) -> tuple[MatryoshkaLitModule, MRLDataModule]:
    """The module and datamodule of ``cfg``; the datamodule constructed, configured, not set up.

    Without ``spec`` the model is the one ``cfg.backbone`` and ``cfg.head`` describe for the data's
    images, which a backbone that needs more pixels gets upsized (when the data can be resized). With a
    ``spec`` (a model read from its weights alone, as the paper's checkpoints are) the model is built
    first and ``load_weights`` loads into it before the data is constructed: a file that does not fit
    fails before a large image tree is listed.
    """
    if spec is None:
        datamodule = instantiate(cfg.data)
        parts = _parts_for_data(cfg, datamodule)
        _configure(cfg, datamodule, parts.spec.img_size, parts.backbone.data_config())
        return module_of_parts(
            cfg, parts, replace(parts.spec, preprocessing=data_preprocessing(datamodule))
        ), datamodule
    parts = build_parts(cfg, spec)
    # a post-hoc model (mrl-train source=) runs on images like any other: the whole chain
    module = module_of_parts(cfg, parts, parts.spec, PosthocLitModule if spec.feature_head else None)
    if load_weights is not None:
        load_weights(module)
    datamodule = instantiate(cfg.data)
    given = spec.preprocessing
    size = given.img_size if given is not None and spec.feature_head is not None else None
    _configure(cfg, datamodule, size, given.data_config if given and given.kind == TIMM else None)
    return module, datamodule


def build_module(cfg: DictConfig, num_classes: int, in_chans: int, img_size: int) -> MatryoshkaLitModule:
    """The module of ``cfg`` for images of this shape, without data (tests and benchmarks that feed it
    batches of their own)."""
    parts = build_parts(cfg, spec_from_config(cfg, num_classes, in_chans, img_size))
    return module_of_parts(cfg, parts, parts.spec)


def _parts_for_data(cfg: DictConfig, datamodule: MRLDataModule) -> ModelParts:
    """The model for ``datamodule``'s images, upsizing resizable small images (Fashion-MNIST's 28 px) to
    the smallest power of two a backbone with many downsampling stages accepts."""
    parts, size = build_with_upsizing(
        lambda px: build_parts(cfg, spec_from_config(cfg, datamodule.num_classes, datamodule.in_chans, px)),
        datamodule.img_size,
        datamodule.upsizable,
    )
    if size != datamodule.img_size:
        log.warning(
            "Backbone %s needs images larger than %d px: resizing them to %d (set data.img_size to choose).",
            cfg.backbone.name,
            datamodule.img_size,
            size,
        )
    return parts


def _configure(
    cfg: DictConfig, datamodule: MRLDataModule, img_size: int | None, data_config: dict | None
) -> None:
    """The datamodule's one configuration: the objective's views, the model's image size and timm data
    config."""
    views = int((cfg.get("objective") or {}).get("views", 1))
    datamodule.configure(views=views, img_size=img_size, data_config=data_config)


def module_of_parts(
    cfg: DictConfig,
    parts: ModelParts,
    spec: ModelSpec,
    module_class: type[MatryoshkaLitModule] | None = None,
) -> MatryoshkaLitModule:
    """The LightningModule (``module_class``, default :class:`MatryoshkaLitModule`) of built ``parts``,
    with ``cfg``'s optimizer and schedule."""
    optimizer = instantiate(cfg.optim) if cfg.get("optim") else None
    scheduler = instantiate(cfg.sched) if cfg.get("sched") and cfg.sched.get("_target_") else None
    return (module_class or MatryoshkaLitModule)(
        parts.backbone,
        parts.head,
        parts.loss,
        optimizer,
        scheduler,
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
        config=OmegaConf.to_container(cfg, resolve=True),
        depth=parts.depth,
        probe=parts.probe,
        spec=spec,
        backbone_lr_mult=FinetuneSettings.from_config(cfg.get("finetune")).backbone_lr_mult,
    )
