"""CIFAR-10 and CIFAR-100 (32x32 colour images), read into memory from torchvision's on-disk format."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch

from mrl.data.in_memory import Arrays, InMemoryImageDataModule
from mrl.errors import MRLError

# the releases' label names (batches.meta's label_names, meta's fine_label_names), in label order; the
# files are not read for them because a datamodule is built without its data (mrl.load, deployment)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud",
    "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant",
    "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree",
    "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter",
    "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)
# fmt: on


class _CIFARDataModule(InMemoryImageDataModule):
    """CIFAR from the python-pickle release (``cifar-10-batches-py`` / ``cifar-100-python``).

    The files are read directly rather than through ``torchvision.datasets.CIFAR10`` so that copies
    of the data (and the small generated ones the tests use) load without torchvision's checksum
    check; torchvision is used to download them when ``download=true``. Training batches are flipped
    and randomly cropped (``crop_padding`` px of padding); splits, resizing and augmentation:
    :class:`~mrl.data.in_memory.InMemoryImageDataModule`.
    """

    in_chans = 3
    native_size = 32
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    # dataset_name is also the torchvision class that downloads the release

    def __init__(self, data_dir: str = "~/data/cifar", crop_padding: int = 4, **kwargs: Any) -> None:
        super().__init__(data_dir=data_dir, crop_padding=crop_padding, **kwargs)

    def missing_files(self) -> list[str]:
        root = self.data_dir / self.folder
        return [name for name in (*self.train_files, self.test_file) if not (root / name).is_file()]

    def not_found_message(self, missing: list[str]) -> str:
        return (
            f"{self.dataset_name} not found in {self.data_dir / self.folder} (missing "
            f"{', '.join(missing)}). Set data.download=true to let torchvision download it (needs "
            f"internet), or point data.data_dir=<dir> at a folder holding the python release's "
            f"'{self.folder}' folder."
        )

    def fetch(self) -> None:
        import torchvision.datasets

        # one archive holds both splits
        getattr(torchvision.datasets, self.dataset_name)(root=str(self.data_dir), train=True, download=True)

    def offline_hint(self) -> str:
        return f"Without internet, copy the python release's '{self.folder}' folder into data.data_dir."

    def _read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path, size = self.data_dir / self.folder / name, self.native_size
        try:
            with open(path, "rb") as f:
                # The official release is a pickle of numpy arrays and lists: only read trusted copies.
                batch = pickle.load(f, encoding="latin1")
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, size, size)
            labels = np.asarray(batch[self.label_key], dtype=np.int64)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
            raise MRLError(
                f"Cannot read {path} ({err}): the file is corrupt. Delete it and get it again."
            ) from err
        if len(images) != len(labels):
            raise MRLError(f"{path} is corrupt: {len(images)} images but {len(labels)} labels.")
        return images, labels

    def read(self) -> tuple[Arrays, Arrays]:
        parts = [self._read(name) for name in self.train_files]
        train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        test_x, test_y = (torch.from_numpy(a) for a in self._read(self.test_file))
        return (train_x, train_y), (test_x, test_y)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 10 classes, 50k training (minus ``val_size`` held out) and 10k test images."""

    num_classes = 10
    classes = CIFAR10_CLASSES
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
    classes = CIFAR100_CLASSES
    folder = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    label_key = "fine_labels"
    dataset_name = "CIFAR100"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
