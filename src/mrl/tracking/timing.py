"""A callback that records the wall time of every training epoch (throughput benchmarks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class EpochTimer(L.Callback):
    """Writes ``{"epoch_seconds": [...], "samples": [...]}`` to ``path`` after every training epoch.

    The clock runs from the epoch's start to its end, so it measures the
    training loop (data, forward, backward, optimizer, logging, metrics) and not process start-up,
    data loading setup or validation (run validation separately or disable it). With
    ``skip_batches=k`` it starts after the epoch's first ``k`` batches instead: the steady state,
    without the loader workers' start (short benchmark epochs would overstate it; a real epoch has
    thousands of steps to spread it over).
    """

    def __init__(self, path: str, skip_batches: int = 0) -> None:
        self.path = Path(path)
        self.skip_batches = int(skip_batches)
        self.times: list[float] = []
        self.samples: list[int] = []
        self._start: float | None = None
        self._count = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._count = None, 0
        if self.skip_batches == 0:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is not None:
            self._count += len(batch[1])
        elif batch_idx + 1 == self.skip_batches:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        if self._start is None or not trainer.is_global_zero:
            return
        self.times.append(time.perf_counter() - self._start)
        self.samples.append(self._count)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"epoch_seconds": self.times, "samples": self.samples}))
