"""What the datamodules of encoded image files share (ImageFolder trees and LitData shards).

The loader hands over ``uint8 (B, 3, S, S)`` crops (``decode=cpu``: decoded and cropped in the loader
workers) or the encoded bytes themselves (``decode=gpu``: decoded in one batched nvJPEG call on the
training device, then cropped there). Flip, normalisation and random erasing follow per batch on the
device in both cases. See :mod:`mrl.data.preprocess` for the two halves.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from mrl.data.base import MRLDataModule
from mrl.data.decode import decode_reason, decode_rgb, is_fast_jpeg
from mrl.data.preprocess import (
    PIL_AUGMENT_KEYS,
    BatchTransform,
    CropSpec,
    ImageTransform,
    check_augment,
    random_resized_crop_params,
    train_crop,
)
from mrl.errors import MRLError

DECODE_MODES = ("cpu", "gpu")
# timm's ImageNet defaults, until the backbone's data config arrives (configure_transforms).
DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def auto_num_workers(processes_per_node: int) -> int:
    """Loader workers per training process when ``num_workers=auto``: the CPUs this process may use,
    shared by the node's training processes, less one for each process itself."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, processes_per_node) - 1)


class EncodedSample:
    """A loader item of ``decode=gpu``: the encoded bytes, the label and the seed of its crop."""

    __slots__ = ("data", "label", "seed")

    def __init__(self, data: bytes, label: int, seed: int) -> None:
        self.data, self.label, self.seed = data, label, seed


