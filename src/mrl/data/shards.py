"""LitData shards of encoded images: ``mrl-prepare-data`` writes them, ``data=shards`` trains from them.

A shard directory holds one LitData dataset per split (``train/``, ``val/``, optionally ``test/``: each
an ``index.json`` and its chunks of ``{"image": JPEG bytes, "label": int}``) and
:data:`METADATA_NAME`, which names the classes. LitData streams the chunks from a local path or an object
store (``s3://``, ``gs://``, ...; chunks are cached locally), gives every DDP rank and loader worker a
disjoint part of each epoch, and saves the loader's position in Lightning's checkpoints, so a resumed run
continues mid-epoch with the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import tempfile
from pathlib import Path
from typing import Any

# LitData asks PyPI for a newer release at every dataset creation (a 30 s timeout when the network drops
# packets): training nodes are often offline, and the answer changes nothing here.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import torch

from mrl.errors import MRLError

try:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.sampler import ChunkedIndex
except ImportError as err:  # an optional dependency: the `shards` extra
    raise MRLError(
        f"Shards (data=shards, data=imagenet, mrl-prepare-data) need LitData, which is not installed here "
        f"({err}). Install mrl's shards extra: pip install 'mrl[shards]' (or pip install 'litdata>=0.2.76'), "
        "or read an image folder instead with data=imagefolder / data=imagenet_folder."
    ) from None

from mrl.data import object_store
from mrl.data.encoded import EncodedImageDataModule, EncodedSample
from mrl.data.preprocess import ImageTransform, sample_seed

METADATA_NAME = "mrl_shards.json"
FORMAT = "mrl-image-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# How the loaders of a distributed job start their workers (every epoch: LitData hands each epoch's plan
# to fresh workers): from a fork server, not forked from the training process. There that process runs
# threads (gloo's, and the other loader's queue feeders), and a fork can copy a lock one of them holds,
# which the new worker then waits on for ever: a two-node job hung at validation, its new worker blocked
# on a futex right after the fork (tests/training/test_multinode.py). The server is one single-threaded
# process, started once per job with the modules a worker needs already imported (without them each
# worker would import torch anew: a second or more per worker and epoch); the dataset reaches each worker
# pickled, as LitData's datasets are made to be. A single process keeps forking them: no hang was ever
# seen there, and a fork costs nothing and hands the workers the process's environment as it is now.
WORKER_START = "forkserver"
WORKER_MODULES = ["litdata", "mrl.data.shards"]


def worker_start(workers: int, world_size: int) -> multiprocessing.context.BaseContext | None:
    """How ``workers`` loader workers of a job of ``world_size`` processes start (None: forked, or no
    workers), see ``WORKER_START``."""
    if not workers or world_size <= 1:
        return None
    context = multiprocessing.get_context(WORKER_START)
    context.set_forkserver_preload(WORKER_MODULES)  # read when the server starts: the first loader's
    return context


def is_remote(path: str) -> bool:
    return "://" in str(path) or str(path).startswith("local:")


def join(base: str, *parts: str) -> str:
    """A path below ``base``, which may be a local folder or an object-store URI."""
    return "/".join([str(base).rstrip("/"), *parts]) if is_remote(base) else str(Path(base, *parts))


def check_chunks(split_dir: Path) -> None:
    """Every chunk a local split's LitData index lists is there, whole; else an :class:`MRLError` (LitData
    itself waits for the missing chunk and then blames a download)."""
    try:
        index = json.loads((split_dir / "index.json").read_text())
        chunks, compressed = index["chunks"], bool((index.get("config") or {}).get("compression"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no readable index: LitData's own error names it when the split is opened
    for chunk in chunks:
        path = split_dir / str(chunk.get("filename"))
        size = path.stat().st_size if path.is_file() else None
        # a compressed chunk's stored size is not its index's (uncompressed) one: only its presence counts
        if size is None or (not compressed and size != chunk.get("chunk_bytes")):
            state = "is missing" if size is None else f"holds {size} of its {chunk.get('chunk_bytes')} bytes"
            raise MRLError(
                f"The shards in {split_dir} are incomplete: {path.name} {state} (deleted, truncated or "
                "still being copied). Prepare the data again with mrl-prepare-data (or copy the shard "
                "directory again whole), then train."
            )


def read_metadata(input_dir: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The shard directory's :data:`METADATA_NAME`, checked; an :class:`MRLError` says what is wrong."""
    hint = (
        "Create shards with `mrl-prepare-data root=<ImageFolder root> output_dir=<dir>` and pass that dir "
        "as data.input_dir."
    )
    try:
        if object_store.is_s3(input_dir):
            text = object_store.read_text(join(input_dir, METADATA_NAME), storage_options)
        elif is_remote(input_dir):
            from litdata.streaming.downloader import get_downloader

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, METADATA_NAME)
                get_downloader(input_dir, tmp, [], storage_options).download_file(
                    join(input_dir, METADATA_NAME), local
                )
                text = Path(local).read_text()
        else:
            text = (Path(input_dir).expanduser() / METADATA_NAME).read_text()
        meta = json.loads(text)
    except FileNotFoundError:
        raise MRLError(
            f"data.input_dir={input_dir} holds no {METADATA_NAME}: it is not an mrl shard directory. {hint}"
        ) from None
    except (OSError, ValueError) as err:
        raise MRLError(f"Cannot read {join(input_dir, METADATA_NAME)} ({err}). {hint}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MRLError(f"{join(input_dir, METADATA_NAME)} is not mrl shard metadata. {hint}")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise MRLError(
            f"The shards in {input_dir} have format version {meta.get('version')}; this mrl reads up to "
            f"{FORMAT_VERSION}. Upgrade mrl, or prepare the shards again with this version."
        )
    if not meta.get("classes") or not {"train", "val"} <= set(meta.get("splits", {})):
        raise MRLError(
            f"{join(input_dir, METADATA_NAME)} names no classes or lacks the train/val splits. {hint}"
        )
    return meta


