"""The checkpoints of the paper's repository (RAIVNLab/MRL), read as mrl models.

Those files are plain state dicts of a torchvision ResNet (``torch.save(model.state_dict())``, of the
DDP-wrapped model, so every key usually starts with ``module.``) whose ``fc`` is one of:

* MRL: ``fc.nesting_classifier_<i>`` for i = 0 .. G-1, an ``nn.Linear(m_i, C)`` each on the first
  ``m_i`` features (8, 16, ..., 2048);
* MRL-E: one ``fc.nesting_classifier_0``, an ``nn.Linear(2048, C)`` whose first ``m`` columns classify
  size ``m`` (weight tying). The published MRL-E file uses the repository's older notation, a plain
  ``fc.weight`` ``(C, 2048)``, which has the keys of the FF-2048 model: the file name (the paper's
  ``r50_mrl1_e1_*``) or an explicit head kind tells them apart;
* FF-d: ``fc.weight`` ``(C, d)`` on the first ``d`` features; ``d = 2048`` is the standard ResNet-50.

The published weights were trained with FFCV's BlurPool: a strided convolution's weight is then
``<layer>.conv.weight`` beside its constant filter ``<layer>.blur_filter`` (:mod:`mrl.models.blurpool`).
torchvision's and timm's ResNets name their parameters alike, so the backbone maps one to one onto a
:class:`~mrl.models.backbone.TimmBackbone`; the head becomes the :class:`~mrl.nn.MatryoshkaLinear` of
the same kind (its MRL weights side by side in one matrix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrl.errors import MRLError
from mrl.models.blurpool import binomial_filter
from mrl.models.heads import HEAD_KINDS
from mrl.models.spec import ModelSpec, Preprocessing, timm_preprocessing
from mrl.nn.nesting import default_nesting

SOURCE = "RAIVNLab/MRL"
DDP_PREFIX = "module."
CLASSIFIER = re.compile(r"^fc\.nesting_classifier_(\d+)\.(weight|bias)$")
# torchvision's ResNets by (blocks per stage, bottleneck blocks); timm builds each under the same name
RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
# MRL-E files do not store their sizes: the paper's default nesting_start=3 gives 8, 16, ..., 2048
MRL_E_MIN_SIZE = 8
# the paper's file naming: r50_mrl1_e1_ff2048.pt is the MRL-E model
MRL_E_FILE_NAME = re.compile(r"mrl1_e1")
# The paper's evaluation preprocessing (inference/pytorch_inference.py): Resize(256), CenterCrop(224),
# ImageNet mean/std. timm's resnet50 data config has the same mean/std but evaluates timm's own weights
# with a bicubic resize and crop_pct 0.95; these keys replace those.
PAPER_EVAL_CROP = {"interpolation": "bilinear", "crop_pct": 224 / 256, "crop_mode": "center"}
PAPER_EVAL_SIZE = 224
EXPECTED = (
    "a torchvision ResNet state dict as the paper's repository (RAIVNLab/MRL) saves it: conv1.weight, bn1.*, "
    "layer1-4.* (with FFCV's BlurPool: <layer>.conv.weight and <layer>.blur_filter), and the classifier "
    "fc.nesting_classifier_<i>.weight/.bias (MRL: one per size; MRL-E: one of the full width) or "
    "fc.weight/.bias (FF: C x d), every key optionally prefixed with DDP's 'module.'"
)


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a bare state dict (names -> tensors), as the paper's checkpoints are."""
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def paper_preprocessing() -> Preprocessing:
    """The paper's evaluation preprocessing, as timm's eval transform makes it."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # timm only once a file is read

    imagenet = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    return timm_preprocessing({**imagenet, **PAPER_EVAL_CROP}, 3, PAPER_EVAL_SIZE)


@dataclass
class PaperCheckpoint:
    """A paper checkpoint mapped onto mrl: the model it holds (:attr:`spec`), and its weights under mrl's
    names (``backbone.model.*``, ``head.weight``, ``head.bias``)."""

    arch: str  # the timm (and torchvision) model name
    kind: str  # one of HEAD_KINDS
    nesting: list[int]
    num_classes: int
    feature_dim: int
    bias: bool
    blur: bool
    state: dict[str, torch.Tensor] = field(repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int | None:
        """The FF model's feature size (None for the other kinds)."""
        return self.nesting[0] if self.kind == "ff" else None

    @property
    def spec(self) -> ModelSpec:
        """The model: timm's ResNet of the same name (its embedding the pooled features), the head of the
        file, evaluated with the paper's preprocessing."""
        return ModelSpec(
            backbone=self.arch,
            num_classes=self.num_classes,
            in_chans=3,
            img_size=PAPER_EVAL_SIZE,
            blur_strided_convs=self.blur,
            head=self.kind,
            nesting=tuple(self.nesting),
            bias=self.bias,
            embed_dim=self.feature_dim,
            preprocessing=paper_preprocessing(),
        )

    def describe(self) -> str:
        """One line for the log: what the file holds and how it was read."""
        sizes = f"{self.nesting[0]}..{self.nesting[-1]} ({len(self.nesting)} sizes)"
        what = {"mrl": f"MRL {sizes}", "mrl_e": f"MRL-E {sizes}", "ff": f"FF-{self.dim}"}.get(
            self.kind, f"standard ({self.feature_dim}-d)"
        )
        details = ", ".join(
            [f"{self.num_classes} classes", *(["BlurPool"] if self.blur else []), *self.notes]
        )
        return f"{SOURCE} checkpoint: {self.arch} {what}, {details}"


