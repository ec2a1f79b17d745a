"""Callbacks added by :func:`mrl.train.train` itself (not selected in configs).

:class:`RestoreLoaderPosition` makes a resumed run continue mid-epoch where the checkpoint was taken.

Test hook (the only one): ``MRL_TEST_FAULT="<rank>:<step>"`` makes the process of that global rank raise
a ``RuntimeError`` when it reaches that optimizer step. It exists so the test suite can check that a
failing DDP rank takes the whole job down with a clear message instead of a hang
(``tests/test_reliability.py``); it is inert unless the variable is set.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback

FAULT_ENV = "MRL_TEST_FAULT"


class InjectedFault(Callback):
    """Raise on ``rank`` at optimizer step ``step`` (test hook, see the module docstring)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise RuntimeError(
                f"{FAULT_ENV}: injected fault on rank {self.rank} at step {trainer.global_step}"
            )


class RestoreLoaderPosition(Callback):
    """Apply the training loader's saved position (torchdata ``StatefulDataLoader``) on resume.

    Lightning loads that position only into a loader created after the checkpoint is read, but
    ``MatryoshkaModule.configure_optimizers`` creates the loader earlier (``estimated_stepping_batches``
    sizes the LR schedule), so without this a resumed epoch would start again from its first batch.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if loop.restarting and loop._combined_loader_states_to_load and loop._data_fetcher is not None:
            loop._load_combined_loader_states()
            iter(loop._data_fetcher)  # a fresh iterator, from the restored position


def debug_hooks() -> list[Callback]:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return []
    rank, step = (int(v) for v in spec.split(":"))
    return [InjectedFault(rank, step)]
