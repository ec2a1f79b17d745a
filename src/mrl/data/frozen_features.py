"""The datamodule of heads trained on a frozen source: batches of its cached pooled features.

Before training (``prepare_data``, once per machine) the source's pooled features of every split are
computed with the data's evaluation preprocessing (no augmentation, the training split too) and cached
(:mod:`mrl.data.feature_cache`); training then reads ``(features (B, F), labels (B,))`` batches from the
memory-mapped cache, with no backbone forward per step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from mrl.data.base import MRLDataModule
from mrl.data.feature_cache import (
    FeatureSplit,
    extract_features,
    feature_cache_key,
    feature_loader,
    open_split,
)
from mrl.errors import MRLError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# data settings that change how images are batched, not which images or how they look
LOADER_KEYS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "prefetch_factor",
    "auto_workers",
)


def data_identity(images: MRLDataModule, data_config: dict[str, Any]) -> dict[str, Any]:
    """What identifies the images a cache holds: the data settings (but how they are batched) and the
    size of every split."""
    images.setup(None)
    settings = {k: v for k, v in data_config.items() if k not in LOADER_KEYS}
    sizes = {split: len(images.datasets[split]) for split in SPLITS if split in images.datasets}
    return {"settings": settings, "sizes": sizes, "classes": list(images.classes or [])}


class FrozenFeatureDataModule(L.LightningDataModule):
    """``(features, labels)`` batches of ``source``'s cached features of ``images``' splits.

    ``source``: the frozen backbone (pooled features); ``images``: the configured image datamodule;
    ``cache_dir``: the cache's root; ``key_parts``: ``(source digest, data identity, preprocessing)``,
    hashed into the cache key; ``batch_size`` and ``seed``: the training batches' size and order.
    """

    def __init__(
        self,
        source: nn.Module,
        images: MRLDataModule,
        cache_dir: str | Path,
        key_parts: tuple[str, dict[str, Any], dict[str, Any]],
        batch_size: int,
        seed: int,
        dtype: str = "float16",
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.source, self.images = source, images
        self.cache_dir = Path(cache_dir)
        self.key = feature_cache_key(*key_parts)
        self.batch_size, self.seed, self.dtype = int(batch_size), int(seed), dtype
        self.device = torch.device(device)
        self.splits: dict[str, FeatureSplit] = {}
        self._prepared = False  # the job and then Lightning's fit and test each call prepare_data
        # what the rest of mrl reads of a datamodule
        self.num_classes, self.classes = images.num_classes, images.classes

    @property
    def directory(self) -> Path:
        return self.cache_dir / self.key

    def prepare_data(self) -> None:
        """Compute and cache the features of every split not cached yet (reused otherwise); once per
        datamodule, by the node's first process only.

        The training job calls this before its trainer exists, so under ``torchrun`` every process of a
        node would otherwise write the same cache at once; the others skip it, and Lightning's barrier
        after ``prepare_data`` (in ``fit``) holds them until the first has written it."""
        if self._prepared or int(os.environ.get("LOCAL_RANK", 0)) != 0:
            return
        self.images.setup(None)
        source = self.source.to(self.device)
        for split in SPLITS:
            if split not in self.images.datasets:
                continue
            loader = self.images.evaluation_loader(split)
            found = extract_features(
                source,
                loader,
                self.cache_dir,
                self.key,
                split,
                self.dtype,
                self.device,
                prepare=self.images.model_inputs,
            )
            log.info("Features of %s: %d x %d in %s", split, found.count, found.dim, found.directory)
        self.source.to("cpu")
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            found = open_split(self.cache_dir, self.key, split)
            if found is not None:
                self.splits[split] = found
        if "train" not in self.splits:
            raise MRLError(
                f"The frozen source's features of the training split are not in {self.directory}: they "
                "are computed before training (prepare_data); run mrl-train again, which computes them."
            )

    def _split(self, split: str) -> FeatureSplit:
        if not self.splits:
            self.setup(None)
        return self.splits.get(split) or self.splits["val" if split == "test" else "train"]

    def train_dataloader(self) -> DataLoader:
        return feature_loader(
            self._split("train"), self.batch_size, shuffle=True, seed=self.seed, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return feature_loader(self._split("val"), self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return feature_loader(self._split("test"), self.batch_size, shuffle=False)
