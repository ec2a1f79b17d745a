"""Frozen features computed once and read back memory-mapped: heads train on them without a backbone.

A frozen model's pooled features (before any head) are computed split by split and streamed to
``<root>/<key>/<split>.npy`` (``numpy.lib.format.open_memmap``, float16 or float32) one loader batch at
a time, with the batch's labels beside them in ``<split>.labels.npy``: the process holds one batch,
whatever the number of images (the file's pages go through the operating system's page cache). The
files are written under temporary names and renamed into place at the end; the completion marker
``<split>.json`` (key, split, shape, dtype, count) is written last, and only a split with a marker
that agrees with its files counts as cached. An extraction that stops half-way (an exception, a killed
process) leaves no marker, so it is never taken for a complete one.

The key (:func:`feature_cache_key`) hashes the source's weights (every tensor of its state dict, by
content), the data's identity and the preprocessing settings: another head, seed or rerun on the same
source and data finds the cache; a changed source, data set or preprocessing gets a new key, and so a
new directory, never a stale cache.

A cache that is there but damaged (a marker that does not parse or names another key, a features file
that is truncated or disagrees with its marker) is rebuilt by :func:`extract_features`, with a warning
saying why; :func:`open_split`, for readers that cannot rebuild, raises :class:`MRLError` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from tqdm.auto import tqdm

from mrl.errors import MRLError
from mrl.files import atomic_path, write_json

log = logging.getLogger(__name__)

# Bumped when the files' layout or meaning changes, so that older caches get new keys.
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
Rows = tuple[np.ndarray, "np.ndarray | None"]  # one batch's features and labels
# a loader batch -> (model inputs, labels) on a device (a datamodule's model_inputs)
Prepare = Callable[[Any, torch.device], tuple[torch.Tensor, "torch.Tensor | None"]]


def weights_digest(source: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state dict by content: every entry's name, dtype, shape and bytes, in name
    order (buffers such as batch-norm statistics included: they change the features too)."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):  # a module's extra state: hashed by its JSON form
            digest.update(json.dumps([name, value], sort_keys=True).encode())
            continue
        tensor = value.detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_cache_key(
    source: nn.Module | Mapping[str, torch.Tensor] | str,
    data: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
) -> str:
    """The cache key of ``source``'s features of ``data`` under ``preprocessing``.

    ``source``: the frozen model, its state dict, or its :func:`weights_digest` (computed once for
    several splits); ``data``: what identifies the images (data set, location, split sizes, a digest
    of the file list, ...); ``preprocessing``: the evaluation transform's settings (image size, crop,
    mean and std, ...). Both mappings must hold JSON values: they are hashed in their canonical JSON
    form (sorted keys), so equal settings give equal keys in every process.
    """
    weights = source if isinstance(source, str) else weights_digest(source)
    parts = {"format": FORMAT_VERSION, "source": weights, "data": data, "preprocessing": preprocessing}
    try:
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise TypeError(f"the data identity and preprocessing settings must be JSON values: {err}") from err
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FeatureSplit:
    """A complete cached split: ``count`` rows of ``dim`` features stored as ``dtype``."""

    directory: Path
    split: str
    key: str
    count: int
    dim: int
    dtype: str
    has_labels: bool

    @property
    def features_path(self) -> Path:
        return self.directory / f"{self.split}.npy"

    @property
    def labels_path(self) -> Path:
        return self.directory / f"{self.split}.labels.npy"

    def features(self) -> np.ndarray:
        """The features, memory-mapped read-only ``(count, dim)``."""
        return np.load(self.features_path, mmap_mode="r")

    def labels(self) -> np.ndarray | None:
        """The labels ``(count,)`` memory-mapped, or None for a loader without labels."""
        return np.load(self.labels_path, mmap_mode="r") if self.has_labels else None


def _marker_path(directory: Path, split: str) -> Path:
    return directory / f"{split}.json"


def _read_split(directory: Path, split: str, key: str) -> FeatureSplit:
    """The split its marker describes, checked against its files; ValueError/OSError saying why not."""
    meta = json.loads(_marker_path(directory, split).read_text())
    if meta.get("key") != key or meta.get("split") != split:
        raise ValueError(f"its marker names key {meta.get('key')!r}, split {meta.get('split')!r}")
    count, dim = (int(n) for n in meta["shape"])
    found = FeatureSplit(directory, split, key, count, dim, str(meta["dtype"]), bool(meta["labels"]))
    if found.dtype not in DTYPES or int(meta["count"]) != count:
        raise ValueError(f"its marker is inconsistent: {meta}")
    features = found.features()
    if features.shape != (count, dim) or features.dtype != np.dtype(found.dtype):
        raise ValueError(f"{found.features_path.name} holds {features.shape} {features.dtype}, not {meta}")
    labels = found.labels()
    if labels is not None and labels.shape != (count,):
        raise ValueError(f"{found.labels_path.name} holds {labels.shape[0]} labels for {count} rows")
    return found


def open_split(root: str | Path, key: str, split: str) -> FeatureSplit | None:
    """The complete cache of ``split`` under ``key``, or None when there is none (never written, or
    interrupted: no marker). A damaged cache raises :class:`MRLError`."""
    directory = Path(root) / key
    if not _marker_path(directory, split).exists():
        return None
    try:
        return _read_split(directory, split, key)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MRLError(
            f"The cached features of split {split!r} in {directory} are damaged ({err}). Delete that "
            "folder, or run the extraction again, which rebuilds it."
        ) from err


def _sample_count(loader: DataLoader) -> int:
    dataset = loader.dataset
    in_order = isinstance(dataset, IterableDataset) or isinstance(loader.sampler, SequentialSampler)
    if not in_order or loader.drop_last:
        raise MRLError(
            "Features are cached in the data set's order, every image once: extract them with a loader "
            "that neither shuffles nor drops the last batch (shuffle=False, drop_last=False)."
        )
    try:
        return len(dataset)
    except TypeError as err:
        raise MRLError("Feature extraction needs a data set of known length, to size its file.") from err


def _inputs_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise MRLError(
        f"Feature extraction reads batches of (images, labels) tensors, got {type(batch).__name__}."
    )


def _outputs(
    model: nn.Module, loader: DataLoader, device: torch.device, prepare: Prepare | None = None
) -> Iterator[Rows]:
    """Each batch's features ``(b, dim)`` float32 and labels (or None), one batch at a time."""
    for batch in loader:
        # per batch, not around the loop: a generator suspended inside the context would leak it
        with torch.inference_mode():
            inputs, labels = _inputs_and_labels(batch) if prepare is None else prepare(batch, device)
            out = model(inputs.to(device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MRLError(
                f"The frozen model must return pooled features of shape (batch, features); it returned "
                f"{shape}. Pass the backbone without its head (e.g. timm's num_classes=0)."
            )
        yield out.float().cpu().numpy(), None if labels is None else labels.cpu().numpy()


def _stream(
    outputs: Iterator[Rows], tmp: tuple[Path, Path | None], first: Rows, count: int, dtype: str, bar: tqdm
) -> int:
    """Writes ``first`` and the rest of ``outputs`` into memmaps at ``tmp``; returns the rows written."""
    features = open_memmap(tmp[0], mode="w+", dtype=dtype, shape=(count, first[0].shape[1]))
    labels = None if tmp[1] is None else open_memmap(tmp[1], mode="w+", dtype=np.int64, shape=(count,))
    offset = 0
    for rows, row_labels in _chain(first, outputs):
        end = offset + len(rows)
        if end > count or (labels is None) != (row_labels is None):
            raise MRLError(
                f"The loader gave more rows than its data set's {count}, or labels in some batches only."
            )
        features[offset:end] = rows
        if labels is not None:
            labels[offset:end] = row_labels
        offset = end
        bar.update(1)
    for array in (features, labels):
        if array is not None:
            array.flush()
    return offset


def _chain(first: Rows, rest: Iterator[Rows]) -> Iterator[Rows]:
    yield first
    yield from rest


def _write_split(
    model: nn.Module,
    loader: DataLoader,
    directory: Path,
    split: str,
    key: str,
    dtype: str,
    device: torch.device,
    progress: bool,
    prepare: Prepare | None,
) -> FeatureSplit:
    count = _sample_count(loader)
    _marker_path(directory, split).unlink(missing_ok=True)  # no old marker may vouch for new files
    outputs = _outputs(model, loader, device, prepare)
    first = next(outputs, None)
    if first is None:
        raise MRLError(f"The loader of split {split!r} gave no batch: there are no features to cache.")
    names = FeatureSplit(directory, split, key, count, first[0].shape[1], dtype, first[1] is not None)
    with ExitStack() as stack:
        features_tmp = stack.enter_context(atomic_path(names.features_path))
        labels_tmp = stack.enter_context(atomic_path(names.labels_path)) if names.has_labels else None
        # disable=None: no bar when the output is no terminal (a log file would get every redraw)
        bar = stack.enter_context(
            tqdm(
                total=len(loader),
                desc=f"Features of {split}",
                unit="batch",
                disable=None if progress else True,
            )
        )
        written = _stream(outputs, (features_tmp, labels_tmp), first, count, dtype, bar)
        if written != count:
            raise MRLError(f"The loader of split {split!r} gave {written} rows for a data set of {count}.")
    shape = [count, names.dim]
    meta = {
        "key": key,
        "split": split,
        "shape": shape,
        "dtype": dtype,
        "count": count,
        "labels": names.has_labels,
    }
    write_json(_marker_path(directory, split), {**meta, "format": FORMAT_VERSION})
    return names


def extract_features(
    model: nn.Module,
    loader: DataLoader,
    root: str | Path,
    key: str,
    split: str,
    dtype: str = "float16",
    device: torch.device | str | None = None,
    progress: bool = True,
    prepare: Prepare | None = None,
) -> FeatureSplit:
    """The cached features of ``split``: reused when a complete cache with ``key`` is there, otherwise
    computed with ``model`` (in eval mode, on ``device``: default the model's) over ``loader`` (in
    order, not shuffled) and written as the module docstring says, with a progress bar unless
    ``progress`` is false. A damaged cache is rebuilt. ``prepare(batch, device)`` turns a loader batch
    into ``(inputs, labels)`` (default: its first two tensors)."""
    if dtype not in DTYPES:
        raise MRLError(f"Features are cached as one of {DTYPES}, not {dtype!r}.")
    try:
        found = open_split(root, key, split)
    except MRLError as err:
        log.warning("%s Rebuilding it.", err)
        found = None
    if found is not None:
        return found
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        directory = Path(root) / key
        return _write_split(
            model, loader, directory, split, key, dtype, torch.device(device), progress, prepare
        )
    finally:
        model.train(was_training)


def extract_splits(
    model: nn.Module,
    loaders: Mapping[str, DataLoader],
    root: str | Path,
    key: str,
    dtype: str = "float16",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, FeatureSplit]:
    """:func:`extract_features` of every ``{split: loader}`` under one key."""
    return {
        split: extract_features(model, loader, root, key, split, dtype, device, progress)
        for split, loader in loaders.items()
    }


class CachedFeatures(Dataset):
    """The rows of a cached split as float32 tensors, with their labels when the split has them.

    The files are opened memory-mapped on first use in each process (a loader's workers included), so
    nothing but the pages read is held, and in the page cache, which the kernel can reclaim.
    ``__getitems__`` reads a whole batch with one ``index_select`` over the mapped file and returns
    ``(features (B, dim), labels (B,))``, its rows in file order; use :func:`feature_loader`.
    """

    def __init__(self, split: FeatureSplit) -> None:
        self.split = split
        self._tensors: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __getstate__(self) -> dict:
        return {"split": self.split, "_tensors": None}  # workers map the files themselves

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and labels as tensors over the mapped files. Copy-on-write maps (``mmap_mode="c"``):
        torch wants writable arrays, and nothing here writes, so the file is never changed; why not
        numpy's fancy indexing of the read-only map: it is the slower read of a batch (benchmarks/README.md,
        "Post-hoc heads")."""
        if self._tensors is None:
            split = self.split
            features = torch.from_numpy(np.load(split.features_path, mmap_mode="c"))
            labels = torch.from_numpy(np.load(split.labels_path, mmap_mode="c")) if split.has_labels else None
            self._tensors = (features, labels)
        return self._tensors

    def __len__(self) -> int:
        return self.split.count

    def __getitems__(self, indices: Sequence[int]):
        # The rows are returned in file order, not in the order asked: neighbouring rows share pages, and
        # a batch's order does not matter to training (every loss and metric sums over its rows), so
        # putting them back would only cost a copy. numpy turns the sampler's list of ints into an array
        # and sorts it in a fraction of the time torch.as_tensor takes for the list alone.
        features, labels = self.tensors()
        rows = torch.from_numpy(np.sort(np.asarray(indices, dtype=np.int64)))
        batch = features.index_select(0, rows).float()
        return batch if labels is None else (batch, labels.index_select(0, rows))

    def __getitem__(self, index: int):
        batch = self.__getitems__([index])
        return batch[0] if isinstance(batch, torch.Tensor) else (batch[0][0], batch[1][0])


def _whole_batch(batch):
    return batch  # CachedFeatures.__getitems__ already returns the collated batch


def feature_loader(
    split: FeatureSplit,
    batch_size: int,
    shuffle: bool = True,
    seed: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """Random (``shuffle``; seeded by ``seed``) or in-order batches of a cached split: ``(features,
    labels)`` float32 and int64 tensors (features only for a split without labels)."""
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return DataLoader(
        CachedFeatures(split),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=_whole_batch,
    )
