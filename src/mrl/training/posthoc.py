"""``mrl-train source=...``: a light head on a frozen model's cached features, assembled.

The source is any model mrl reads (``mrl.load``: an ``mrl-train`` checkpoint, a ``model.safetensors``
export, a checkpoint of the paper's repository) or ``backbone``: the configured timm backbone with its
local pretrained weights. Its backbone (pooled, and projected if it was) is kept frozen; the images are
preprocessed the way it was evaluated; its features are cached once per split
(:class:`~mrl.data.frozen_features.FrozenFeatureDataModule`). The trained model is the whole chain
(:class:`~mrl.models.posthoc.PosthocBackbone` and the head), described by one
:class:`~mrl.models.spec.ModelSpec` with a ``feature_head``, so checkpoints, ``mrl-eval`` and
``mrl.load`` treat it like any model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mrl.data.base import MRLDataModule
from mrl.data.feature_cache import weights_digest
from mrl.data.frozen_features import FrozenFeatureDataModule, data_identity
from mrl.errors import MRLError
from mrl.instantiate import instantiate
from mrl.models.backbone import TimmBackbone, build_with_upsizing
from mrl.models.build import build_model, build_parts, spec_from_config
from mrl.models.posthoc import SETTINGS_KEYS
from mrl.models.spec import TIMM, FeatureHead, ModelSpec, data_preprocessing
from mrl.training.assemble import module_of_parts
from mrl.training.posthoc_module import PosthocLitModule

log = logging.getLogger(__name__)

BACKBONE_SOURCE = "backbone"


@dataclass(frozen=True)
class Source:
    """The frozen model: its backbone (pooled features, projected if it was) and its description."""

    backbone: TimmBackbone
    spec: ModelSpec
    origin: str  # the path, or "backbone"


def load_source(cfg: DictConfig, images: MRLDataModule) -> Source:
    """The source ``cfg.source`` names, its images' preprocessing in its spec."""
    name = str(cfg.source)
    if name == BACKBONE_SOURCE:
        return _backbone_source(cfg, images)
    path = Path(name).expanduser()
    if not path.is_file():
        raise MRLError(
            f"source={name}: no such file. Give the frozen model as the path of an mrl-train checkpoint "
            "(<run>/checkpoints/*.ckpt), a model.safetensors export, a checkpoint of the paper's "
            "repository, or source=backbone for the configured timm backbone with its pretrained weights "
            "(backbone.pretrained_path=<file>)."
        )
    from mrl.deploy.loading import load  # the one reader of model files (checkpoints, exports, paper)

    try:
        model = load(path)
    except MRLError as err:
        raise MRLError(f"source={name} is not a model mrl can load: {err}") from None
    if model.spec.feature_head is not None:
        raise MRLError(
            f"source={name} is itself a head trained on a frozen source ({model.spec.backbone}). Train on "
            "its own source instead (the source= of that run), which gives the same features."
        )
    spec = replace(model.spec, head="standard", nesting=None, embed_dim=model.backbone.embed_dim)
    return Source(model.backbone, spec, str(path))


def _backbone_source(cfg: DictConfig, images: MRLDataModule) -> Source:
    """``source=backbone``: ``cfg.backbone`` with its pretrained weights, at the data's image size (the
    smallest a backbone with many downsampling stages accepts, for small resizable images)."""
    if not (cfg.backbone.get("pretrained") or cfg.backbone.get("pretrained_path")):
        log.warning(
            "source=backbone with random weights (backbone.pretrained=false, no backbone.pretrained_path): "
            "its features are those of an untrained network."
        )

    def build(px: int):
        spec = spec_from_config(_as_standard(cfg), images.num_classes, images.in_chans, px)
        return build_model(spec, bool(cfg.backbone.get("pretrained")), cfg.backbone.get("pretrained_path"))

    built, _ = build_with_upsizing(build, images.img_size, images.upsizable)
    return Source(built.backbone, built.spec, BACKBONE_SOURCE)


