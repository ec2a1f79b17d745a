"""Fashion-MNIST, the embedded default data set (10 classes, 28x28 grey images)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset, random_split

from mrl.data.base import MRLDataModule
from mrl.data.preprocess import normalize_uint8_batch
from mrl.errors import MRLError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Channel statistics of the Fashion-MNIST training images.
MEAN, STD = (0.2860,), (0.3530,)


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


class FashionMNISTDataModule(MRLDataModule):
    """Fashion-MNIST read into memory from its IDX files.

    ``data_dir`` may hold the files flat (the Debian package ``dataset-fashion-mnist`` installs them in
    /usr/share/datasets/fashion-mnist) or in torchvision's ``FashionMNIST/raw`` layout. With
    ``download=true`` torchvision fetches them into ``data_dir`` when they are missing. The last
    ``val_size`` images of a seeded shuffle of the training set are held out for validation.
    ``img_size`` resizes the images per batch (for backbones that need more than 28 px).
    """

    num_classes = 10
    in_chans = 1
    resizable = True

    def __init__(
        self,
        data_dir: str = DEBIAN_DIR,
        download: bool = False,
        img_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
        self.data_dir = Path(data_dir).expanduser()
        # null: the native 28 px, or the smallest size the backbone accepts (see mrl.train)
        self.img_size = int(img_size) if img_size else 28
        self.img_size_fixed = img_size is not None
        self.download = download
        self.val_size = int(val_size)
        self.seed = int(seed)
        self.augment = augment
        self.limit_train = limit_train
        self.limit_eval = limit_eval
        self.mean, self.std = torch.tensor(MEAN), torch.tensor(STD)

    def _paths(self) -> dict[str, tuple[Path, Path]]:
        paths = {}
        missing = []
        for split, stems in FILES.items():
            found = [_find(self.data_dir, stem) for stem in stems]
            missing += [stem for stem, p in zip(stems, found, strict=True) if p is None]
            paths[split] = tuple(found)
        if missing:
            raise MRLError(
                f"Fashion-MNIST not found in {self.data_dir} (missing {', '.join(missing)}). Install it with "
                "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), point "
                "data.data_dir=<dir> at a folder holding the IDX files, or set data.download=true to let "
                "torchvision download them (needs internet)."
            )
        return paths

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            self._paths()
            return
        except MRLError:
            pass
        from torchvision.datasets import FashionMNIST

        try:
            for train in (True, False):
                FashionMNIST(root=str(self.data_dir), train=train, download=True)
        except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError)
            raise MRLError(
                f"Downloading Fashion-MNIST into {self.data_dir} failed ({err}). Without internet, install "
                "the Debian package dataset-fashion-mnist or copy the four IDX files into data.data_dir."
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        paths = self._paths()
        arrays = {}
        for split, (img_path, lbl_path) in paths.items():
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
        train_full = TensorDataset(*arrays["train"])
        if not 0 < self.val_size < len(train_full):
            raise MRLError(f"data.val_size must be between 1 and {len(train_full) - 1}, got {self.val_size}.")
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(
            train_full, [len(train_full) - self.val_size, self.val_size], generator=generator
        )
        test = TensorDataset(*arrays["test"])
        self.datasets = {
            "train": _limit(train, self.limit_train),
            "val": _limit(val, self.limit_eval),
            "test": _limit(test, self.limit_eval),
        }

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        flip = self.trainer is not None and self.trainer.training and self.augment
        gen = self.augmentation_generator(x.device) if flip else None
        return normalize_uint8_batch(
            x, self.mean, self.std, flip=flip, img_size=self.img_size, generator=gen
        ), y


def _limit(dataset, limit: int | None):
    """The first ``limit`` items of ``dataset`` (quick runs and tests), or all of it."""
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(int(limit)))
