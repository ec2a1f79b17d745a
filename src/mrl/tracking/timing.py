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
    data loading setup or validation (run validation separately or disable it).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.times: list[float] = []
        self.samples: list[int] = []
        self._start: float | None = None
        self._count = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._start, self._count = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._count += len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        if self._start is None or not trainer.is_global_zero:
            return
        self.times.append(time.perf_counter() - self._start)
        self.samples.append(self._count)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"epoch_seconds": self.times, "samples": self.samples}))