class ImageShards(StreamingDataset):
    """One split of a shard directory. Items are ``(uint8 (3, S, S), label)`` with an
    ``image_transform``, else
    :class:`~mrl.data.encoded.EncodedSample` (``decode=gpu``).

    A training crop is drawn from the sample's own seed ``(seed, epoch, index)``: every worker, rank and
    resumed run draws the same crop for the same sample in the same epoch.
    """

    def __init__(self, input_dir: str, image_transform: ImageTransform | None, seed: int, **kwargs: Any):
        # batch_decode=0: each sample is deserialised alone. LitData's "auto" deserialises windows of
        # small samples at once, which for these shuffled byte samples reads an order of magnitude
        # slower (benchmarks/input_pipeline.py reads the training split shuffled).
        super().__init__(input_dir, seed=seed, batch_decode=0, **kwargs)
        self.image_transform = image_transform

    def __iter__(self):
        # A worker started from the fork server (WORKER_START) has not inherited the process-wide switch
        # that lets LitData's downloads reach an http:// store: set it where the chunks are read.
        object_store.allow_plain_http(self.storage_options)
        return super().__iter__()

    def __getitem__(self, index: ChunkedIndex | int) -> Any:
        item = super().__getitem__(index)
        position = index.index if isinstance(index, ChunkedIndex) else int(index)
        seed = sample_seed(self.seed, self.current_epoch, position)
        label = int(item["label"])
        if self.image_transform is None:
            return EncodedSample(item["image"], label, seed)
        try:
            data = torch.frombuffer(bytearray(item["image"]), dtype=torch.uint8)
            return self.image_transform(data, random.Random(seed)), label
        except RuntimeError as err:  # torchvision's decoders raise RuntimeError on corrupt bytes
            raise MRLError(
                f"Sample {position} of {self.input_dir.url or self.input_dir.path} does not decode ({err}): "
                "the shards are corrupt. Prepare them again with mrl-prepare-data."
            ) from err


