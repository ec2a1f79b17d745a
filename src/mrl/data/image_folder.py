"""ImageNet-style folder trees (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import create_transform
from torchvision.datasets import ImageFolder

from mrl.data.base import MRLDataModule
from mrl.errors import MRLError


class ImageFolderDataModule(MRLDataModule):
    """Class-per-folder image trees read with torchvision's ``ImageFolder`` and timm's transforms.

    ``root`` must hold ``train/`` and ``val/``; ``test/`` is used for testing when present, otherwise
    ``val/`` is. Preprocessing (resize, crop, mean/std, interpolation) comes from the backbone's timm
    data config, with ``img_size`` overriding its input size, and training augmentation from
    ``timm.data.create_transform`` (``auto_augment``, ``re_prob`` pass through).
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        in_chans: int = 3,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        augment: dict[str, Any] | None = None,
        eval_img_size: int | None = None,
        **loader_kwargs,
    ) -> None:
        super().__init__(**loader_kwargs)
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
        self.classes = sorted(p.name for p in (self.root / self.split_dirs["train"]).iterdir() if p.is_dir())
        if not self.classes:
            raise MRLError(f"{self.root / self.split_dirs['train']} holds no class folders.")
        self.num_classes = len(self.classes)
        self.in_chans = int(in_chans)
        self.img_size = int(img_size)
        self.augment = dict(augment or {})
        # Evaluating above the training resolution is worth ~1 point on ImageNet (Touvron et al., "FixRes");
        # the paper's FFCV recipe trains at <= 192 px and evaluates at 256.
        self.eval_img_size = int(eval_img_size) if eval_img_size else self.img_size
        self.data_config: dict[str, Any] = {
            "input_size": (self.in_chans, self.img_size, self.img_size),
            "interpolation": "bilinear",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "crop_pct": 0.875,
            "crop_mode": "center",
        }

    def configure_transforms(self, data_config: dict[str, Any]) -> None:
        self.data_config = {**data_config, "input_size": (self.in_chans, self.img_size, self.img_size)}
        self.datasets = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_tf = create_transform(**self.data_config, is_training=True, **self.augment)
        eval_size = (self.in_chans, self.eval_img_size, self.eval_img_size)
        eval_tf = create_transform(**{**self.data_config, "input_size": eval_size}, is_training=False)
        test_dir = self.root / self.split_dirs["test"]
        if not test_dir.is_dir():
            test_dir = self.root / self.split_dirs["val"]
        self.datasets = {
            "train": ImageFolder(str(self.root / self.split_dirs["train"]), transform=train_tf),
            "val": ImageFolder(str(self.root / self.split_dirs["val"]), transform=eval_tf),
            "test": ImageFolder(str(test_dir), transform=eval_tf),
        }
        for split, dataset in self.datasets.items():
            if dataset.classes != self.classes:
                raise MRLError(
                    f"The {split} split's class folders differ from train's in {self.root}: every split "
                    "needs the same set of class folders."
                )
