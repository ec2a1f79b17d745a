"""A Lightning callback that records the host reads mrl's own code makes during training steps.

A host read (``.item()``, ``bool(t)``, ``nonzero``, ``torch.equal``, ops with data-dependent output
shapes) makes the host wait for the device to finish its queue: on a GPU, once per step, that stalls
the pipeline. Such ops are caught with a ``TorchDispatchMode``; one counts only when the first Python
frame outside torch that issued it is in the ``mrl`` package (Lightning's and torchmetrics' own reads
are theirs).

The mode is on from the end of a step whose successor is a non-logging step to that successor's end,
so it covers the next batch's fetch, transfer hooks (decoding, cropping, rendering, normalising),
forward, backward and optimizer step. Logging steps read values back by design and are not watched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

import mrl

MRL_DIR = str(Path(mrl.__file__).parent)
TORCH_DIR = str(Path(torch.__file__).parent)
aten = torch.ops.aten
HOST_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


def _boolean_mask_indexing(func, args) -> bool:
    """``t[mask]`` with a bool mask: its output's size is the mask's count, read back from the device (the
    kernel's own nonzero does not pass through the dispatch mode)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class _Recorder(TorchDispatchMode):
    def __init__(self, events: list[str], step: int) -> None:
        super().__init__()
        self.events, self.step = events, step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or _boolean_mask_indexing(func, args):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith((TORCH_DIR, __file__)):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(MRL_DIR):
                where = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
                self.events.append(f"step {self.step}: {func} from {where}")
        return func(*args, **(kwargs or {}))


class HostSyncRecorder(Callback):
    """Records into ``events`` every host read from mrl code during non-logging training steps;
    ``watched`` counts the steps that were watched."""

    last: HostSyncRecorder | None = None  # the instance the run's config built, for the test to read

    def __init__(self) -> None:
        self.events: list[str] = []
        self.watched = 0
        self._mode: _Recorder | None = None
        HostSyncRecorder.last = self

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if self._mode is not None:
            self.watched += 1
        self._stop()
        # the next step, batch_idx + 1, at global step trainer.global_step (already advanced)
        every = max(1, int(trainer.log_every_n_steps or 1))
        next_logs = (trainer.global_step + 1) % every == 0 or batch_idx + 2 >= trainer.num_training_batches
        if not next_logs and batch_idx + 1 < trainer.num_training_batches:
            self._mode = _Recorder(self.events, trainer.global_step)
            self._mode.__enter__()

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        self._stop()
