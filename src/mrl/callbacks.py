"""Callbacks added by :func:`mrl.train.train` itself (not selected in configs).

:class:`RestoreLoaderPosition` makes a resumed run continue mid-epoch where the checkpoint was taken;
:func:`progress_bar` keeps Lightning's progress bar from reading the device back every step.

Test hooks, inert unless their variable is set (``tests/test_reliability.py`` uses them):

- ``MRL_TEST_FAULT="<rank>:<step>"`` makes the process of that global rank raise a ``RuntimeError`` when
  it reaches that optimizer step, so the suite can check that a failing DDP rank takes the whole job
  down with a clear message instead of a hang;
- ``MRL_TEST_STOP="<step>[,<step>...]"`` makes the process stop itself (``SIGSTOP``) when it reaches
  each of those optimizer steps, after every earlier step's checkpoint and logged metrics were handed
  over, so the suite can signal or kill a run at a known step instead of racing it with a wall clock
  (``SIGCONT`` lets it go on).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

FAULT_ENV = "MRL_TEST_FAULT"
STOP_ENV = "MRL_TEST_STOP"


class InjectedFault(Callback):
    """Raise on ``rank`` at optimizer step ``step`` (test hook, see the module docstring)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise RuntimeError(
                f"{FAULT_ENV}: injected fault on rank {self.rank} at step {trainer.global_step}"
            )


class StopAtSteps(Callback):
    """Stop the process (``SIGSTOP``) at each optimizer step of ``steps`` (test hook, see the module
    docstring).

    At the start of a batch: Lightning saves a step's checkpoint before it logs that step's metrics (both
    at the end of the previous batch), so only here are both of them done.
    """

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step in self.steps:
            self.steps.discard(trainer.global_step)  # once: accumulated batches share their step
            os.kill(os.getpid(), signal.SIGSTOP)


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
        # tests/test_shards.py resumes mid-epoch and checks the following epoch). The epoch is over here.
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


def debug_hooks() -> list[Callback]:
    """The test hooks whose variables are set (see the module docstring)."""
    hooks: list[Callback] = []
    if spec := os.environ.get(FAULT_ENV):
        rank, step = (int(v) for v in spec.split(":"))
        hooks.append(InjectedFault(rank, step))
    if spec := os.environ.get(STOP_ENV):
        hooks.append(StopAtSteps([int(step) for step in spec.split(",")]))
    return hooks
