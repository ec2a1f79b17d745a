"""CIFAR-10 and CIFAR-100 (32x32 colour images), read into memory from torchvision's on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset, random_split

from mrl.data.base import MRLDataModule
from mrl.data.preprocess import normalize_uint8_batch
from mrl.errors import MRLError


class _CIFARDataModule(MRLDataModule):
    """CIFAR from the python-pickle release (``cifar-10-batches-py`` / ``cifar-100-python``).

    The files are read directly rather than through ``torchvision.datasets.CIFAR10`` so that copies
    of the data (and the small generated ones the tests use) load without torchvision's checksum
    check; torchvision is used to download them when ``download=true``. Training batches are flipped
    and randomly cropped (4 px padding) per batch on the loader's device.
    """

    in_chans = 3
    img_size = 32
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    dataset_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self,
        data_dir: str = "~/data/cifar",
        download: bool = False,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.val_size = int(val_size)
        self.seed = int(seed)
        self.augment = augment
        self.crop_padding = int(crop_padding)
        self._mean, self._std = torch.tensor(self.mean), torch.tensor(self.std)

    def _missing(self) -> list[str]:
        root = self.data_dir / self.folder
        return [name for name in (*self.train_files, self.test_file) if not (root / name).is_file()]

    def prepare_data(self) -> None:
        if not self.download or not self._missing():
            return
        import torchvision.datasets

        try:
            getattr(torchvision.datasets, self.dataset_name)(
                root=str(self.data_dir), train=True, download=True
            )
        except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError)
            raise MRLError(
                f"Downloading {self.dataset_name} into {self.data_dir} failed ({err}). Without internet, "
                f"copy the python release's '{self.folder}' folder into data.data_dir."
            ) from err

    def _read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.data_dir / self.folder / name
        try:
            with open(path, "rb") as f:
                # The official release is a pickle of numpy arrays and lists: only read trusted copies.
                batch = pickle.load(f, encoding="latin1")
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[self.label_key], dtype=np.int64)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
            raise MRLError(
                f"Cannot read {path} ({err}): the file is corrupt. Delete it and get it again."
            ) from err
        if len(images) != len(labels):
            raise MRLError(f"{path} is corrupt: {len(images)} images but {len(labels)} labels.")
        return images, labels

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        missing = self._missing()
        if missing:
            raise MRLError(
                f"{self.dataset_name} not found in {self.data_dir / self.folder} (missing "
                f"{', '.join(missing)}). Set data.download=true to let torchvision download it (needs "
                f"internet), or point data.data_dir=<dir> at a folder holding the python release's "
                f"'{self.folder}' folder."
            )
        parts = [self._read(name) for name in self.train_files]
        train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        test_x, test_y = (torch.from_numpy(a) for a in self._read(self.test_file))
        train_full = TensorDataset(train_x, train_y)
        if not 0 < self.val_size < len(train_full):
            raise MRLError(f"data.val_size must be between 1 and {len(train_full) - 1}, got {self.val_size}.")
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(
            train_full, [len(train_full) - self.val_size, self.val_size], generator=generator
        )
        self.datasets = {"train": train, "val": val, "test": TensorDataset(test_x, test_y)}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        training = self.trainer is not None and self.trainer.training and self.augment
        gen = self.augmentation_generator(x.device) if training else None
        if training and self.crop_padding:
            x = random_crop(x, self.crop_padding, generator=gen)
        return normalize_uint8_batch(x, self._mean, self._std, flip=training, generator=gen), y


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


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 10 classes, 50k training (minus ``val_size`` held out) and 10k test images."""

    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    label_key = "labels"
    dataset_name = "CIFAR10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 100 fine classes, 50k training (minus ``val_size`` held out) and 10k test images."""

    num_classes = 100
    folder = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    label_key = "fine_labels"
    dataset_name = "CIFAR100"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
