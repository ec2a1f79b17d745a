"""Image preprocessing on uint8 tensors, equal to timm's ``create_transform`` to within a grey level or two.

Split in two halves, so that no float image is ever built or collated on the host:

- per image, where images still differ in size (a loader worker, or the GPU after nvJPEG): decode,
  then the random resized crop for training or the resize + center crop for evaluation, giving
  ``uint8 (3, S, S)`` (:class:`ImageTransform`);
- per batch, on the device the model runs on: random horizontal flip, normalisation with the
  backbone's mean and std, and random erasing (:class:`BatchTransform`).

Why not timm's PIL transforms: decoding with torchvision (libjpeg-turbo) and resizing uint8 tensors
(torch's vectorised antialiased kernels) is the faster half of the two on a CPU core, and crops and
resizes on CUDA tensors the same way; ``benchmarks/input_pipeline.py`` prints both. The parameters
(crop sampling, scale size, crop_pct, interpolation) follow timm exactly, and
``tests/data/test_preprocess.py`` checks the pixels against timm's transforms.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mrl.data.decode import decode_channels
from mrl.errors import MRLError

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
# timm's training augmentation keys this pipeline accepts (``data.augment``), with their meaning:
# crop (scale, ratio, hflip) and batch-level random erasing are ours; the rest is timm's own secondary
# transforms, run on the cropped image.
AUGMENT_KEYS = {
    "scale": "random resized crop: range of the crop's area fraction (default 0.08-1)",
    "ratio": "random resized crop: range of its aspect ratio (default 3/4-4/3)",
    "hflip": "probability of a horizontal flip (default 0.5)",
    "auto_augment": "timm AutoAugment / RandAugment / AugMix spec, e.g. rand-m9-mstd0.5-inc1",
    "color_jitter": "timm color jitter strength (default off, as the paper's recipe)",
    "color_jitter_prob": "probability of applying the color jitter",
    "grayscale_prob": "probability of converting to grey",
    "gaussian_blur_prob": "probability of a Gaussian blur",
    "re_prob": "timm random erasing probability, per image, on the device",
    "re_mode": "random erasing fill: const, rand or pixel",
    "re_count": "random erasing: at most this many boxes per image",
}
# the keys above that configure timm's PIL transforms (loader workers only)
PIL_AUGMENT_KEYS = (
    "auto_augment",
    "color_jitter",
    "color_jitter_prob",
    "grayscale_prob",
    "gaussian_blur_prob",
)


def check_augment(augment: dict[str, Any] | None) -> dict[str, Any]:
    """``data.augment`` as a plain dict, refusing keys the pipeline does not know (a misspelt key would
    otherwise silently train without the augmentation)."""
    augment = dict(augment or {})
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in AUGMENT_KEYS.items())
        raise MRLError(
            f"data.augment has unknown key(s) {unknown}. The image pipeline supports: {known}. Fix the "
            "key or remove it."
        )
    return augment


@dataclass(frozen=True)
class CropSpec:
    """What the per-image half needs: output size and timm's crop settings for one split."""

    size: int
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_data_config(
        cls, data_config: dict[str, Any], size: int, augment: dict[str, Any] | None = None
    ) -> CropSpec:
        """From a timm data config (``resolve_model_data_config``) at ``size`` pixels."""
        augment = augment or {}
        interpolation = str(data_config.get("interpolation") or "bilinear")
        if interpolation not in (*INTERPOLATIONS, "random"):
            raise MRLError(
                f"Interpolation '{interpolation}' is not supported by mrl's image pipeline; use one of "
                f"{sorted(INTERPOLATIONS)} (data config of the backbone)."
            )
        crop_mode = str(data_config.get("crop_mode") or "center")
        if crop_mode not in ("center", "squash"):
            raise MRLError(
                f"crop_mode '{crop_mode}' (the backbone's timm data config) is not supported by mrl's image "
                "pipeline; 'center' and 'squash' are."
            )
        return cls(
            size=int(size),
            interpolation=interpolation,
            crop_pct=float(data_config.get("crop_pct") or 0.875),
            crop_mode=crop_mode,
            scale=tuple(float(v) for v in augment.get("scale", (0.08, 1.0))),
            ratio=tuple(float(v) for v in augment.get("ratio", (3 / 4, 4 / 3))),
        )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: a function of ``(seed, epoch, index)`` alone,
    so any worker, rank or resumed run draws the same crop for it."""
    # int hashing is stable across processes (no hash randomisation for ints)
    return hash((int(seed), int(epoch), int(index))) & (2**63 - 1)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random source of :func:`sample_seed`."""
    return random.Random(sample_seed(seed, epoch, index))


