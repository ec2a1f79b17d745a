"""Checkpoint files that are complete or absent: Lightning's ``CheckpointIO`` writing through mrl's one
atomic writer (:func:`mrl.files.atomic_path`), and what mrl records in them beside Lightning's state.

Why not Lightning's own: its local save goes through an fsspec transaction that stages the file in the
system temp dir and moves it across file systems on commit, a copy that leaves a truncated
``last.ckpt`` behind when the disk fills up (after which the run cannot be resumed from it) and a
0600 file. Here the file is written beside its target, fsynced, given the umask's mode and renamed.
Remote paths (``s3://...``) keep Lightning's behaviour. A write that fails (a full disk, a quota) stops
the run with one paragraph naming the file, the reason and the checkpoint that is kept.

It also hands Lightning a checkpoint the job has already read (``preloaded``, see
:func:`mrl.training.job.train`): resuming reads the file once.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mrl.errors import MRLError
from mrl.files import atomic_path
from mrl.training.checkpoints import CHECKPOINT_DIR, CLASSES_KEY, LoadedCheckpoint


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
        path = Path(path)
        written = None
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                written = _KeepsWriteErrors(f)
                torch.save(checkpoint, written)
        except (OSError, RuntimeError) as err:
            # torch.save reports a failed write (a full disk, a quota) as a RuntimeError ("enforce fail at
            # inline_container.cc ... unexpected pos"); the file object kept the OSError that says why.
            cause = err if isinstance(err, OSError) else getattr(written, "error", None)
            if cause is None:
                raise
            raise MRLError(_write_failed(path, cause)) from None


class _KeepsWriteErrors:
    """A binary file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_failed(path: Path, err: OSError) -> str:
    """What to do when checkpoint ``path`` could not be written."""
    folder = path.parent
    run_dir = folder.parent if folder.name == CHECKPOINT_DIR else folder
    kept = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    try:
        free = f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free there now)"
    except OSError:
        free = ""
    head = f"Cannot write the checkpoint {path}: {err.strerror or err}{free}. Training stopped"
    room = f"Free space in {folder} (or raise its quota)"
    if not kept:
        return (
            f"{head} before any checkpoint of this run was written. {room} and start the run again, or "
            "start it with hydra.run.dir=<a directory on a disk with room>."
        )
    return (
        f"{head}; the newest complete checkpoint, {kept[-1].name}, is kept. {room}, then continue with "
        f"mrl-train resume={shlex.quote(str(run_dir))}; or copy the run directory to a disk with room "
        "and resume the copy."
    )


class RecordClasses(L.Callback):
    """Stores the training data's class names (label order) in every checkpoint, so that resuming,
    fine-tuning or evaluating it on data with as many but other classes is refused
    (:func:`mrl.training.checkpoints.check_classes`)."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = [str(c) for c in classes]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CLASSES_KEY] = list(self.classes)