def collate_encoded(
    items: list[EncodedSample],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of encoded images ``(data, offsets, labels, seeds)``: all bytes in one flat uint8 tensor,
    image ``i`` at ``data[offsets[i]:offsets[i + 1]]``. One tensor, because a loader worker hands each
    tensor to the main process through a shared-memory segment of its own: one per image costs more
    than reading the image (benchmarks/input_pipeline.py, shard reading)."""
    sizes = [len(item.data) for item in items]
    if get_worker_info() is not None:
        # in a loader worker, allocated in shared memory, as torch's default_collate does: handing the
        # batch to the main process then copies nothing
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(sum(sizes)))
    else:
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
    view, start = flat.numpy(), 0
    for item, size in zip(items, sizes, strict=True):  # one copy of the bytes, straight into place
        view[start : start + size] = np.frombuffer(item.data, dtype=np.uint8)
        start += size
    return (
        flat,
        torch.tensor([0, *sizes], dtype=torch.long).cumsum(0),
        torch.tensor([item.label for item in items], dtype=torch.long),
        torch.tensor([item.seed for item in items], dtype=torch.long),
    )


def split_encoded(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The images of a :func:`collate_encoded` batch, as views of its flat tensor."""
    bounds = offsets.tolist()
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


class EncodedImageDataModule(MRLDataModule):
    """Base of the datamodules that read encoded images (3 channels, any size).

    ``img_size`` is the training crop, ``eval_img_size`` the evaluation crop (default ``img_size``);
    interpolation, mean, std and crop_pct come from the backbone's timm data config
    (:meth:`configure_transforms`). ``augment`` takes the keys of
    :data:`mrl.data.preprocess.AUGMENT_KEYS`. ``num_workers='auto'`` gives each training process its
    share of the node's CPUs.
    """

    in_chans = 3

    def __init__(
        self,
        img_size: int = 224,
        eval_img_size: int | None = None,
        augment: dict[str, Any] | None = None,
        decode: str = "cpu",
        seed: int = 0,
        num_workers: int | str = "auto",
        prefetch_factor: int | None = None,
        **loader_kwargs,
    ) -> None:
        self.auto_workers = num_workers == "auto"
        if not self.auto_workers and not (str(num_workers).isdigit() and int(num_workers) >= 0):
            raise MRLError(
                f"data.num_workers must be a number of loader workers (0: load in the training process) "
                f"or 'auto', got {num_workers!r}."
            )
        super().__init__(num_workers=0 if self.auto_workers else int(num_workers), seed=seed, **loader_kwargs)
        if decode not in DECODE_MODES:
            raise MRLError(
                f"data.decode={decode!r} is not a decode mode: use 'cpu' (decode and crop in the loader "
                "workers) or 'gpu' (decode with nvJPEG on the training device)."
            )
        self.decode = decode
        self.augment = check_augment(augment)
        if decode == "gpu" and any(self.augment.get(k) for k in PIL_AUGMENT_KEYS):
            raise MRLError(
                f"data.augment's {sorted(k for k in PIL_AUGMENT_KEYS if self.augment.get(k))} are timm's PIL "
                "transforms, which run in the loader workers: use data.decode=cpu with them, or drop them."
            )
        self.img_size = int(img_size)
        self._eval_img_size = int(eval_img_size) if eval_img_size else self.img_size
        self.prefetch_factor = prefetch_factor
        self._data_config: dict[str, Any] = {
            **DEFAULT_DATA_CONFIG,
            "input_size": (self.in_chans, self.img_size, self.img_size),
        }
        self._batch_transform: BatchTransform | None = None

    # ---- configuration ---------------------------------------------------------------------

    def configure_transforms(self, data_config: dict[str, Any]) -> None:
        """Take the backbone's timm data config (interpolation, mean, std, crop_pct, crop_mode)."""
        self._data_config = {**data_config, "input_size": (self.in_chans, self.img_size, self.img_size)}
        self._batch_transform = None
        self.datasets = {}

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's timm data config (timm's ImageNet defaults before :meth:`configure_transforms`),
        ``input_size`` at the training size; evaluation crops it at :attr:`eval_img_size`."""
        return self._data_config

    @property
    def eval_img_size(self) -> int:
        return self._eval_img_size

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self._data_config["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self._data_config["std"])

    def crop_spec(self, train: bool) -> CropSpec:
        size = self.img_size if train else self.eval_img_size
        return CropSpec.from_data_config(self.data_config, size, self.augment if train else None)

    def image_transform(self, train: bool) -> ImageTransform:
        """The per-image half for a split (what ``decode=cpu`` runs in the loader workers)."""
        return ImageTransform(self.crop_spec(train), train, self.augment if train else {}, self.mean)

    @property
    def batch_transform(self) -> BatchTransform:
        if self._batch_transform is None:
            self._batch_transform = BatchTransform(self.mean, self.std, self.augment)
        return self._batch_transform

    def image_file_transform(self) -> ImageTransform | None:
        # the eval split's own per-image half; decode=gpu hands over the bytes, as its loaders do
        return None if self.decode == "gpu" else self.image_transform(train=False)

    def loader_workers(self) -> int:
        if not self.auto_workers:
            return self.num_workers
        trainer = self.trainer
        return auto_num_workers(int(getattr(trainer, "num_devices", 1) or 1) if trainer else 1)

    def _loader_options(self) -> dict[str, Any]:
        workers = self.loader_workers()
        options: dict[str, Any] = {"num_workers": workers}
        if workers > 0 and self.prefetch_factor:
            options["prefetch_factor"] = int(self.prefetch_factor)
        if self.decode == "gpu":
            options["collate_fn"] = collate_encoded
        return options

    # ---- per batch, on the device ----------------------------------------------------------

    def _training(self) -> bool:
        return self.trainer is not None and self.trainer.training

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.decode != "gpu":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        data, offsets, labels, seeds = batch
        encoded = split_encoded(data, offsets)
        # labels are pinned by the loader (pin_memory): a non-blocking copy leaves the host free
        return self.decode_on(encoded, seeds, device, train=self._training()), labels.to(
            device, non_blocking=True
        )

    def decode_on(
        self, encoded: list[torch.Tensor], seeds: torch.Tensor, device: torch.device, train: bool
    ) -> torch.Tensor:
        """``decode=gpu``: decode a batch on ``device`` (nvJPEG on CUDA: one batched call), crop each
        image there, and stack the crops ``uint8 (B, 3, S, S)``. Crop sizes are drawn on the host from the
        decoded shapes, so nothing waits for the device."""
        images: list[torch.Tensor | None] = [None] * len(encoded)
        # JPEGs that nvJPEG decodes as the CPU path does (not CMYK); the rest through the CPU path
        jpegs = [i for i, data in enumerate(encoded) if is_fast_jpeg(data)]
        try:
            if jpegs:
                decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
                for i, image in zip(jpegs, decoded, strict=True):
                    images[i] = image
            for i, image in enumerate(images):
                if image is None:  # a PNG, a CMYK JPEG ... (ImageFolder trees): decoded by the CPU
                    images[i] = decode_rgb(encoded[i]).to(device)
        except RuntimeError as err:  # the batch's bytes carry no file names
            raise MRLError(
                f"An image of this batch does not decode ({decode_reason(err)}): the data set holds a "
                "truncated or corrupt file. Train with data.decode=cpu to have it named, then replace or "
                "delete it."
            ) from err
        spec = self.crop_spec(train)
        if not train:
            transform = self.image_transform(False)
            return torch.stack([transform(image) for image in images])
        crops = []
        for image, seed in zip(images, seeds.tolist(), strict=True):
            rng = random.Random(seed)
            params = random_resized_crop_params(image.shape[-2], image.shape[-1], spec.scale, spec.ratio, rng)
            crops.append(train_crop(image, params, spec, rng))
        return torch.stack(crops)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        train = self._training()
        generator = self.augmentation_generator(x.device) if train else None
        return self.batch_transform(x, train=train, generator=generator), y
