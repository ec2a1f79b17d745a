"""Checkpoint files that are complete or absent: Lightning's ``CheckpointIO`` writing through mrl's one
atomic writer (:func:`mrl.files.atomic_path`).

Why not Lightning's own: its local save goes through an fsspec transaction that stages the file in the
system temp dir and moves it across file systems on commit, a copy that leaves a truncated
``last.ckpt`` behind when the disk fills up (after which the run cannot be resumed from it) and a
0600 file. Here the file is written beside its target, fsynced, given the umask's mode and renamed.
Remote paths (``s3://...``) keep Lightning's behaviour.

It also hands Lightning a checkpoint the job has already read (``preloaded``, see
:func:`mrl.training.job.train`): resuming reads the file once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mrl.files import atomic_path
from mrl.training.checkpoints import LoadedCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoints appear only when complete, and which gives Lightning
    the contents of ``preloaded`` when it loads that file (instead of reading it again)."""

    def __init__(self, preloaded: LoadedCheckpoint | None = None) -> None:
        super().__init__()
        self.preloaded = preloaded

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        contents = self.preloaded.take(path) if self.preloaded is not None else None
        if contents is not None:
            # read with weights_only=True onto the CPU; Lightning moves what it restores to the model's device
            return contents
        return super().load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)
