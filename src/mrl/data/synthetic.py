"""Synthetic images of any shape and class count, for tests, smoke runs and throughput measurements."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from mrl.data.base import MRLDataModule


class SyntheticImages(Dataset):
    """``length`` images ``(in_chans, img_size, img_size)``: a class prototype plus Gaussian noise.

    Every item is generated from ``(seed, index)``, so the data set is reproducible, needs no memory
    and is learnable (the prototypes differ per class), which lets tests see accuracy rise.
    """

    def __init__(
        self,
        length: int,
        num_classes: int,
        in_chans: int,
        img_size: int,
        seed: int,
        noise: float,
        prototype_seed: int,
    ) -> None:
        self.length = int(length)
        self.num_classes = int(num_classes)
        self.shape = (int(in_chans), int(img_size), int(img_size))
        self.seed = int(seed)
        self.noise = float(noise)
        # Low-resolution prototypes upsampled to the image size: smooth, so convnets learn them fast.
        gen = torch.Generator().manual_seed(prototype_seed)
        low = torch.randn(self.num_classes, in_chans, 4, 4, generator=gen)
        self.prototypes = torch.nn.functional.interpolate(low, size=(img_size, img_size), mode="bilinear")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        image = self.prototypes[label] + self.noise * torch.randn(self.shape, generator=gen)
        return image, label


class SyntheticDataModule(MRLDataModule):
    """Random learnable images; train, val and test are disjoint draws of the same classes.

    ``in_memory=True`` generates every split once into tensors (benchmarks: no per-item generation cost).
    """

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
        super().__init__(**loader_kwargs)
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.img_size = int(img_size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.noise = noise
        self.seed = int(seed)
        self.in_memory = bool(in_memory)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets = {
            split: SyntheticImages(
                size,
                self.num_classes,
                self.in_chans,
                self.img_size,
                seed=self.seed * 3 + i,
                noise=self.noise,
                prototype_seed=self.seed,
            )
            for i, (split, size) in enumerate(self.sizes.items())
        }
        if self.in_memory:
            # Generated once into tensors, so throughput benchmarks measure the model, not the generator.
            self.datasets = {split: _materialize(ds) for split, ds in self.datasets.items()}


def _materialize(dataset: SyntheticImages) -> TensorDataset:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return TensorDataset(torch.stack(images), torch.tensor(labels))
