"""Safeguards of a training run: stop at a non-finite loss without a host sync per step, and evaluate
every DDP process with the same model."""

from __future__ import annotations

import math

import torch
from torch import nn

from mrl.nn import host_reads


class NonFiniteGuard:
    """Flags a nan/inf training loss and raises where the flag is read.

    On an accelerator :meth:`observe` only updates a device tensor; :meth:`check` reads it back, so call
    it where the host waits anyway (logging steps, before a checkpoint is written, epoch end): ``if not
    torch.isfinite(loss)`` on every step would make a GPU wait for the host each step. Where host reads
    are free (the CPU) the loss is read as a number instead, which saves the device flag's two small
    tensor operations at every step.
    """

    def __init__(self) -> None:
        self._flag: torch.Tensor | None = None
        self._seen_on_host = False

    def observe(self, loss: torch.Tensor) -> None:
        if host_reads.host_reads_are_free(loss.device):
            self._seen_on_host = self._seen_on_host or not math.isfinite(loss.item())
            return
        bad = ~torch.isfinite(loss.detach())
        self._flag = bad if self._flag is None else self._flag | bad

    def check(self, step: int) -> None:
        """Raise once a non-finite loss was observed (at or before global step ``step``)."""
        if self._seen_on_host or (self._flag is not None and bool(self._flag)):
            raise FloatingPointError(
                f"The training loss became nan or inf at or before step {step}. Lower optim.lr, "
                "enable gradient clipping (trainer.gradient_clip_val=1.0) or use precision=32; the last good "
                "checkpoint is kept in the run's checkpoints/ folder."
            )


def sync_buffers_from_rank_zero(module: nn.Module, world_size: int) -> None:
    """Give every DDP process rank zero's floating-point buffers (BatchNorm statistics).

    Under DDP every process updates its own running statistics after the last broadcast, so evaluation
    would mix slightly different models. Evaluating everywhere with rank zero's buffers (the ones the
    checkpoint stores) makes DDP metrics equal a single-process run.
    """
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                torch.distributed.broadcast(buffer.data, src=0)