def read_paper_state_dict(
    state: dict[str, torch.Tensor], path: str | Path, head_kind: str | None = None
) -> PaperCheckpoint:
    """Map a paper checkpoint's state dict onto mrl's model; :class:`MRLError` naming what was found and
    what was expected when it fits no layout of the paper's code.

    ``head_kind`` (mrl, mrl_e, ff, standard; None: from the keys, and the file name for a full-width
    ``fc``) must agree with the keys where they decide."""
    if head_kind is not None and head_kind not in HEAD_KINDS:
        raise MRLError(
            f"paper_head={head_kind!r} (for {path}) is none of the head kinds {', '.join(HEAD_KINDS)}: "
            "set it to one of those (mrl-eval paper_head=..., mrl.load(path, paper_head=...)), or leave it "
            "unset to read the head from the weights."
        )
    notes = []
    if all(k.startswith(DDP_PREFIX) for k in state):
        state = {k[len(DDP_PREFIX) :]: v for k, v in state.items()}
        notes.append("DDP 'module.' prefix removed")
    classifier = {k: v for k, v in state.items() if k.startswith("fc.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    blur = _drop_blur_filters(backbone, path)
    arch = _resnet_name(backbone, path)
    feature_dim = _feature_dim(backbone, arch, path)
    kind, nesting, head = _read_head(classifier, feature_dim, path, head_kind)
    mapped = {f"backbone.model.{k}": v for k, v in backbone.items()}
    mapped.update({f"head.{k}": v for k, v in head.items()})
    num_classes = int(head["weight"].shape[0])
    return PaperCheckpoint(arch, kind, nesting, num_classes, feature_dim, "bias" in head, blur, mapped, notes)


def _unknown(path: str | Path, found: str) -> MRLError:
    return MRLError(
        f"{path} holds a plain state dict (no mrl training config), but not in a layout mrl reads: {found}. "
        f"Expected {EXPECTED}. mrl also reads the checkpoints mrl-train writes (.ckpt) and the "
        "model.safetensors mrl-eval exports; convert other files to one of these layouts."
    )


def _sample(keys: Any, n: int = 6) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more if keys else "none"


def _drop_blur_filters(backbone: dict[str, torch.Tensor], path: str | Path) -> bool:
    """Remove the constant BlurPool filters (checking they are FFCV's); whether there were any."""
    filters = [k for k in backbone if k.endswith(".blur_filter")]
    for key in filters:
        value = backbone.pop(key)
        expected = binomial_filter(value.shape[0]) if value.dim() == 4 else None
        if expected is None or value.shape != expected.shape or not torch.allclose(value.float(), expected):
            raise _unknown(
                path, f"{key} of shape {tuple(value.shape)} is not FFCV's 3x3 binomial BlurPool filter"
            )
    return bool(filters)


def _resnet_name(backbone: dict[str, torch.Tensor], path: str | Path) -> str:
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in backbone if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = "layer1.0.conv3.weight" in backbone
    name = RESNETS.get((tuple(blocks), bottleneck))
    if name is None or "conv1.weight" not in backbone:
        found = (
            f"backbone keys {_sample(backbone)}; blocks per stage {blocks}, "
            f"{'bottleneck' if bottleneck else 'basic'} blocks"
        )
        raise _unknown(path, f"{found}, which is none of torchvision's {', '.join(sorted(RESNETS.values()))}")
    return name


def _feature_dim(backbone: dict[str, torch.Tensor], arch: str, path: str | Path) -> int:
    """The pooled feature size: the channels of the last block's last BatchNorm."""
    last = max(int(m.group(1)) for k in backbone if (m := re.match(r"layer4\.(\d+)\.", k)))
    key = f"layer4.{last}.bn3.weight" if "layer1.0.conv3.weight" in backbone else f"layer4.{last}.bn2.weight"
    if key not in backbone:
        raise _unknown(path, f"no {key}, which a torchvision {arch} has")
    return int(backbone[key].shape[0])


def _read_head(
    fc: dict[str, torch.Tensor], feature_dim: int, path: str | Path, head_kind: str | None
) -> tuple[str, list[int], dict[str, torch.Tensor]]:
    """``(kind, nesting, {"weight": ..., "bias": ...})`` of the classifier, as MatryoshkaLinear stores it."""
    if any(CLASSIFIER.match(k) for k in fc):
        layers = _nesting_classifiers(fc, path)
        if len(layers) == 1 and layers[0][0].shape[1] == feature_dim:
            kind = _agree(head_kind, "mrl_e", path, "one full-width fc.nesting_classifier_0 (MRL-E)")
            weight, bias = layers[0]
            return kind, default_nesting(feature_dim, MRL_E_MIN_SIZE), _tensors(weight, bias)
        nesting = [int(w.shape[1]) for w, _ in layers]
        if len(layers) == 1 or nesting != sorted(set(nesting)) or nesting[-1] > feature_dim:
            raise _unknown(
                path,
                f"nesting classifiers of in_features {nesting} (MRL needs increasing sizes up to the "
                f"{feature_dim} pooled features, MRL-E one classifier of all {feature_dim})",
            )
        _agree(head_kind, "mrl", path, f"{len(layers)} nesting classifiers (MRL)")
        biases = [b for _, b in layers]
        bias = torch.stack(biases) if biases[0] is not None else None
        return "mrl", nesting, _tensors(torch.cat([w for w, _ in layers], dim=1), bias)
    weight, bias = fc.get("fc.weight"), fc.get("fc.bias")
    if set(fc) - {"fc.weight", "fc.bias"} or not _is_linear(weight, bias) or weight.shape[1] > feature_dim:
        raise _unknown(path, f"classifier keys {_sample(f'{k} {tuple(v.shape)}' for k, v in fc.items())}")
    d = int(weight.shape[1])
    if d < feature_dim:
        _agree(head_kind, "ff", path, f"fc.weight of {d} < {feature_dim} features (FF-{d})")
        return "ff", [d], _tensors(weight, None if bias is None else bias[None])
    kind = head_kind or ("mrl_e" if MRL_E_FILE_NAME.search(Path(path).name) else "standard")
    if kind == "mrl_e":  # the repository's older MRL-E notation (SingleHeadNestedLinear)
        return kind, default_nesting(feature_dim, MRL_E_MIN_SIZE), _tensors(weight, bias)
    kind = _agree(
        head_kind, "standard", path, f"one fc.weight of all {feature_dim} features (FF-{d}, or MRL-E)"
    )
    return kind, [d], _tensors(weight, None if bias is None else bias[None])


def _nesting_classifiers(
    fc: dict[str, torch.Tensor], path: str | Path
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(weight, bias or None)]`` of ``fc.nesting_classifier_0 ..`` in index order, checked."""
    unknown = [k for k in fc if not CLASSIFIER.match(k)]
    indices = sorted({int(CLASSIFIER.match(k).group(1)) for k in fc if CLASSIFIER.match(k)})
    if unknown or indices != list(range(len(indices))):
        raise _unknown(path, f"classifier keys {_sample(fc)} (expected fc.nesting_classifier_0 .. _<G-1>)")
    layers = [
        (fc.get(f"fc.nesting_classifier_{i}.weight"), fc.get(f"fc.nesting_classifier_{i}.bias"))
        for i in indices
    ]
    classes = {int(w.shape[0]) for w, _ in layers if w is not None and w.dim() == 2}
    with_bias = {b is not None for _, b in layers}
    if not all(_is_linear(w, b) for w, b in layers) or len(classes) != 1 or len(with_bias) != 1:
        shapes = {k: tuple(v.shape) for k, v in fc.items()}
        raise _unknown(
            path, f"nesting classifiers {shapes} (each needs weight (C, m) and all the same C and bias)"
        )
    return layers


def _is_linear(weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """``weight`` (C, d) and ``bias`` (C,) or absent: an ``nn.Linear``'s tensors."""
    if weight is None or weight.dim() != 2:
        return False
    return bias is None or tuple(bias.shape) == (weight.shape[0],)


def _tensors(weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"weight": weight, **({"bias": bias} if bias is not None else {})}


def _agree(requested: str | None, found: str, path: str | Path, what: str) -> str:
    """``found``, unless the caller asked for another head kind than the keys allow (an error)."""
    if requested is not None and requested != found:
        raise MRLError(
            f"{path} holds {what}, which is read as head kind '{found}', not the requested '{requested}'. "
            f"Leave paper_head unset (mrl-eval paper_head=null, mrl.load(path)) or set it to {found}."
        )
    return found
