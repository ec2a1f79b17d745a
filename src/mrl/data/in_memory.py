"""What the small data sets held in host memory as uint8 tensors share (Fashion-MNIST, CIFAR).

A subclass only finds, fetches and reads its files; this base splits a seeded validation set off the
training images and turns each batch into model inputs on the device it arrives on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset, random_split

from mrl.data.base import MRLDataModule
from mrl.data.preprocess import CropSpec, ImageTransform, normalize_uint8_batch, random_crop
from mrl.errors import MRLError

# (images uint8 (N, C, H, W), labels int64 (N,))
Arrays = tuple[torch.Tensor, torch.Tensor]


class InMemoryImageDataModule(MRLDataModule):
    """uint8 images read whole into memory, normalised per batch on the loader's device.

    The last ``val_size`` images of a seeded shuffle of the training set are held out for validation.
    ``img_size`` resizes the images per batch (null: the native size, which training may raise for a
    backbone that needs more). Training batches are randomly cropped after ``crop_padding`` px of zero
    padding (0: not cropped) and flipped; with several views (``configure_views``, contrastive objectives)
    each view is cropped and flipped independently. ``limit_train`` / ``limit_eval`` keep only the first
    images of the splits (quick runs and tests). With ``download=true`` missing files are fetched in
    ``prepare_data``. ``__init__`` reads no file: deployment builds the datamodule from a checkpoint's
    config only to learn the image shape and preprocessing.
    """

    resizable = True
    multi_view = True
    dataset_name: str
    """The data set's name in messages."""
    native_size: int
    """Side in pixels of the stored images."""

    def __init__(
        self,
        data_dir: str,
        download: bool = False,
        img_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        **loader_kwargs,
    ) -> None:
        super().__init__(seed=seed, **loader_kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download = bool(download)
        # null: the native size, or the smallest size the backbone accepts (see mrl.training.job)
        self.img_size = int(img_size) if img_size else self.native_size
        self.img_size_fixed = img_size is not None
        self.val_size = int(val_size)
        self.augment = bool(augment)
        self.crop_padding = int(crop_padding)
        self.limit_train, self.limit_eval = limit_train, limit_eval
        # as tensors once: normalize_uint8_batch copies them to each device it sees, once
        self._stats = torch.tensor(self.mean), torch.tensor(self.std)

    # ---- the files, per data set ------------------------------------------------------------

    def missing_files(self) -> list[str]:
        """Names of the data set's files that are not in ``data_dir``."""
        raise NotImplementedError

    def not_found_message(self, missing: list[str]) -> str:
        """What to do when ``missing`` files are not there (``setup`` without the data)."""
        raise NotImplementedError

    def fetch(self) -> None:
        """Download the files into ``data_dir`` (needs internet)."""
        raise NotImplementedError

    def offline_hint(self) -> str:
        """How to get the files without internet (told when :meth:`fetch` fails)."""
        raise NotImplementedError

    def read(self) -> tuple[Arrays, Arrays]:
        """The training and test images and labels, checked; an :class:`MRLError` names a bad file."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if not self.download or not self.missing_files():
            return
        try:
            self.fetch()
        except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError)
            raise MRLError(
                f"Downloading {self.dataset_name} into {self.data_dir} failed ({err}). {self.offline_hint()}"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        missing = self.missing_files()
        if missing:
            raise MRLError(self.not_found_message(missing))
        train, test = self.read()
        train_full = TensorDataset(*train)
        if not 0 < self.val_size < len(train_full):
            raise MRLError(f"data.val_size must be between 1 and {len(train_full) - 1}, got {self.val_size}.")
        generator = torch.Generator().manual_seed(self.seed)
        train_part, val_part = random_split(
            train_full, [len(train_full) - self.val_size, self.val_size], generator=generator
        )
        self.datasets = {
            "train": first(train_part, self.limit_train),
            "val": first(val_part, self.limit_eval),
            "test": first(TensorDataset(*test), self.limit_eval),
        }

    def configure_views(self, views: int) -> None:
        if views > 1 and not self.augment:
            raise MRLError(
                f"objective.views={views} with data.augment=false: every view of an image would be the same "
                "unaugmented image, and a contrastive loss would only learn to match each image with itself. "
                "Drop data.augment=false (views are random crops and flips), or use objective=ce."
            )
        super().configure_views(views)

    def image_file_transform(self) -> ImageTransform:
        # Files become what this data set stores: its channels (grey for Fashion-MNIST), whole images
        # scaled (shorter side) to the native size and centre-cropped square; the batch transform then
        # resizes them to img_size and normalises them, as it does the stored images.
        return ImageTransform(CropSpec(self.native_size, crop_pct=1.0), train=False, in_chans=self.in_chans)

    def on_after_batch_transfer(self, batch: Arrays, dataloader_idx: int) -> Arrays:
        x, y = batch
        training = self.trainer is not None and self.trainer.training
        views = self.views if training else 1
        generator = self.augmentation_generator(x.device) if training and self.augment else None
        # Several views are drawn one after the other from the step's generator: independent of each
        # other, and the same in a resumed run.
        out = [self._prepared(x, generator) for _ in range(views)]
        return (out[0] if views == 1 else torch.stack(out)), y

    def _prepared(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The uint8 batch normalised; with a ``generator`` (training) randomly cropped and flipped."""
        augment = generator is not None
        if augment and self.crop_padding:
            x = random_crop(x, self.crop_padding, generator=generator)
        return normalize_uint8_batch(
            x, *self._stats, flip=augment, img_size=self.img_size, generator=generator
        )


def first(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` items of ``dataset`` (quick runs and tests), or all of it."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(int(limit)))
