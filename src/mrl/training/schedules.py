"""Learning-rate schedules timm's factory does not build as the paper used them.

Each factory has the signature of ``timm.scheduler.create_scheduler_v2`` as ``MatryoshkaLitModule`` calls
it (``optimizer, num_epochs, updates_per_epoch, step_on_epochs``) and returns a timm scheduler, so it
is stepped per update like every other schedule here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
from timm.scheduler import PolyLRScheduler
from torch.optim import Optimizer


def per_update_scheduler(factory: Callable[..., Any], optimizer: Optimizer, trainer: L.Trainer) -> Any:
    """The scheduler ``factory`` (``sched``: timm's ``create_scheduler_v2`` or one below) builds for the
    trainer's epochs and optimizer updates per epoch, stepped per update (not per epoch)."""
    num_epochs = max(1, trainer.max_epochs or 1)
    updates_per_epoch = max(1, math.ceil(trainer.estimated_stepping_batches / num_epochs))
    scheduler, _ = factory(
        optimizer, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch, step_on_epochs=False
    )
    return scheduler


def create_triangular(
    optimizer: Optimizer,
    num_epochs: int,
    updates_per_epoch: int,
    step_on_epochs: bool = False,
    peak_epoch: float = 2.0,
    min_lr: float = 0.0,
) -> tuple[PolyLRScheduler, int]:
    """FFCV's "cyclic" schedule of the paper's ResNet-50 recipe: 0 -> peak lr at ``peak_epoch`` -> 0 at the
    last update, linear on both sides.

    timm's poly schedule with power 1 is that line once its decay spans the epochs after the warmup;
    ``create_scheduler_v2`` always spans all ``num_epochs`` (so the lr would end at ``peak_epoch /
    num_epochs`` of its peak), hence this factory.
    """
    per = 1 if step_on_epochs else max(1, int(updates_per_epoch))
    warmup = round(peak_epoch * per)
    total = int(num_epochs) * per
    scheduler = PolyLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        power=1.0,
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=step_on_epochs,
    )
    return scheduler, int(num_epochs)
