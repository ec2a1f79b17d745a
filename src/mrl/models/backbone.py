"""Backbones: any timm model as a feature extractor, with an optional projection to ``embed_dim``."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from torch import nn

from mrl.errors import MRLError
from mrl.models import blurpool


class ImageTooSmallError(MRLError):
    """The backbone cannot process images of the data's size (too many downsampling stages)."""


# Sizes tried, in order, when small resizable images (Fashion-MNIST's 28 px) are too small for a backbone.
UPSIZES = (32, 64, 128, 256)
Built = TypeVar("Built")


def build_with_upsizing(build: Callable[[int], Built], img_size: int, resizable: bool) -> tuple[Built, int]:
    """``(build(size), size)`` for ``size = img_size``, or, when that raises :class:`ImageTooSmallError`
    and the images may be resized, for the smallest of :data:`UPSIZES` the backbone accepts.

    Shared by training (which then resizes the data) and the deployment API (which rebuilds the trained
    model at the size it was trained at), so both pick the same size. The first error is raised when no
    size works."""
    try:
        return build(img_size), img_size
    except ImageTooSmallError as first_error:
        if not resizable:
            raise
        for size in UPSIZES:
            if size <= img_size:
                continue
            try:
                return build(size), size
            except ImageTooSmallError:
                continue
        raise first_error from None


def check_model_name(name: str) -> None:
    """Raise :class:`MRLError` with close matches when ``name`` is not a timm model."""
    if timm.is_model(name):
        return
    suggestions = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    raise MRLError(
        f"Unknown backbone '{name}': timm has no model of that name.{hint} "
        "List the choices with `python -c \"import timm; print(timm.list_models('*resnet*'))\"` "
        "and pass one as backbone.name=<name>."
    )


def _create_timm_model(name: str, in_chans: int, img_size: int | None, **kwargs: Any) -> nn.Module:
    # Models with a fixed input grid (ViT, Swin, ...) must be told the data's image size; others reject
    # the argument, so try with it first and fall back without it.
    if img_size is not None:
        try:
            return timm.create_model(name, num_classes=0, in_chans=in_chans, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, num_classes=0, in_chans=in_chans, **kwargs)


def _pretrained_kwargs(name: str, pretrained: bool, pretrained_path: str | None) -> dict[str, Any]:
    """timm arguments that load weights from a local file or the local Hugging Face cache only."""
    if pretrained_path:
        path = Path(pretrained_path).expanduser()
        if not path.is_file():
            raise MRLError(
                f"backbone.pretrained_path={pretrained_path} does not exist. Point it at a local weights "
                "file (.safetensors, .pth or .bin) for this timm model, or set backbone.pretrained=false."
            )
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    if pretrained:
        # Never download at run time: cluster nodes are often offline. The cache is used if present.
        _hub_offline()
        missing = _missing_local_weights(name)
        if missing:
            raise MRLError(
                f"backbone.pretrained=true but {missing}. mrl never downloads weights at run time: download "
                "them on a machine with internet (timm.create_model(name, pretrained=True) puts them in that "
                "cache) and copy the cache here, or save them to a file and pass backbone.pretrained_path="
                "<file>; or train from scratch with backbone.pretrained=false."
            )
        return {"pretrained": True}
    return {"pretrained": False}


def _hub_offline() -> None:
    """Hugging Face Hub offline unless the user set HF_HUB_OFFLINE: huggingface_hub reads the variable
    when it is imported (timm imports it), so its module constant is set too. Without this a missing
    file costs a minute of connection retries before the error."""
    if "HF_HUB_OFFLINE" in os.environ and os.environ["HF_HUB_OFFLINE"].lower() in ("0", "false", "no", ""):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True


