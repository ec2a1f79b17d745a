"""Callbacks added by :func:`mrl.train.train` itself (not selected in configs).

:class:`RestoreLoaderPosition` makes a resumed run continue mid-epoch where the checkpoint was taken;
:func:`progress_bar` keeps Lightning's progress bar from reading the device back every step.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

log = logging.getLogger("mrl.training")


class RestoreLoaderPosition(Callback):
    """Apply the training loader's saved position (torchdata ``StatefulDataLoader``, LitData's
    ``StreamingDataLoader``) on resume.

    Lightning loads that position only into a loader created after the checkpoint is read, but
    ``MatryoshkaLitModule.configure_optimizers`` creates the loader earlier (``estimated_stepping_batches``
    sizes the LR schedule), so without this a resumed epoch would start again from its first batch.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if loop.restarting and loop._combined_loader_states_to_load and loop._data_fetcher is not None:
            loop._load_combined_loader_states()
            iter(loop._data_fetcher)  # a fresh iterator, from the restored position

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # LitData's StreamingDataLoader leaves "resume mode" only when its iterator is exhausted, but
        # Lightning stops after len(loader) batches without asking for one more; a resumed run's next
        # epoch then replays the restored state and yields no batch at all (LitData issues #770, #775;
        # tests/data/test_shards.py resumes mid-epoch and checks the following epoch). The epoch is over here.
        loaders = trainer.fit_loop._combined_loader
        for loader in loaders.flattened if loaders is not None else []:
            if getattr(loader, "restore", False) and type(loader).__module__.startswith("litdata"):
                loader.restore = False


class _RefreshByTime:
    """Mixin for Lightning's progress bars: the training bar refreshes at most every ``interval`` seconds
    (and at each epoch's last batch) instead of after every batch.

    Why: every refresh reads the logged metrics (``trainer.progress_bar_metrics``), which turns device
    tensors into Python floats, so a refresh per batch makes the host wait for the GPU at every step; and
    Lightning's rich bar reads them after every batch whatever its ``refresh_rate``.
    """

    def __init__(self, interval: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = float(interval)
        self._last_refresh = float("-inf")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any):
        batch_idx = kwargs.get("batch_idx", args[-1] if args else 0)
        now = time.monotonic()
        if now - self._last_refresh < self.interval and batch_idx + 1 < self.total_train_batches:
            return
        self._last_refresh = now
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


class TimedRichProgressBar(_RefreshByTime, RichProgressBar):
    """Lightning's rich progress bar, refreshed by time (see :class:`_RefreshByTime`)."""


class TimedTQDMProgressBar(_RefreshByTime, TQDMProgressBar):
    """Lightning's tqdm progress bar, refreshed by time (see :class:`_RefreshByTime`)."""


def progress_bar(interval: float) -> Callback:
    """The progress bar Lightning would pick by itself (rich when installed), refreshed by time."""
    return TimedRichProgressBar(interval) if _RICH_AVAILABLE else TimedTQDMProgressBar(interval)


class EpochLine(Callback):
    """One line per training epoch (epoch, training loss, validation accuracy at the smallest and largest
    size, seconds) through the job's logger, so to stdout and the job's log file, when stdout is not a
    terminal (``make train > log``, nohup, SLURM, CI): there the progress bar, which redraws one line,
    shows nothing for minutes. On a terminal the progress bar says it."""

    def __init__(self, always: bool = False) -> None:
        self.on = always or not sys.stdout.isatty()
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.on or not trainer.is_global_zero:
            return
        log.info(epoch_line(trainer, list(getattr(pl_module, "nesting", [])), time.monotonic() - self._start))


def epoch_line(trainer: L.Trainer, nesting: list[int], seconds: float) -> str:
    """``epoch 3/6: train/loss 0.412, val/acc@8 80.12%, val/acc@256 91.03%, 12.3 s`` from the metrics
    logged so far (a metric not logged yet is left out)."""
    metrics = trainer.callback_metrics
    parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
    values = []
    if "train/loss" in metrics:
        values.append(f"train/loss {float(metrics['train/loss']):.4g}")
    for d in dict.fromkeys(nesting[:1] + nesting[-1:]):
        value = metrics.get(f"val/acc@{d}")
        if value is not None and math.isfinite(float(value)):
            values.append(f"val/acc@{d} {100 * float(value):.2f}%")
    return f"{parts[0]}: {', '.join([*values, f'{seconds:.1f} s'])}"
