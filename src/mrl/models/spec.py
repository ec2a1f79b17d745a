"""What a model is, in one typed description: :class:`ModelSpec`.

One spec describes a trained model completely enough to rebuild it without its training config (as
litgpt's ``Config`` does): the timm backbone and its arguments, the Matryoshka head and its sizes, the
class count, the input shape and how images are preprocessed for it. Training stores it in every
checkpoint (beside the run's whole config, which resuming and ``mrl-eval`` read for the data and optimiser
settings), the one-file export stores it in its metadata, and the reader of the paper's checkpoints
produces one. :func:`mrl.models.build.build_model` builds the network from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mrl.errors import MRLError

BACKBONE_TARGET = "mrl.models.backbone.TimmBackbone"
# The backbone config node's keys (conf/backbone/timm.yaml): TimmBackbone's arguments.
BACKBONE_KEYS = (
    "_target_",
    "name",
    "embed_dim",
    "pretrained",
    "pretrained_path",
    "drop_path_rate",
    "model_kwargs",
    "blur_strided_convs",
)
# The head config node's keys that configure the head itself (its other keys configure its loss).
HEAD_KEYS = ("kind", "nesting", "min_size", "dim", "bias")

# Preprocessing kinds, one per way the datamodules feed images to the model at evaluation time.
TIMM = "timm_transform"  # image files (ImageFolder): timm's eval transform (resize, center crop, normalise)
UINT8 = "uint8_normalize"  # in-memory uint8 images (Fashion-MNIST, CIFAR): /255, bilinear resize, normalise
NONE = "none"  # the data already are the model's float inputs (synthetic images)
PREPROCESSING_KINDS = (TIMM, UINT8, NONE)
# The timm data config keys its eval transform (timm.data.create_transform) takes.
TIMM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become the model's inputs at evaluation time."""

    kind: str  # one of PREPROCESSING_KINDS
    in_chans: int
    img_size: int  # side of the model inputs (the evaluation size)
    mean: tuple[float, ...] | None = None  # per channel, on pixel values scaled to [0, 1]
    std: tuple[float, ...] | None = None
    # kind timm_transform: timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode)
    data_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = (list(v) if v is not None else None for v in (self.mean, self.std))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        _check_keys(data, cls, "preprocessing")
        if data["kind"] not in PREPROCESSING_KINDS:
            raise ValueError(
                f"preprocessing kind {data['kind']!r} is none of {', '.join(PREPROCESSING_KINDS)}"
            )
        return cls(
            kind=str(data["kind"]),
            in_chans=int(data["in_chans"]),
            img_size=int(data["img_size"]),
            mean=_floats(data.get("mean")),
            std=_floats(data.get("std")),
            data_config=dict(data["data_config"]) if data.get("data_config") is not None else None,
        )


def timm_preprocessing(data_config: Mapping[str, Any], in_chans: int, img_size: int) -> Preprocessing:
    """The ``timm_transform`` preprocessing of a timm data config at ``img_size`` px."""
    config = {**data_config, "input_size": (in_chans, img_size, img_size)}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in TIMM_KEYS}
    return Preprocessing(
        TIMM, in_chans, img_size, _floats(config.get("mean")), _floats(config.get("std")), config
    )


def data_preprocessing(datamodule: Any) -> Preprocessing:
    """How a configured :class:`~mrl.data.base.MRLDataModule` turns its stored images into model inputs at
    evaluation time: timm's eval transform of its data config at its evaluation size for image files
    (which may exceed the training size, FixRes), else its per-batch normalisation."""
    if datamodule.data_config is not None:
        return timm_preprocessing(datamodule.data_config, datamodule.in_chans, int(datamodule.eval_img_size))
    mean, std = datamodule.mean, datamodule.std
    if mean is not None and std is not None:
        # as the datamodules apply them: as tensors (float32 for Python floats)
        mean, std = (torch.as_tensor(v).flatten().tolist() for v in (mean, std))
        return Preprocessing(
            UINT8, datamodule.in_chans, int(datamodule.img_size), _floats(mean), _floats(std)
        )
    return Preprocessing(NONE, datamodule.in_chans, int(datamodule.img_size))


# What a light head on a frozen source's features is (mrl.models.posthoc builds them): a projection to an
# embedding with Matryoshka heads (head=mrl|mrl_e|ff), CSR's sparse autoencoder, the Matryoshka-Adaptor.
FEATURE_HEAD_KINDS = ("projection", "csr", "adaptor")


@dataclass(frozen=True)
class FeatureHead:
    """A trained module between a frozen source's pooled features and the Matryoshka head."""

    kind: str  # one of FEATURE_HEAD_KINDS
    in_features: int  # the source's pooled feature width
    settings: dict[str, Any] = field(default_factory=dict)  # the module's arguments (JSON values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureHead:
        _check_keys(data, cls, "feature head")
        if data["kind"] not in FEATURE_HEAD_KINDS:
            raise ValueError(f"feature head kind {data['kind']!r} is none of {', '.join(FEATURE_HEAD_KINDS)}")
        return cls(str(data["kind"]), int(data["in_features"]), dict(data.get("settings") or {}))


