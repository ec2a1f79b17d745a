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
import math
import shlex
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


def load_file_source(name: str) -> Source:
    """The model file ``source=<name>`` names (read before any data is listed: a wrong file fails fast)."""
    path = Path(name).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        hint = (
            f"its checkpoint, source={shlex.quote(str(last))}"
            if last.is_file()
            else "the model file inside it"
        )
        raise MRLError(
            f"source={name} is a directory, not a model file. Give {hint}: an mrl-train checkpoint "
            "(<run>/checkpoints/*.ckpt), a model.safetensors export or a checkpoint of the paper's "
            "repository."
        )
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
    _check_image_size(images, source)
    data_config = given.data_config if given is not None and given.kind == TIMM else images.data_config
    images.configure(views=1, img_size=source.spec.img_size, data_config=data_config)
    mine = data_preprocessing(images)
    if given is not None and source.origin != BACKBONE_SOURCE and mine != given:
        raise MRLError(
            f"source={source.origin} was evaluated on images preprocessed otherwise than this data gives "
            f"them ({_differences(given.to_dict(), mine.to_dict())}): its features of these images would "
            "not be the ones it learned. Use the data settings the source was trained with, or "
            "source=backbone."
        )


def _check_image_size(images: MRLDataModule, source: Source) -> None:
    """A file source takes images of the size it was trained at: data that cannot be served at that size
    (not resizable, or a size the user chose) is refused before anything is read."""
    wanted = source.spec.img_size
    if source.origin == BACKBONE_SOURCE or not wanted or wanted == images.img_size or images.upsizable:
        return
    why = (
        f"data.img_size={images.img_size} was chosen"
        if images.resizable
        else f"{type(images).__name__} cannot resize its images"
    )
    unset = " (or leave it unset: such data is then served at the source's size)" if images.resizable else ""
    raise MRLError(
        f"source={source.origin} takes {wanted} px images, the size it was trained at, but the data serves "
        f"{images.img_size} px ones and {why}. Set data.img_size={wanted}{unset}, so that the cached "
        "features are the ones the source computes."
    )


def _differences(source: dict, data: dict) -> str:
    """``key: <source's> (source) vs <data's> (data)`` for each setting that differs, one level deep."""
    out = []
    for key in sorted(set(source) | set(data)):
        a, b = source.get(key), data.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{key}.{k}: {a.get(k)} (source) vs {b.get(k)} (data)"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            out.append(f"{key}: {a} (source) vs {b} (data)")
    return "; ".join(out)


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
    check_widths(kind, head_node, cfg.get("features") or {}, source.backbone.embed_dim)
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


def check_widths(kind: str, head: dict, features: dict, width: int) -> None:
    """The sizes ``head`` asks for against what the feature head gives on ``width`` source features: a
    projection's ``features.projection_dim``, CSR's ``expansion x width`` code units, the adaptor's
    ``width``. Refused before anything is built, with the setting that widens it."""
    nesting = head.get("nesting")
    sizes = [head["dim"]] if kind == "ff" and head.get("dim") else list(nesting or [])
    if kind == "standard" or not sizes or max(sizes) <= 0:
        return
    largest, what = max(sizes), "head.dim" if kind == "ff" else "the largest size"
    if kind == "csr":
        expansion = float(head.get("expansion", 4))
        hidden = round(expansion * width)
        if largest > hidden:
            raise MRLError(
                f"head.nesting={list(sizes)} asks for codes with up to {largest} active units (k), but "
                f"CSR's code has {hidden} units (head.expansion={expansion:g} x the source's {width} "
                f"features). Use k values of at most {hidden}, or "
                f"head.expansion={math.ceil(largest / width)}."
            )
        return
    if kind == "adaptor":
        if largest > width:
            raise MRLError(
                f"head.nesting goes up to {largest} but the adaptor keeps the source's width, {width} "
                f"features, whose prefixes are its sizes. Lower the largest size to at most {width}."
            )
        return
    given = features.get("projection_dim")
    out = given or width
    if largest > out:
        asked = f"head.dim={largest}" if kind == "ff" else f"head.nesting goes up to {largest}"
        setting = "null, the source's width" if given is None else given
        raise MRLError(
            f"{asked} but the projection of the source's {width} features gives {out} "
            f"(features.projection_dim={setting}). Lower {what} to at most {out}, or learn a wider "
            f"embedding with features.projection_dim={largest}."
        )


def assemble_posthoc(cfg: DictConfig) -> tuple[PosthocLitModule, FrozenFeatureDataModule]:
    """The module (the frozen source, its feature head, the Matryoshka head) and the datamodule of its
    cached features, for ``cfg`` with ``source`` set. Everything that can be refused is, before any
    feature is computed: the device, the source file, its classes, image size and preprocessing against
    the data, and the head's sizes against the source's width."""
    features = cfg.get("features") or {}
    # null: the GPU when there is one
    device = feature_device(str(features.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")))
    source = None if str(cfg.source) == BACKBONE_SOURCE else load_file_source(str(cfg.source))
    images = instantiate(cfg.data)
    source = source or _backbone_source(cfg, images)
    _check_classes(source, images)
    _configure_images(images, source)
    spec = posthoc_spec(cfg, source, images)
    no_weights = OmegaConf.merge(cfg, {"backbone": {"pretrained": False, "pretrained_path": None}})
    parts = build_parts(no_weights, spec)
    parts.backbone.source.load_state_dict(source.backbone.state_dict())
    module = module_of_parts(cfg, parts, parts.spec, PosthocLitModule)
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
        device=device,
    )
    return module, datamodule


def feature_device(device: str) -> str:
    """``features.device`` when this machine has it (a GPU the source computes the features on)."""
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise MRLError(
                f"features.device={device} but this machine has {count} CUDA GPU(s). Compute the source's "
                "features with features.device=cpu" + (f", or cuda:0 to cuda:{count - 1}." if count else ".")
            )
    return device