# The files timm reads from a Hub repository (the safetensors alternative first).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _missing_local_weights(name: str) -> str | None:
    """Where timm would read ``name``'s pretrained weights from, when no local copy is there (None: found,
    or not known, and timm's own error then follows). Weights timm does not have are refused."""
    try:
        from timm.models import get_pretrained_cfg
        from timm.models._builder import _resolve_pretrained_source
    except ImportError:
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag
        cfg = None
    source, location = _resolve_pretrained_source(cfg.to_dict()) if cfg is not None else ("", "")
    if not source:
        raise MRLError(
            f"backbone.pretrained=true but timm has no pretrained weights named '{name}'. List the ones it "
            "has with `python -c \"import timm; print(timm.list_pretrained('<name>*'))\"`, or train from "
            "scratch with backbone.pretrained=false."
        )
    if source == "hf-hub":
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo, filename = location if isinstance(location, tuple) else (location, None)
        repo = repo.split("@")[0]
        files = (filename,) if filename else HUB_WEIGHT_FILES
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
            return None
        return f"no local copy of its weights ({repo} on the Hugging Face Hub) is in the cache {HF_HUB_CACHE}"
    if source == "url":
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(location).split("?")[0]).name
        return None if cached.is_file() else f"no local copy of its weights ({location}) is at {cached}"
    if source in ("file", "local-dir"):
        return None if Path(str(location)).exists() else f"its weights file {location} does not exist"
    return None


class TimmBackbone(nn.Module):
    """A timm model with its classifier removed, returning pooled embeddings ``(B, embed_dim)``.

    The pooled feature size is measured with a forward pass, since it is not always
    ``model.num_features`` (models with a head projection, for example MobileNetV3, differ).
    ``embed_dim`` adds a linear projection after pooling, so that for example a 512-d ResNet-18 can
    learn a 2048-d Matryoshka embedding. ``blur_strided_convs`` adds FFCV's BlurPool before every strided
    convolution (:mod:`mrl.models.blurpool`), the architecture of the paper's published ResNet-50s.
    """

    def __init__(
        self,
        name: str,
        in_chans: int = 3,
        img_size: int | None = None,
        embed_dim: int | None = None,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        drop_path_rate: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
        blur_strided_convs: bool = False,
    ) -> None:
        super().__init__()
        check_model_name(name)
        kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        kwargs.update(_pretrained_kwargs(name, pretrained, pretrained_path))
        try:
            self.model = _create_timm_model(name, in_chans, img_size, **kwargs)
        except MRLError:
            raise
        except (OSError, RuntimeError, ValueError) as err:
            if not kwargs.get("pretrained"):
                raise
            raise MRLError(
                f"Could not load pretrained weights for backbone '{name}' from local files ({err}). mrl "
                "never downloads weights at run time: download them on a machine with internet (they go "
                "to the Hugging Face cache, ~/.cache/huggingface) or save them to a file and pass "
                "backbone.pretrained_path=<file>; or train from scratch with backbone.pretrained=false."
            ) from err
        self.blur_strided_convs = bool(blur_strided_convs)
        if self.blur_strided_convs:
            blurpool.blur_strided_convs(self.model)
        self.name = name
        self.in_chans = in_chans
        self.img_size = img_size
        self.feature_dim = self._measure_feature_dim()
        self.projection = nn.Linear(self.feature_dim, embed_dim) if embed_dim else nn.Identity()
        self.embed_dim = int(embed_dim) if embed_dim else self.feature_dim

    @torch.no_grad()
    def _measure_feature_dim(self) -> int:
        size = self.img_size or self.data_config()["input_size"][-1]
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(torch.zeros(1, self.in_chans, size, size))
        except RuntimeError as err:
            raise ImageTooSmallError(
                f"Backbone '{self.name}' cannot process {self.in_chans}x{size}x{size} images ({err}). Pick a "
                "model that fits the data's image size (small images need models with few downsampling "
                "stages, for example resnet18 or test_byobnet for 28x28), or resize the data with "
                "data.img_size=<pixels> where the data module supports it."
            ) from err
        finally:
            self.model.train(was_training)
        return int(out.shape[-1])

    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing config (input size, mean, std, interpolation, crop) of this model."""
        return timm.data.resolve_model_data_config(self.model)

    def forward(
        self, x: torch.Tensor, stages: Sequence[int] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The embedding ``(B, embed_dim)``; with ``stages`` (indices into timm's ``feature_info``) also
        those stages' feature maps ``(B, C_s, H_s, W_s)``, from the same pass.

        One call, so ``compile=true`` (which compiles this module) covers the stage maps too. timm's
        ``forward_intermediates`` returns the maps and the final unpooled features, which
        ``forward_head`` pools into what ``model(x)`` gives (tests/models/test_depth_matryoshka.py checks both
        across model families)."""
        if stages is None:
            return self.projection(self.model(x))
        final, maps = self.model.forward_intermediates(x, indices=list(stages))
        return self.projection(self.model.forward_head(final)), list(maps)