@dataclass(frozen=True)
class ModelSpec:
    """A Matryoshka model: a timm backbone (pooled features, optionally projected) and a head.

    ``nesting`` and ``embed_dim`` may be None in a spec made from a config before the model is built
    (the default sizes and the pooled feature size are known once the backbone is measured); the spec
    of a built model (:func:`mrl.models.build.build_model`), and every stored one, has both.
    """

    VERSION: ClassVar[int] = 1  # bumped when a field changes meaning; from_dict refuses other versions

    backbone: str  # the timm model name
    num_classes: int
    in_chans: int = 3
    img_size: int | None = None  # the training image side the backbone is built for
    projection_dim: int | None = None  # a linear projection of the pooled features (backbone.embed_dim)
    drop_path_rate: float | None = None
    # other timm model arguments; a timm layer class as {_target_: hydra.utils.get_class, path: ...}
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    blur_strided_convs: bool = False  # FFCV's BlurPool before strided convolutions
    head: str = "mrl"  # mrl, mrl_e, ff or standard (mrl.models.heads)
    nesting: tuple[int, ...] | None = None  # the trained sizes (None: default_nesting(embed_dim, min_size))
    min_size: int = 8
    bias: bool = True
    embed_dim: int | None = None  # the embedding size z (measured when built)
    preprocessing: Preprocessing | None = None
    # a post-hoc model (mrl-train source=...): the backbone above is the frozen source, this module turns
    # its pooled features into z; None: the backbone's (projected) features are z
    feature_head: FeatureHead | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists, not tuples) with the spec's ``version``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model_kwargs"] = dict(self.model_kwargs)
        out["nesting"] = list(self.nesting) if self.nesting is not None else None
        out["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing is not None else None
        out["feature_head"] = self.feature_head.to_dict() if self.feature_head is not None else None
        if self.feature_head is None:
            del out["feature_head"]  # end-to-end models keep the layout older mrl versions read
        return {"version": self.VERSION, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """The spec :meth:`to_dict` wrote; an :class:`MRLError` for another version, a ``ValueError`` for
        a dict that is not a spec (unknown or missing fields)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model description is a mapping, not {type(data).__name__}")
        if data.get("version") != cls.VERSION:
            raise MRLError(
                f"The model description is of version {data.get('version')!r}; this mrl reads version "
                f"{cls.VERSION}. Use the mrl version that wrote it."
            )
        fields = {k: v for k, v in data.items() if k != "version"}
        _check_keys(fields, cls, "model description")
        if fields.get("nesting") is not None:
            fields["nesting"] = tuple(int(m) for m in fields["nesting"])
        if fields.get("preprocessing") is not None:
            fields["preprocessing"] = Preprocessing.from_dict(fields["preprocessing"])
        if fields.get("feature_head") is not None:
            fields["feature_head"] = FeatureHead.from_dict(fields["feature_head"])
        fields["model_kwargs"] = dict(fields.get("model_kwargs") or {})
        return cls(**fields)

    @classmethod
    def from_config(
        cls,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        num_classes: int,
        in_chans: int,
        img_size: int,
    ) -> ModelSpec:
        """The spec of an ``mrl-train`` config's ``backbone`` and ``head`` nodes (plain dicts) for images of
        this shape; the head node's loss settings are not the model's and are left out."""
        target = backbone.get("_target_", BACKBONE_TARGET)
        if target != BACKBONE_TARGET:
            raise MRLError(
                f"backbone._target_={target}: mrl builds its backbones as {BACKBONE_TARGET} (any timm "
                "model by backbone.name). Drop the _target_ override and pick the model with backbone.name."
            )
        unknown = sorted(set(backbone) - set(BACKBONE_KEYS))
        if unknown:
            raise MRLError(
                f"backbone.{unknown[0]} is not a backbone setting. The backbone takes "
                f"{', '.join(BACKBONE_KEYS[1:])} (conf/backbone/timm.yaml); fix the spelling or drop it."
            )
        kind = head.get("kind", "mrl")
        # the FF head's one size is head.dim; a malformed list is left for the head's own check
        sizes = (
            ([head["dim"]] if head.get("dim") is not None else None) if kind == "ff" else head.get("nesting")
        )
        return cls(
            backbone=backbone["name"],
            num_classes=int(num_classes),
            in_chans=int(in_chans),
            img_size=int(img_size),
            projection_dim=backbone.get("embed_dim"),
            drop_path_rate=backbone.get("drop_path_rate"),
            model_kwargs=dict(backbone.get("model_kwargs") or {}),
            blur_strided_convs=bool(backbone.get("blur_strided_convs", False)),
            head=kind,
            nesting=tuple(sizes) if isinstance(sizes, list | tuple) else sizes,
            min_size=head.get("min_size", 8),
            bias=bool(head.get("bias", True)),
        )

    def to_config(self) -> dict[str, Any]:
        """The ``backbone`` and ``head`` config nodes of an ``mrl-train`` run with this model (no pretrained
        weights: they come with the model)."""
        backbone: dict[str, Any] = {
            "_target_": BACKBONE_TARGET,
            "name": self.backbone,
            "embed_dim": self.projection_dim,
            "pretrained": False,
            "blur_strided_convs": self.blur_strided_convs,
        }
        if self.drop_path_rate is not None:
            backbone["drop_path_rate"] = self.drop_path_rate
        if self.model_kwargs:
            backbone["model_kwargs"] = dict(self.model_kwargs)
        head: dict[str, Any] = {"kind": self.head, "bias": self.bias}
        if self.head == "ff":
            head["dim"] = self.nesting[0] if self.nesting else None
        elif self.head != "standard":
            head.update(nesting=list(self.nesting) if self.nesting else None, min_size=self.min_size)
        return {"backbone": backbone, "head": head}


def _floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    """Per-channel statistics as a tuple of Python floats."""
    return None if values is None else tuple(float(v) for v in values)


def _check_keys(data: Mapping[str, Any], cls: type, what: str) -> None:
    """A ``ValueError`` naming the fields of ``data`` that ``cls`` does not have or lacks."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if unknown or missing:
        raise ValueError(f"{what}: unknown fields {unknown}, missing fields {missing}")
