"""ImageNet-style folder trees (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``), for small trees.

Large data sets belong in shards (``mrl-prepare-data``, ``data=shards``): a shared file system serves
millions of small files slowly. Both read encoded images through the same pipeline
(:mod:`mrl.data.encoded`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.io import read_file

from mrl.data.base import MRLDataModule
from mrl.data.decode import UnsupportedImage, decode_reason
from mrl.data.encoded import EncodedImageDataModule, EncodedSample
from mrl.data.preprocess import ImageTransform
from mrl.data.tree import ClassFolders, list_classes, list_tree
from mrl.errors import MRLError


class EncodedImageFolder(Dataset):
    """An ``ImageFolder`` tree whose items are ``(uint8 (3, S, S), label)`` (``transform`` given) or
    :class:`EncodedSample` (no transform: ``decode=gpu``).

    Training crops draw from the process's ``random`` (seeded per loader worker by Lightning's
    ``seed_everything(workers=True)``): reproducible for a seeded run. The sample-exact crops of a
    resumed run are the shards' (:mod:`mrl.data.shards`).
    """

    def __init__(self, folder: Path | ImageFolder, transform: ImageTransform | None) -> None:
        # torchvision's ImageFolder lists the classes and files (its loader is not used).
        self.folder = folder if isinstance(folder, ImageFolder) else list_image_folder(Path(folder))
        self.classes = self.folder.classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> Any:
        path, label = self.folder.samples[index]
        seed = random.getrandbits(63)
        if self.transform is None:
            return EncodedSample(Path(path).read_bytes(), label, seed)
        try:
            return self.transform(read_file(path), random.Random(seed)), label
        except RuntimeError as err:  # torchvision's decoders raise RuntimeError on corrupt files
            raise unreadable_image(path, err) from err


def unreadable_image(path: str | Path, err: BaseException) -> MRLError:
    """A file of the tree that does not decode (not an image, truncated, corrupt, a format or mode mrl does
    not read): training stops and names it, rather than skipping it and training on a silently different
    data set."""
    if isinstance(err, UnsupportedImage):
        return MRLError(f"Cannot decode {path} ({err}). Replace or delete the file and start again.")
    return MRLError(
        f"Cannot decode {path} ({decode_reason(err)}): it is not a readable image (truncated, corrupt or "
        "another kind of file). Replace or delete the file and start again."
    )


class ListedImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` of a checked listing (:mod:`mrl.data.tree`): its classes, samples
    and targets, without listing the folder again (its loader is not used)."""

    def __init__(self, listing: ClassFolders) -> None:
        self.listing = listing
        super().__init__(str(listing.folder), loader=read_file)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = list(self.listing.classes)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return list(self.listing.samples)


def list_image_folder(folder: Path, refusal: Callable[[str | None], str] | None = None) -> ImageFolder:
    """The checked listing (:func:`mrl.data.tree.list_classes`) of a class-per-folder tree
    (``folder/<class>/<image>``) as torchvision's ``ImageFolder``; ``refusal(empty)`` says what to fix
    when it has no class folders (``empty`` None) or empty ones, by default as for a split of an
    ImageFolder data set."""
    return ListedImageFolder(list_classes(Path(folder), refusal))


class ImageFolderDataModule(EncodedImageDataModule):
    """Class-per-folder image trees.

    ``root`` must hold ``train/`` and ``val/``; ``test/`` is used for testing when present, otherwise
    ``val/`` is. Preprocessing follows the backbone's timm data config (see
    :class:`~mrl.data.encoded.EncodedImageDataModule`).
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        in_chans: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if int(in_chans) != 3:
            raise MRLError(
                f"data.in_chans={in_chans}, but image files are read as RGB, 3 channels (grey images are "
                "converted). Drop the data.in_chans override (or set data.in_chans=3)."
            )
        self.root = Path(root).expanduser()
        self.split_dirs = {"train": train_split, "val": val_split, "test": test_split}
        for split in ("train", "val"):
            folder = self.root / self.split_dirs[split]
            if not folder.is_dir():
                raise MRLError(
                    f"ImageFolder data set: {folder} does not exist. data.root must point at a folder with "
                    f"'{self.split_dirs['train']}/' and '{self.split_dirs['val']}/' subfolders holding one "
                    "folder of images per class (the ImageNet layout)."
                )
        test_dir = self.root / self.split_dirs["test"]
        if not test_dir.is_dir():
            test_dir = self.root / self.split_dirs["val"]
        # Listed now, not in setup(): a tree mrl-prepare-data would refuse is refused before training
        # starts, by the same checks (mrl.data.tree).
        folders = {"train": self.root / self.split_dirs["train"], "val": self.root / self.split_dirs["val"]}
        listed = list_tree(self.root, {**folders, "test": test_dir})
        self.listings = {split: ListedImageFolder(listing) for split, listing in listed.items()}
        self.classes = tuple(self.listings["train"].classes)
        self.num_classes = len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        datasets = {}
        for split, listing in self.listings.items():
            transform = None if self.decode == "gpu" else self.image_transform(train=split == "train")
            datasets[split] = EncodedImageFolder(listing, transform)
        self.datasets = datasets

    def evaluation_loader(self, split: str) -> DataLoader:
        # the training split's dataset crops and flips at random: its files with the evaluation transform
        if split != "train" or self.decode == "gpu":
            return super().evaluation_loader(split)
        return self.loader(EncodedImageFolder(self.listings["train"], self.image_transform(train=False)))


def image_files(datamodule: MRLDataModule, listing: ImageFolder) -> EncodedImageFolder:
    """The files of ``listing`` (its targets: ``datamodule``'s labels) as items that
    ``datamodule``'s evaluation loader (:meth:`~mrl.data.base.MRLDataModule.loader`) and
    ``datamodule.model_inputs`` turn into model inputs exactly as they turn its evaluation split's: the
    same per-image half (:meth:`~mrl.data.base.MRLDataModule.image_file_transform`), batch size and
    collation."""
    return EncodedImageFolder(listing, datamodule.image_file_transform())