def random_resized_crop_params(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, drawn as timm's
    ``RandomResizedCropAndInterpolation.get_params`` draws it (same calls, same order), but from
    ``rng`` instead of the process-wide ``random`` module, so the crop is a function of the sample."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: the central crop of the allowed aspect ratios
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _interpolation(name: str, rng: random.Random | None) -> InterpolationMode:
    if name == "random":  # timm: bilinear or bicubic at random, per image
        return (rng or random).choice((InterpolationMode.BILINEAR, InterpolationMode.BICUBIC))
    return INTERPOLATIONS[name]


def train_crop(
    image: torch.Tensor, params: tuple[int, int, int, int], spec: CropSpec, rng: random.Random | None = None
) -> torch.Tensor:
    """The random resized crop ``params`` of ``image`` ``(C, H, W)`` resized to ``spec.size``."""
    top, left, h, w = params
    return F.resized_crop(
        image,
        top,
        left,
        h,
        w,
        [spec.size, spec.size],
        interpolation=_interpolation(spec.interpolation, rng),
        antialias=True,
    )


def eval_crop(image: torch.Tensor, spec: CropSpec) -> torch.Tensor:
    """timm's evaluation crop: resize to ``floor(size / crop_pct)`` (the shorter side for ``center``,
    both sides for ``squash``), then the central ``size x size``."""
    scale_size = math.floor(spec.size / spec.crop_pct)
    interpolation = _interpolation(spec.interpolation if spec.interpolation != "random" else "bilinear", None)
    target = [scale_size] if spec.crop_mode == "center" else [scale_size, scale_size]
    resized = F.resize(image, target, interpolation=interpolation, antialias=True)
    return F.center_crop(resized, [spec.size, spec.size])


def _secondary_augment(augment: dict[str, Any], spec: CropSpec, mean: Sequence[float]) -> Callable | None:
    """timm's own "secondary" training transforms (AutoAugment/RandAugment, color jitter, grey, blur) on
    PIL images, or None when none is configured."""
    if not any(augment.get(k) for k in PIL_AUGMENT_KEYS):
        return None
    from timm.data.transforms_factory import transforms_imagenet_train

    _, secondary, _ = transforms_imagenet_train(
        img_size=spec.size,
        color_jitter=augment.get("color_jitter"),
        color_jitter_prob=augment.get("color_jitter_prob"),
        grayscale_prob=float(augment.get("grayscale_prob") or 0.0),
        gaussian_blur_prob=float(augment.get("gaussian_blur_prob") or 0.0),
        auto_augment=augment.get("auto_augment"),
        interpolation=spec.interpolation,
        mean=tuple(mean),
        separate=True,
        use_prefetcher=True,
    )
    return secondary if secondary.transforms else None


@dataclass
class ImageTransform:
    """Per image, where the loader works: encoded bytes (or a decoded ``uint8 (3, H, W)``) -> ``uint8
    (3, S, S)``. Training draws its crop from the sample's own ``rng`` (:func:`sample_rng`); evaluation
    is deterministic. Picklable, so loader workers receive it."""

    spec: CropSpec
    train: bool
    augment: dict[str, Any] = field(default_factory=dict)
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    # channels of the decoded image: 3 (RGB) for the file-reading datamodules; 1 (grey) where a grey
    # in-memory data set's model evaluates image files
    in_chans: int = 3

    def __post_init__(self) -> None:
        self._secondary = _secondary_augment(self.augment, self.spec, self.mean) if self.train else None

    def __call__(self, data: Any, rng: random.Random | None = None) -> torch.Tensor:
        image = (
            data
            if isinstance(data, torch.Tensor) and data.dim() == 3
            else decode_channels(data, self.in_chans)
        )
        if not self.train:
            return eval_crop(image, self.spec)
        rng = rng or random.Random()
        params = random_resized_crop_params(
            image.shape[-2], image.shape[-1], self.spec.scale, self.spec.ratio, rng
        )
        out = train_crop(image, params, self.spec, rng)
        if self._secondary is not None:
            out = self._apply_secondary(out, rng)
        return out

    def _apply_secondary(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        from PIL import Image

        # timm's augmentations draw from the process-wide `random` and numpy generators: seeded from the
        # sample's own rng for the call, and the process's states put back, so they are as reproducible
        # as the crop.
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        try:
            pil = self._secondary(Image.fromarray(image.permute(1, 2, 0).numpy()))
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)


def normalize_uint8_batch(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    flip: bool,
    img_size: int | None = None,
    generator: torch.Generator | None = None,
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` -> normalised floats, with a random horizontal flip when ``flip``
    and a bilinear resize to ``img_size`` when it differs from the stored size.

    Done per batch on the loader's device instead of per sample in Python: the images travel as uint8
    (a quarter of float32's bytes) and the arithmetic runs where the model runs.
    """
    x = x.float().div_(255.0)
    if img_size is not None and x.shape[-1] != img_size:
        x = torch.nn.functional.interpolate(
            x, size=(img_size, img_size), mode="bilinear", align_corners=False
        )
    if flip and flip_prob > 0:
        flipped = torch.rand(x.shape[0], device=x.device, generator=generator) < flip_prob
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    mean, std = _on_device(mean, std, x.device)
    return x.sub_(mean).div_(std)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad a batch by ``padding`` px and crop each image back to its size at a random offset."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows, cols]


_STATS_ON_DEVICE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _on_device(
    mean: torch.Tensor, std: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``(1, C, 1, 1)`` tensors on ``device``, copied there once: a copy from
    pageable host memory at every batch may make the host wait for the device's queue."""
    key = (tuple(mean.tolist()), tuple(std.tolist()), device)
    if key not in _STATS_ON_DEVICE:
        _STATS_ON_DEVICE[key] = (mean.to(device).view(1, -1, 1, 1), std.to(device).view(1, -1, 1, 1))
    return _STATS_ON_DEVICE[key]


class BatchTransform:
    """Per batch, on the device: ``uint8 (B, 3, S, S)`` -> normalised floats; in training also the
    random flip and (``re_prob > 0``) timm's random erasing, which takes a batch on any device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: dict[str, Any] | None = None):
        augment = augment or {}
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.flip_prob = float(augment.get("hflip", 0.5))
        self.re_prob = float(augment.get("re_prob") or 0.0)
        self.re_mode = str(augment.get("re_mode") or "const")
        self.re_count = int(augment.get("re_count") or 1)
        self._erasing: dict[torch.device, Any] = {}

    def __call__(
        self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = normalize_uint8_batch(
            x, self.mean, self.std, flip=train, generator=generator, flip_prob=self.flip_prob
        )
        if train and self.re_prob > 0:
            x = self._erasing_on(x.device)(x)
        return x

    def _erasing_on(self, device: torch.device):
        if device not in self._erasing:
            from timm.data.random_erasing import RandomErasing

            self._erasing[device] = RandomErasing(
                self.re_prob, mode=self.re_mode, max_count=self.re_count, device=str(device)
            )
        return self._erasing[device]