def _as_standard(cfg: DictConfig) -> DictConfig:
    """``cfg`` with a plain head: what describes the source backbone alone."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    copy.head = {"kind": "standard"}
    return copy


def _configure_images(images: MRLDataModule, source: Source) -> None:
    """Serve the images the way the source was evaluated, or refuse data it cannot read."""
    given = source.spec.preprocessing
    if given is not None and given.in_chans != images.in_chans:
        raise MRLError(
            f"source={source.origin} takes {given.in_chans}-channel images but the data has "
            f"{images.in_chans}-channel ones. Use a source trained on images like these, or "
            "source=backbone with backbone settings for this data."
        )
    data_config = given.data_config if given is not None and given.kind == TIMM else images.data_config
    images.configure(views=1, img_size=source.spec.img_size, data_config=data_config)
    mine = data_preprocessing(images)
    if given is not None and source.origin != BACKBONE_SOURCE and mine != given:
        raise MRLError(
            f"source={source.origin} was evaluated on images preprocessed as {given.to_dict()}, but this "
            f"data gives {mine.to_dict()}: its features of these images would not be the ones it learned. "
            "Use the data the source was trained on (its data settings), or source=backbone."
        )


def _check_classes(source: Source, images: MRLDataModule) -> None:
    if source.origin != BACKBONE_SOURCE and source.spec.num_classes != images.num_classes:
        raise MRLError(
            f"source={source.origin} was trained on {source.spec.num_classes} classes but the data has "
            f"{images.num_classes}. Give a source trained on this data (its checkpoint or export), or use "
            "source=backbone for a pretrained backbone on new classes."
        )


def posthoc_spec(cfg: DictConfig, source: Source, images: MRLDataModule) -> ModelSpec:
    """The model ``cfg.head`` describes on the source's features: the source's backbone and
    preprocessing, a feature head (projection, CSR or adaptor) and the Matryoshka head."""
    head_node = OmegaConf.to_container(cfg.head, resolve=True)
    kind = head_node.get("kind", "mrl")
    head_fields = spec_from_config(cfg, images.num_classes, images.in_chans, int(source.spec.img_size or 0))
    if kind in SETTINGS_KEYS and kind != "projection":
        settings = {k: head_node[k] for k in SETTINGS_KEYS[kind] if k in head_node}
        feature_head = FeatureHead(kind, source.backbone.embed_dim, settings)
    else:
        features = cfg.get("features") or {}
        settings = {"dim": features.get("projection_dim"), "hidden": features.get("hidden")}
        feature_head = FeatureHead("projection", source.backbone.embed_dim, settings)
    return replace(
        source.spec,
        num_classes=images.num_classes,
        head=kind,
        nesting=head_fields.nesting,
        min_size=head_fields.min_size,
        bias=head_fields.bias,
        embed_dim=None,
        preprocessing=data_preprocessing(images),
        feature_head=feature_head,
    )


def assemble_posthoc(cfg: DictConfig) -> tuple[PosthocLitModule, FrozenFeatureDataModule]:
    """The module (the frozen source, its feature head, the Matryoshka head) and the datamodule of its
    cached features, for ``cfg`` with ``source`` set."""
    images = instantiate(cfg.data)
    source = load_source(cfg, images)
    _check_classes(source, images)
    _configure_images(images, source)
    spec = posthoc_spec(cfg, source, images)
    no_weights = OmegaConf.merge(cfg, {"backbone": {"pretrained": False, "pretrained_path": None}})
    parts = build_parts(no_weights, spec)
    parts.backbone.source.load_state_dict(source.backbone.state_dict())
    module = module_of_parts(cfg, parts, parts.spec, PosthocLitModule)
    features = cfg.get("features") or {}
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    key_parts = (
        weights_digest(parts.backbone.source),
        data_identity(images, data_cfg),
        spec.preprocessing.to_dict(),
    )
    datamodule = FrozenFeatureDataModule(
        parts.backbone.source,
        images,
        features.get("cache_dir") or Path(cfg.paths.log_dir) / "feature_cache",
        key_parts,
        batch_size=int(features.get("batch_size") or cfg.data.batch_size),
        seed=int(cfg.seed),
        dtype=str(features.get("dtype", "float16")),
        device=str(features.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")),
    )
    return module, datamodule
