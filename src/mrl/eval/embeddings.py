"""Export the embeddings of a data split to ``<split>_embeddings.npy`` / ``<split>_labels.npy``, and reuse
them on the next call.

Embeddings are computed batch by batch under ``torch.inference_mode`` (with the training run's
precision as autocast) and written straight into a memory-mapped ``.npy`` file, so memory stays
bounded by one batch however large the split (ImageNet-1K train at 2048-d is 10.5 GB in float32;
``float16`` storage halves it). Files are written under temporary names and renamed, and a small
``<split>_embeddings.json`` naming the checkpoint and data they came from is written last: files
without a matching one are recomputed, so an interrupted export or a changed checkpoint is never reused.

Every split is read by the datamodule's evaluation loader (``evaluation_loader``): in order and with the
evaluation preprocessing, the training split too (whose training loader crops and flips at random), so
two evaluations of one checkpoint export the same embeddings.

The embeddings file is sized and its blocks reserved on disk before the first batch is written: a disk
too small for it is refused with the sizes involved (``MRLError``) instead of a memory-mapped write
failing half-way (SIGBUS) or an ``OSError``, and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrl.errors import MRLError
from mrl.eval.progress import Progress
from mrl.files import atomic_path, write_json

log = logging.getLogger(__name__)

_AUTOCAST = {"16": torch.float16, "bf16": torch.bfloat16}


def embedding_paths(out_dir: Path, split: str) -> tuple[Path, Path, Path]:
    return (
        out_dir / f"{split}_embeddings.npy",
        out_dir / f"{split}_labels.npy",
        out_dir / f"{split}_embeddings.json",
    )


def _autocast(device: torch.device, precision: str | int | None):
    """Autocast for Lightning precision strings such as ``16-mixed`` / ``bf16-mixed`` (none for 32)."""
    key = str(precision or "32").split("-")[0]
    dtype = _AUTOCAST.get(key)
    if dtype is None or (device.type == "cpu" and dtype is torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_cached(
    out_dir: Path, split: str, fingerprint: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The split's stored embeddings (memory-mapped, read-only) when they came from ``fingerprint``."""
    emb_path, lbl_path, meta_path = embedding_paths(out_dir, split)
    if not (emb_path.is_file() and lbl_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        emb = np.load(emb_path, mmap_mode="r")
        labels = np.load(lbl_path)
    except (OSError, ValueError):
        return None
    if meta != fingerprint or len(emb) != len(labels):
        return None
    return emb, labels


def export_split(
    module: torch.nn.Module,
    datamodule,
    split: str,
    out_dir: Path,
    fingerprint: dict[str, Any],
    dtype: str,
    device: torch.device,
    precision: str | int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute (or reuse) the embeddings ``z`` of ``split``; return ``(embeddings, labels)``.

    ``embeddings`` is a read-only memmap of shape ``(N, D)`` in ``dtype``; ``labels`` an int64 array.
    """
    if split not in datamodule.datasets:
        raise MRLError(
            f"The data set has no '{split}' split (it has: {', '.join(sorted(datamodule.datasets))}). "
            "Choose database_split / query_split among those."
        )
    n = len(datamodule.datasets[split])
    # in order, with the evaluation preprocessing (the training split too); no worker starts unless
    # export_loader finds no valid cache
    loader = datamodule.evaluation_loader(split)
    return export_loader(module, datamodule, loader, n, split, out_dir, fingerprint, dtype, device, precision)


def export_loader(
    module: torch.nn.Module,
    datamodule,
    loader,
    n: int,
    name: str,
    out_dir: Path,
    fingerprint: dict[str, Any],
    dtype: str,
    device: torch.device,
    precision: str | int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of the ``n`` items of ``loader`` (batches ``datamodule.model_inputs`` takes), written
    to ``<name>_embeddings.npy`` / ``<name>_labels.npy`` in ``out_dir`` as :func:`export_split` writes a
    split's (reused while ``fingerprint`` is unchanged)."""
    cached = load_cached(out_dir, name, fingerprint)
    if cached is not None:
        log.info("Reusing %s embeddings from %s", name, out_dir)
        return cached
    emb_path, lbl_path, meta_path = embedding_paths(out_dir, name)
    meta_path.unlink(missing_ok=True)  # the old files are invalid from here on
    module = module.to(device).eval()
    out = None
    labels = np.empty(n, dtype=np.int64)
    row = 0
    try:
        batches = len(loader)
    except TypeError:  # an iterable data set may not know its length
        batches = None
    progress = Progress(f"embeddings: {name} batches", batches)
    # both files are complete before either appears; the fingerprint, written last, marks them valid
    with atomic_path(emb_path) as tmp_emb, atomic_path(lbl_path) as tmp_lbl:
        with torch.inference_mode(), _autocast(device, precision):
            for batch in loader:
                x, y = datamodule.model_inputs(batch, device)
                z = module(x).float()
                if out is None:
                    out = open_embeddings(tmp_emb, (n, z.shape[1]), dtype, name)
                out[row : row + len(z)] = z.cpu().numpy()
                labels[row : row + len(z)] = y.cpu().numpy()
                row += len(z)
                progress.step()
        if out is None or row != n:
            raise MRLError(f"The '{name}' split yielded {row} of its {n} items; cannot export embeddings.")
        try:
            out.flush()
            del out
            with open(tmp_lbl, "wb") as f:
                np.save(f, labels)
        except OSError as err:
            raise MRLError(_write_failed(name, out_dir, err)) from None
    write_json(meta_path, fingerprint)
    return np.load(emb_path, mmap_mode="r"), labels


def _size(num_bytes: float) -> str:
    """``4.0 KiB``, ``10.5 GiB``: bytes in the largest binary unit that leaves at least 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} B" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def _write_failed(name: str, out_dir: Path, err: OSError) -> str:
    return (
        f"Writing the {name} embeddings into {out_dir} failed ({err.strerror or err}); nothing was kept. "
        "Free space there, write elsewhere with hydra.run.dir=<dir on a larger disk>, or halve the "
        "embeddings with embedding_dtype=float16."
    )


def open_embeddings(path: Path, shape: tuple[int, int], dtype: str, name: str) -> np.memmap:
    """A writable ``.npy`` memmap of ``shape`` at ``path`` whose blocks are reserved on disk first: a disk
    without room for it raises :class:`MRLError` here (with the sizes), not a SIGBUS when a page of the
    memmap is written later (an unreserved, sparse file is only allocated as it is written)."""
    needed = shape[0] * shape[1] * np.dtype(dtype).itemsize
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise MRLError(
            f"The {name} embeddings ({shape[0]} x {shape[1]} {dtype}) need {_size(needed)} but "
            f"{path.parent} has {_size(free)} free; nothing was written. Free space there, write elsewhere "
            "with hydra.run.dir=<dir on a larger disk>, or halve them with embedding_dtype=float16."
        )
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(path, "rb+") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as err:  # a file system that cannot reserve blocks is written as it is
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
    except OSError as err:
        raise MRLError(_write_failed(name, path.parent, err)) from None
    return out