class ShardDataModule(EncodedImageDataModule):
    """Trains from a shard directory written by ``mrl-prepare-data`` (local path or object-store URI).

    ``cache_dir`` / ``max_cache_size`` bound LitData's local copy of remote chunks; ``storage_options``
    go to LitData (credentials, endpoint). ``shuffle`` shuffles the training split each epoch (chunk
    order and items within chunks, seeded by ``seed`` and the epoch). Without a ``test`` split, the test
    runs on ``val``. ``in_chans`` is recorded for tools that rebuild the model without the data.
    """

    def __init__(
        self,
        input_dir: str,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
        storage_options: dict[str, Any] | None = None,
        shuffle: bool = True,
        in_chans: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # LitData logs its cache settings at INFO for every dataset, in every worker and epoch
        logging.getLogger("litdata").setLevel(logging.WARNING)
        if int(in_chans) != 3:
            raise MRLError(
                f"data.in_chans={in_chans}, but shards hold RGB images, 3 channels (grey images were "
                "converted when they were written). Drop the data.in_chans override (or set data.in_chans=3)."
            )
        if not input_dir or str(input_dir) in ("???", "None"):
            raise MRLError("data=shards needs data.input_dir=<shard directory written by mrl-prepare-data>.")
        self.input_dir = (
            str(input_dir) if is_remote(input_dir) else str(Path(input_dir).expanduser().absolute())
        )
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.storage_options = dict(storage_options or {})
        if object_store.is_s3(self.input_dir):
            object_store.allow_plain_http(self.storage_options)
        self.shuffle = bool(shuffle)
        self.metadata = read_metadata(self.input_dir, self.storage_options)
        self.classes = tuple(self.metadata["classes"])
        self.num_classes = len(self.classes)

    def _eval_batch_size(self, split: str) -> int:
        """Under DDP, LitData gives each rank but the last whole batches of an evaluation split and the
        last rank the rest, so every image is evaluated exactly once; a rank whose share is below one
        batch would get none, which Lightning refuses. Smaller batches then (small splits only)."""
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer else 1
        total = int(self.metadata["splits"].get(split, self.metadata["splits"]["val"]))
        return max(1, min(self.eval_batch_size, total // world))

    def _reader_options(self) -> dict[str, Any]:
        """LitData's reader settings of this datamodule: its cache and storage options."""
        extra: dict[str, Any] = {}
        if self.cache_dir:
            extra["cache_dir"] = str(self.cache_dir)
        if self.max_cache_size:
            extra["max_cache_size"] = self.max_cache_size
        if self.storage_options:
            extra["storage_options"] = self.storage_options
        return extra

    def split_dir(self, split: str) -> str:
        if split == "test" and "test" not in self.metadata["splits"]:
            split = "val"
        return join(self.input_dir, split)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not is_remote(self.input_dir):
            for split in dict.fromkeys(self.split_dir(split) for split in SPLITS):
                check_chunks(Path(split).expanduser())
        extra = self._reader_options()
        datasets = {}
        for split in SPLITS:
            train = split == "train"
            transform = None if self.decode == "gpu" else self.image_transform(train)
            try:
                datasets[split] = ImageShards(
                    self.split_dir(split),
                    transform,
                    seed=self.seed,
                    shuffle=train and self.shuffle,
                    drop_last=train,
                    **extra,
                )
            except (OSError, ValueError) as err:
                raise MRLError(
                    f"Cannot open the {split} shards in {self.split_dir(split)} ({err}). Prepare the data "
                    "again with mrl-prepare-data, or check data.input_dir and its storage credentials."
                ) from err
        self.datasets = datasets

    def evaluation_loader(self, split: str) -> StreamingDataLoader:
        # the training split's shards crop and flip at random and are shuffled: its images in order with
        # the evaluation transform
        if split != "train":
            return super().evaluation_loader(split)
        transform = None if self.decode == "gpu" else self.image_transform(False)
        dataset = ImageShards(
            self.split_dir("train"),
            transform,
            seed=self.seed,
            shuffle=False,
            drop_last=False,
            **self._reader_options(),
        )
        options = self._loader_options()
        workers = int(options.pop("num_workers"))
        return StreamingDataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            num_workers=workers,
            multiprocessing_context=worker_start(workers, self._world_size()),
            **options,
        )

    def _world_size(self) -> int:
        return int(getattr(self.trainer, "world_size", 1) or 1)

    def _loader(self, split: str, train: bool, **options: Any) -> StreamingDataLoader:
        if split not in self.datasets:
            self.setup(None)
        options = {**self._loader_options(), **options}
        workers = int(options.pop("num_workers"))
        batch_size = self.batch_size if train else self._eval_batch_size(split)
        # Workers are started per epoch (not persistent): LitData hands each epoch's plan, and the
        # position restored on resume, to fresh workers.
        return StreamingDataLoader(
            self.datasets[split],
            batch_size=batch_size,
            num_workers=workers,
            multiprocessing_context=worker_start(workers, self._world_size()),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=train,
            **options,
        )
