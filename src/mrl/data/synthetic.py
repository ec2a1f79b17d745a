"""Synthetic images of any shape and class count, for tests, smoke runs and throughput measurements.

By default the loader hands over only sample indices and labels, and each batch's images are rendered
on the device the model runs on: the host does no per-image work at all, which is what a throughput
measurement of the model needs. ``in_memory=true`` renders every split once into host memory instead
and hands over uint8 batches, the way a real data set's loader does (the host -> device copy included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info

from mrl.data.base import MRLDataModule
from mrl.data.preprocess import normalize_uint8_batch

MASK32 = 0xFFFF_FFFF
# pixel = 128 + 32 * (prototype + noise): mean and std of the normalisation that gives back
# prototype + noise (both in units of the prototypes' standard deviation)
MEAN, STD = 128 / 255, 32 / 255


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, elementwise on int64 tensors (products stay below 2**63 on any device)."""
    x = x & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


class SyntheticImages(Dataset):
    """``length`` images ``uint8 (in_chans, img_size, img_size)``: a class prototype plus noise.

    Label and image of item ``i`` are functions of ``(seed, i)`` alone (a counter-based hash, on any
    device), so the data set is reproducible, needs no memory, and is the same whichever process or
    device renders it; it is learnable (the prototypes differ per class), so tests see accuracy rise.
    Batches are fetched whole (``__getitems__``) as ``(keys, labels)``: ``keys`` identify the items
    (seed and index hashed), and :meth:`Renderer.render` turns them into images.
    """

    def __init__(self, length: int, num_classes: int, seed: int) -> None:
        self.length = int(length)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        indices = torch.arange(self.length)
        self.keys = hash32(hash32(indices + self.seed * 0x9E3779B1) ^ (self.seed & MASK32))
        self.labels = hash32(self.keys ^ 0x5BD1E995) % self.num_classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.keys[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        return self.keys[index], self.labels[index]


class Renderer:
    """Images from item keys and labels: ``uint8 (B, C, H, W)``, computed on the keys' device."""

    def __init__(self, num_classes: int, in_chans: int, img_size: int, noise: float, prototype_seed: int):
        self.shape = (int(in_chans), int(img_size), int(img_size))
        self.noise = float(noise)
        # Low-resolution prototypes, upsampled per batch: smooth, so convnets learn them fast.
        generator = torch.Generator().manual_seed(prototype_seed)
        self.prototypes = torch.randn(num_classes, in_chans, 4, 4, generator=generator)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def render(self, keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = keys.device
        if device not in self._on_device:
            pixels = torch.arange(self.shape[0] * self.shape[1] * self.shape[2], device=device)
            self._on_device[device] = (self.prototypes.to(device), (pixels * 0x27D4EB2D) & MASK32)
        prototypes, pixel_keys = self._on_device[device]
        base = F.interpolate(prototypes[labels], size=self.shape[1:], mode="bilinear", align_corners=False)
        # uniform noise of unit variance from a hash of (item, pixel)
        bits = hash32(keys[:, None] ^ pixel_keys[None, :]).view(-1, *self.shape)
        noise = (bits.float() * (1.0 / 2**32) - 0.5) * (12**0.5)
        image = base.add_(noise, alpha=self.noise).mul_(STD * 255).add_(MEAN * 255)
        return image.round_().clamp_(0, 255).to(torch.uint8)


class RenderedImages(Dataset):
    """A :class:`SyntheticImages` rendered once into host memory: batches of ``uint8`` images."""

    def __init__(self, source: SyntheticImages, renderer: Renderer, chunk: int = 256) -> None:
        n = len(source)
        self.labels = source.labels
        self.images = (
            torch.cat(
                [
                    renderer.render(source.keys[s : s + chunk], self.labels[s : s + chunk])
                    for s in range(0, n, chunk)
                ]
            )
            if n
            else torch.empty(0, *renderer.shape, dtype=torch.uint8)
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        # Where a GPU waits for the batch, it is gathered into pinned memory from CUDA's caching host
        # allocator: a fresh pageable buffer costs more in page faults than the gather itself
        # (benchmarks/input_pipeline.py), and a pinned batch goes to the GPU without another copy. Only
        # in the main process: a forked loader worker must not touch CUDA.
        pin = torch.cuda.is_available() and get_worker_info() is None
        out = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        return torch.index_select(self.images, 0, index, out=out), self.labels[index]


def fetched_batch(batch: Any) -> Any:
    """The collate step of batches fetched whole by ``__getitems__``: they are batches already."""
    return batch


class SyntheticDataModule(MRLDataModule):
    """Random learnable images; train, val and test are disjoint draws of the same classes. Training
    batches are flipped at random (several views: independent flips, ``configure_views``).

    ``noise`` is the noise's standard deviation relative to the prototypes'. ``in_memory=True`` renders
    every split once into host memory (see the module docstring).
    """

    multi_view = True

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        noise: float = 1.0,
        seed: int = 0,
        in_memory: bool = False,
        **loader_kwargs,
    ) -> None:
        super().__init__(seed=seed, **loader_kwargs)
        self.num_classes = int(num_classes)
        self.classes = tuple(str(i) for i in range(self.num_classes))  # unnamed: the labels themselves
        self.in_chans = int(in_chans)
        self.img_size = int(img_size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.noise = noise
        self.in_memory = bool(in_memory)
        self.mean, self.std = (MEAN,) * self.in_chans, (STD,) * self.in_chans
        self._stats = torch.tensor(self.mean), torch.tensor(self.std)
        self.renderer = Renderer(
            self.num_classes, self.in_chans, self.img_size, noise, prototype_seed=self.seed
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets = {
            split: SyntheticImages(size, self.num_classes, seed=self.seed * 3 + i)
            for i, (split, size) in enumerate(self.sizes.items())
        }
        if self.in_memory:
            self.datasets = {split: RenderedImages(ds, self.renderer) for split, ds in self.datasets.items()}

    def _loader(self, split: str, train: bool, **options: Any):
        return super()._loader(split, train, collate_fn=fetched_batch, **options)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if x.dim() == 1:  # item keys: render the images here, on the device
            x = self.renderer.render(x, y)
        train = self.trainer is not None and self.trainer.training
        views = self.views if train else 1
        gen = self.augmentation_generator(x.device) if train else None  # views: drawn one after the other
        out = [normalize_uint8_batch(x, *self._stats, flip=train, generator=gen) for _ in range(views)]
        return (out[0] if views == 1 else torch.stack(out)), y
