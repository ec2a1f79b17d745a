"""What every mrl datamodule provides on top of Lightning's: shape, class count and loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from mrl.errors import MRLError


def views_refusal(views: int, datamodule: str) -> str:
    """What to do when ``objective.views`` asks a one-view datamodule for several views."""
    return (
        f"objective.views={views}: the contrastive objectives need {views} augmented views of each "
        f"training image, and {datamodule} serves one (image-file data crops each image once, in the "
        "loader workers). Two views work with data=fashion_mnist, cifar10, cifar100 and synthetic; with "
        "this data use objective=ce."
    )


class EpochShuffleSampler(Sampler[int]):
    """A random order that is a function of ``(seed, epoch)`` alone.

    The permutation is drawn lazily, at the first index taken from an iterator, from the epoch the
    trainer is in then: Lightning creates the next epoch's iterator before it announces the epoch
    (``set_epoch``), and a resumed run creates it once more. torchdata's loader restores the position
    within an epoch by skipping the indices already used.
    """

    def __init__(self, length: int, seed: int, epoch: Callable[[], int]) -> None:
        self.length, self.seed, self.epoch = length, seed, epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch())
        yield from torch.randperm(self.length, generator=generator).tolist()


class MRLDataModule(L.LightningDataModule):
    """What training, evaluation and deployment read from a datamodule, declared in one place.

    Every datamodule gives each attribute below a value in ``__init__`` (the model is built from them
    before ``setup``), and fills :attr:`datasets` with ``train``/``val``/``test`` in ``setup``. Callers
    read them directly: a missing one is a bug in the datamodule, not a case for a default.
    """

    num_classes: int
    """Classes of the data set (the head's output size)."""
    classes: tuple[str, ...]
    """The classes' names in label order (label ``i`` is ``classes[i]``), each usable as a folder name: the
    class folders of an ImageFolder tree or shards (WNIDs for ImageNet), torchvision's names for
    Fashion-MNIST and CIFAR. Query sets given as folder trees (mrl-eval's robustness sets) are labelled
    by these names."""
    in_chans: int
    """Channels of the model's input images."""
    img_size: int
    """Side in pixels of the square training images the model sees."""
    resizable: bool = False
    """Whether :meth:`resize` can serve the images at another size (small in-memory images can)."""
    img_size_fixed: bool = True
    """Whether ``img_size`` was chosen by the user; when not, training may pick a larger size for a
    backbone that needs one (see :attr:`upsizable`)."""
    mean: tuple[float, ...]
    """Per-channel mean the model inputs are normalised with (pixel values scaled to [0, 1])."""
    std: tuple[float, ...]
    """Per-channel standard deviation the model inputs are normalised with."""
    seed: int
    """Seed of the split, the training order and the per-batch augmentation."""
    datasets: dict[str, Dataset]
    """The splits by name, filled by ``setup``."""
    views: int = 1
    """Independently augmented views of each image per training batch (:meth:`configure_views`)."""
    multi_view: bool = False
    """Whether this datamodule can serve several views (contrastive objectives)."""

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.datasets = {}

    @property
    def upsizable(self) -> bool:
        """Whether training may serve the images larger than ``img_size`` (a backbone that needs more
        pixels): resizable, at a size the user did not choose."""
        return self.resizable and not self.img_size_fixed

    @property
    def eval_img_size(self) -> int:
        """Side in pixels of the evaluation images (the training size unless a datamodule differs)."""
        return self.img_size

    @property
    def data_config(self) -> dict[str, Any] | None:
        """For data read from image files, the timm data config (interpolation, mean, std, crop_pct,
        crop_mode) whose eval transform at :attr:`eval_img_size` gives the evaluation images. None where
        whole images are only scaled to ``img_size`` and normalised with ``mean``/``std`` per batch (the
        in-memory data sets)."""
        return None

    def configure(
        self, views: int = 1, img_size: int | None = None, data_config: dict[str, Any] | None = None
    ) -> None:
        """Serve the data the way one model takes it, set once, after construction and before ``setup``
        (:func:`mrl.training.assemble.assemble`): ``views`` augmented views of each training image
        (:meth:`configure_views`), images of ``img_size`` px when the model needs another size than the
        data's (:meth:`resize`), and the backbone's timm ``data_config`` (:meth:`configure_transforms`).
        The three methods are the steps a datamodule overrides."""
        self.configure_views(views)
        if img_size is not None and img_size != self.img_size:
            self.resize(img_size)
        if data_config is not None:
            self.configure_transforms(data_config)

    def resize(self, img_size: int) -> None:
        """Serve images of ``img_size`` pixels (only when ``resizable``)."""
        if not self.resizable:
            raise NotImplementedError(f"{type(self).__name__} cannot resize its images")
        self.img_size = int(img_size)

    def configure_views(self, views: int) -> None:
        """Serve ``views`` independently augmented views of each training image: training batches become
        ``(uint8 images as floats (views, B, C, H, W), labels (B,))``; evaluation batches stay one view."""
        if views != 1 and not self.multi_view:
            raise MRLError(views_refusal(views, type(self).__name__))
        self.views = int(views)

    def configure_transforms(self, data_config: dict[str, Any]) -> None:
        """Receive the backbone's timm data config (mean, std, interpolation, crop). Default: unused."""

    def image_file_transform(self) -> Callable[..., Any] | None:
        """What the evaluation loader makes of one image file: its bytes (a uint8 tensor, as torchvision's
        ``read_file`` gives them) -> the loader's image, so that files batched as the eval loader batches
        (:func:`mrl.data.image_folder.image_files` through :meth:`loader`) become, through
        :meth:`model_inputs`, model inputs preprocessed exactly like this data set's evaluation images.
        None: the loader hands over the encoded bytes and :meth:`model_inputs` decodes them
        (``decode=gpu``)."""
        raise MRLError(
            f"{type(self).__name__} serves generated tensors, not images read from files, so image files "
            "cannot be preprocessed the way its model saw its data. Evaluate image folders with a model "
            "trained on images (data=imagefolder, shards, fashion_mnist, cifar10, ...)."
        )

    def loader_workers(self) -> int:
        """Loader worker processes of this data set's loaders."""
        return self.num_workers

    def _loader_options(self) -> dict[str, Any]:
        """DataLoader arguments every loader of this data set takes beyond batch size and order: its
        workers, and where a datamodule needs them prefetching and collation."""
        return {"num_workers": self.loader_workers()}

    def _loader(self, split: str, train: bool, **options: Any) -> DataLoader:
        """The loader of ``split``; ``options`` override DataLoader arguments (workers, collate_fn)."""
        if split not in self.datasets:
            self.setup(None)
        return self.loader(self.datasets[split], train, **options)

    def loader(self, dataset: Dataset, train: bool = False, **options: Any) -> DataLoader:
        """A loader over ``dataset`` with this data set's own options (batch size, workers, pinned memory,
        prefetching, collation): its splits' loaders, and evaluation's over image sets beyond the splits
        (:func:`mrl.data.image_folder.image_files`). ``train``: shuffled, as the training split is
        served; else in order. ``options`` override DataLoader arguments."""
        # The training loader is stateful (torchdata): Lightning saves its position in every checkpoint
        # and restores it on resume, so a run resumed mid-epoch sees the batches an uninterrupted run
        # would. Its order never depends on the global RNG state: a seeded sampler on one process; under
        # DDP Lightning's DistributedSampler (seeded, set_epoch).
        sampler = None
        if train and getattr(self.trainer, "world_size", 1) <= 1:
            sampler = EpochShuffleSampler(len(dataset), self.seed, self._epoch)
        options = {**self._loader_options(), **options}
        workers = int(options.pop("num_workers"))
        return (StatefulDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train if sampler is None else None,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            # pinned pages only help a copy to an accelerator (and torch warns without one)
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            **options,
        )

    def _epoch(self) -> int:
        # Outside a Lightning fit (benchmarks, tools with a stand-in trainer) there is no fit loop: epoch 0.
        fit_loop = getattr(self.trainer, "fit_loop", None)
        return fit_loop.epoch_progress.current.processed if fit_loop is not None else 0

    def augmentation_generator(self, device: torch.device) -> torch.Generator:
        """A generator for this training batch's random augmentation, seeded from (seed, epoch, step,
        rank) rather than the global RNG state, so a resumed run draws what an uninterrupted one would."""
        trainer = self.trainer
        step = (trainer.current_epoch, trainer.global_step, trainer.global_rank) if trainer else (0, 0, 0)
        mixed = hash((self.seed, *step)) & 0x7FFF_FFFF_FFFF_FFFF  # hash of ints is stable across processes
        return torch.Generator(device=device).manual_seed(mixed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def split_loader(self, split: str) -> DataLoader:
        """An unshuffled loader over any split (used to export embeddings)."""
        return self._loader(split, train=False)

    def evaluation_loader(self, split: str) -> DataLoader:
        """An unshuffled loader over ``split`` preprocessed for evaluation (no augmentation), the training
        split too: what a frozen model's cached features are computed from. Datamodules whose training
        split carries its augmentation in the dataset itself override it."""
        return self.split_loader(split)

    def model_inputs(
        self, batch: Any, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch as the model's inputs ``(x, y)`` on ``device``: Lightning's batch transfer hooks,
        for code that iterates a loader itself (embedding export, tests, benchmarks)."""
        device = torch.device(device)
        return self.on_after_batch_transfer(self.transfer_batch_to_device(batch, device, 0), 0)
