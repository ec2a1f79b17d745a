"""Fashion-MNIST, the embedded default data set (10 classes, 28x28 grey images)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrl.data.in_memory import Arrays, InMemoryImageDataModule
from mrl.errors import MRLError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Channel statistics of the Fashion-MNIST training images.
MEAN, STD = (0.2860,), (0.3530,)
# torchvision's FashionMNIST.classes as folder names ('T-shirt/top' with '_' for the '/'); written out
# rather than imported so that importing the datamodule stays light (tests/data/test_fashion_mnist_data.py
# checks them against torchvision's)
CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _find(data_dir: Path, stem: str) -> Path | None:
    # Flat (Debian package, Zalando's repo) or torchvision's FashionMNIST/raw layout, gzipped or not.
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise MRLError(
            f"Cannot read {path} ({err}): the file is corrupt. Delete it and get it again."
        ) from err
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MRLError(
            f"{path} is not an IDX file of unsigned bytes: it is corrupt. Delete it and get it again."
        )
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise MRLError(
            f"{path} is truncated or corrupt: its header says {shape} but it holds {len(data) - offset} "
            "bytes. Delete it and get it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNISTDataModule(InMemoryImageDataModule):
    """Fashion-MNIST read into memory from its IDX files.

    ``data_dir`` may hold the files flat (the Debian package ``dataset-fashion-mnist`` installs them in
    /usr/share/datasets/fashion-mnist) or in torchvision's ``FashionMNIST/raw`` layout. With
    ``download=true`` torchvision fetches them into ``data_dir`` when they are missing. Splits, resizing
    and augmentation: :class:`~mrl.data.in_memory.InMemoryImageDataModule`.
    """

    dataset_name = "Fashion-MNIST"
    num_classes = 10
    classes = CLASSES
    in_chans = 1
    native_size = 28
    mean, std = MEAN, STD

    def __init__(self, data_dir: str = DEBIAN_DIR, **kwargs: Any) -> None:
        super().__init__(data_dir=data_dir, **kwargs)

    def _paths(self) -> dict[str, list[Path | None]]:
        return {split: [_find(self.data_dir, stem) for stem in stems] for split, stems in FILES.items()}

    def missing_files(self) -> list[str]:
        return [
            stem
            for split, paths in self._paths().items()
            for stem, path in zip(FILES[split], paths, strict=True)
            if path is None
        ]

    def not_found_message(self, missing: list[str]) -> str:
        return (
            f"Fashion-MNIST not found in {self.data_dir} (missing {', '.join(missing)}). Install it with "
            "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), point "
            "data.data_dir=<dir> at a folder holding the IDX files, or set data.download=true to let "
            "torchvision download them (needs internet)."
        )

    def fetch(self) -> None:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(root=str(self.data_dir), train=train, download=True)

    def offline_hint(self) -> str:
        return (
            "Without internet, install the Debian package dataset-fashion-mnist or copy the four IDX files "
            "into data.data_dir."
        )

    def read(self) -> tuple[Arrays, Arrays]:
        arrays = {}
        for split, (img_path, lbl_path) in self._paths().items():
            images, labels = read_idx(img_path), read_idx(lbl_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise MRLError(
                    f"{img_path} and {lbl_path} do not match (shapes {images.shape}, {labels.shape})."
                )
            if labels.size and int(labels.max()) >= self.num_classes:
                raise MRLError(
                    f"{lbl_path} holds label {int(labels.max())}, but Fashion-MNIST has {self.num_classes} "
                    f"classes (0..{self.num_classes - 1}): the labels do not match this data set. Point "
                    "data.data_dir at the Fashion-MNIST files, or use data=imagefolder for other data."
                )
            arrays[split] = (
                torch.from_numpy(images.copy()).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
            )
        return arrays["train"], arrays["test"]
