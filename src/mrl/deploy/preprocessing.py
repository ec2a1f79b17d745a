"""Raw images -> the float tensors a deployed model takes, as its evaluation data was preprocessed.

The model's :class:`~mrl.models.spec.Preprocessing` says how: timm's eval transform (image files), the
in-memory datamodules' uint8 normalisation, or none (the data were float tensors already).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mrl.data.decode import UnsupportedImage, match_channels, pil_channels
from mrl.errors import MRLError
from mrl.models.spec import TIMM, UINT8, Preprocessing

ImageInput = torch.Tensor | np.ndarray | Sequence[Any]


def image_transform(preprocessing: Preprocessing) -> Callable[[Any], torch.Tensor]:
    """A per-image callable: one PIL image or uint8 array ``(H, W)`` / ``(H, W, C)`` -> the float tensor
    ``(C, H, W)`` the model takes (picklable, for a ``Dataset``'s transform)."""
    p = preprocessing
    if p.kind == TIMM:
        from timm.data import create_transform

        # The eval transform the ImageFolder datamodule uses (same timm data config).
        return create_transform(**p.data_config, is_training=False)
    if p.kind == UINT8:
        return Uint8Transform(p.in_chans, p.img_size, p.mean, p.std)
    raise MRLError(
        "This model was trained on float tensors (synthetic data), not images: pass a float tensor "
        f"(B, {p.in_chans}, {p.img_size}, {p.img_size}) to embed()."
    )


def to_batch(
    images: ImageInput, preprocessing: Preprocessing, transform: Callable[[], Callable]
) -> torch.Tensor:
    """Model inputs ``(B, C, H, W)`` on the CPU (see :meth:`mrl.deploy.MatryoshkaModel.preprocess` for
    what ``images`` may be); ``transform()`` gives the per-image transform, asked for only when needed."""
    in_chans = preprocessing.in_chans
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images if images.dim() == 4 else images.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise MRLError(
                f"Expected preprocessed images (B, {in_chans}, H, W), got a tensor of shape "
                f"{tuple(images.shape)}."
            )
        return x
    if isinstance(images, torch.Tensor):
        if images.dim() == 2:  # one grey image (H, W)
            images = images.unsqueeze(0)
        t = images if images.dim() == 4 else images.unsqueeze(0)
        if t.dim() != 4:
            raise MRLError(
                f"Expected uint8 images (B, C, H, W), (C, H, W) or (H, W); got a tensor of shape "
                f"{tuple(images.shape)}."
            )
        items: list[Any] = [img.permute(1, 2, 0).cpu().numpy() for img in t]  # (H, W, C) each
    elif isinstance(images, np.ndarray):
        items = list(images) if images.ndim == 4 else [images]
    elif _is_pil(images):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise MRLError("No images given: pass at least one image.")
    per_image = transform()
    return torch.stack([per_image(_to_image(item, in_chans, preprocessing.kind)) for item in items])


class Uint8Transform:
    """uint8 image ``(H, W[, C])`` -> float ``(C, img_size, img_size)``: the in-memory datamodules' eval
    batch transform (:func:`mrl.data.preprocess.normalize_uint8_batch` without flipping), per image."""

    def __init__(self, in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.in_chans, self.img_size = int(in_chans), int(img_size)
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        from mrl.data.preprocess import normalize_uint8_batch

        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)  # a copy
        return normalize_uint8_batch(x, self.mean, self.std, flip=False, img_size=self.img_size)[0]


def _is_pil(item: Any) -> bool:
    return not isinstance(item, np.ndarray | torch.Tensor) and hasattr(item, "convert")


def _to_image(item: Any, in_chans: int, kind: str) -> Any:
    """One raw image as what the transform takes: a PIL image (timm) or a uint8 array ``(H, W, C)``, its
    pixels and channels as the data loaders give them (:mod:`mrl.data.decode`: any PIL mode, 16-bit
    samples scaled to 8 bits)."""
    if _is_pil(item):
        try:
            image = pil_channels(item, in_chans)
        except UnsupportedImage as err:
            raise MRLError(f"Cannot use this PIL image: {err}.") from err
    else:
        image = _array_channels(np.asarray(item), in_chans)
    array = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    if kind == TIMM:
        from PIL import Image

        return Image.fromarray(array[:, :, 0] if in_chans == 1 else array)
    return array


def _array_channels(array: np.ndarray, in_chans: int) -> torch.Tensor:
    """A uint8 or uint16 array ``(H, W[, C])`` -> ``uint8 (in_chans, H, W)`` (16-bit: the high byte, as
    image files are read)."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise MRLError(
            f"Raw images must be uint8 (0-255) or uint16 (0-65535), got {array.dtype}. Pass such images, or "
            "a float tensor already preprocessed like the evaluation data."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise MRLError(
            f"Expected an image (H, W) or (H, W, C) with 1, 3 or 4 channels, or a batch (B, H, W, C); got an "
            f"image of shape {array.shape}."
        )
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if array.shape[2] == in_chans:
        return image
    if in_chans not in (1, 3):
        raise MRLError(
            f"The model takes {in_chans}-channel images; got an image with {array.shape[2]}. Pass a float "
            f"tensor (B, {in_chans}, H, W) already preprocessed like the evaluation data."
        )
    return match_channels(image, in_chans)
