"""What every mrl datamodule provides on top of Lightning's: shape, class count and loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


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
    """Base datamodule: subclasses set ``num_classes``, ``in_chans`` and ``img_size`` in ``__init__``
    (the backbone is built from them) and fill ``self.datasets`` with ``train``/``val``/``test``.
    """

    num_classes: int
    in_chans: int
    img_size: int
    # In-memory data sets of small images can be resized per batch to what a backbone needs.
    resizable: bool = False

    def resize(self, img_size: int) -> None:
        """Serve images of ``img_size`` pixels (only when ``resizable``)."""
        if not self.resizable:
            raise NotImplementedError(f"{type(self).__name__} cannot resize its images")
        self.img_size = int(img_size)

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.datasets: dict[str, Dataset] = {}

    def configure_transforms(self, data_config: dict[str, Any]) -> None:
        """Receive the backbone's timm data config (mean, std, interpolation, crop). Default: unused."""

    def _loader(self, split: str, train: bool, **options: Any) -> DataLoader:
        """The loader of ``split``; ``options`` override DataLoader arguments (workers, collate_fn)."""
        if split not in self.datasets:
            self.setup(None)
        # The training loader is stateful (torchdata): Lightning saves its position in every checkpoint
        # and restores it on resume, so a run resumed mid-epoch sees the batches an uninterrupted run
        # would. Its order never depends on the global RNG state: a seeded sampler on one process; under
        # DDP Lightning's DistributedSampler (seeded, set_epoch).
        dataset = self.datasets[split]
        sampler = None
        if train and getattr(self.trainer, "world_size", 1) <= 1:
            sampler = EpochShuffleSampler(len(dataset), int(getattr(self, "seed", 0)), self._epoch)
        workers = int(options.pop("num_workers", self.num_workers))
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
        seed = int(getattr(self, "seed", 0))
        mixed = hash((seed, *step)) & 0x7FFF_FFFF_FFFF_FFFF  # hash of ints is stable across processes
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

    def model_inputs(
        self, batch: Any, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch as the model's inputs ``(x, y)`` on ``device``: Lightning's batch transfer hooks,
        for code that iterates a loader itself (embedding export, tests, benchmarks)."""
        device = torch.device(device)
        return self.on_after_batch_transfer(self.transfer_batch_to_device(batch, device, 0), 0)
