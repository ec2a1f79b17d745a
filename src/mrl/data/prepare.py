"""``mrl-prepare-data``: an ImageFolder tree -> LitData shards of JPEG bytes and labels (``data=shards``).

Each split (``train``, ``val``, and ``test`` when present) becomes one LitData dataset, written by
parallel worker processes with LitData's chunk writer (:mod:`mrl.data.shard_writers`). Images are
stored as they are when they already are grey or RGB JPEGs (1 or 3 components) within ``max_side``;
others are decoded as every loader decodes them (:mod:`mrl.data.decode`: 16-bit samples scaled,
palette, alpha and CMYK converted), shrunk so their longer side is ``max_side`` (the paper's FFCV
files: 500 px) and re-encoded as grey or RGB JPEGs at ``quality``, so every stored image decodes with
nvJPEG too. The tree is checked as ``data=imagefolder`` checks it (:mod:`mrl.data.tree`). The file
order is shuffled (seeded) before writing: LitData shuffles chunks and items within chunks, which mixes
classes only if the chunks do.

Nothing is written at ``output_dir`` until every split is complete: the shards are built in a hidden
sibling directory and renamed into place, and an existing non-empty ``output_dir`` is refused. A run
that is interrupted (SIGINT, SIGTERM, SIGHUP) or fails ends its writer processes and removes that
directory; one that is killed leaves it to the next run, which removes it (:mod:`mrl.data.staging`,
:mod:`mrl.data.writer_group`). The console shows mrl's own progress, nothing of LitData's.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mrl.config_checks import is_int, require
from mrl.data import object_store
from mrl.data.decode import ImageDecodeError, fast_channels, open_image, to_8bit
from mrl.data.shard_writers import write_items
from mrl.data.shards import FORMAT, FORMAT_VERSION, METADATA_NAME, SPLITS, is_remote
from mrl.data.staging import Staging, claim, clear_leftovers
from mrl.data.tree import ClassFolders, list_tree
from mrl.data.writer_group import run_in_group, signals_deferred, signals_interrupt
from mrl.errors import MRLError

CHUNK_BYTES = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgt]b?|b)\s*$", re.IGNORECASE)  # LitData's units
# in the hidden folder, removed before it is renamed into place: where the workers note unreadable images
ERRORS_NAME = ".errors"


def _folder(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _size(v: Any) -> bool:
    return (is_int(v) and v > 0) or (isinstance(v, str) and bool(CHUNK_BYTES.match(v)))


# the settings of conf/prepare_data.yaml (besides Hydra's task_name and paths): a test of the value, what
# it must be, an example
SETTINGS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "root": (_folder, "a folder", "root=/data/imagenet"),
    "output_dir": (_folder, "a folder", "output_dir=/data/imagenet-shards"),
    "max_side": (
        lambda v: v is None or (is_int(v) and v >= 8),
        "the longer side's pixels, an integer >= 8, or null",
        "max_side=500 (or max_side=null: keep every size)",
    ),
    "quality": (lambda v: is_int(v) and 1 <= v <= 100, "a JPEG quality from 1 to 100", "quality=90"),
    "num_workers": (
        lambda v: v is None or (is_int(v) and v > 0),
        "a positive integer or null",
        "num_workers=8 (or num_workers=null: one per CPU)",
    ),
    "chunk_bytes": (
        _size,
        "a size with its unit (B, KB, MB, GB, TB) or a number of bytes",
        "chunk_bytes=64MB",
    ),
    "seed": (is_int, "an integer", "seed=0"),
}


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse a setting of ``mrl-prepare-data`` that is unknown or of the wrong kind, naming it and an
    example (:mod:`mrl.config_checks`' messages), before anything is read or written."""
    unknown = sorted(set(settings) - set(SETTINGS) - {"task_name", "paths"})
    if unknown:
        raise MRLError(
            f"{', '.join(unknown)} is not an mrl-prepare-data setting. Its settings are "
            f"{', '.join(SETTINGS)} (conf/prepare_data.yaml); fix the spelling or drop it."
        )
    for key, (ok, what, example) in SETTINGS.items():
        if key in settings:
            require(ok(settings[key]), key, settings[key], what, example)


def encode_image(data: bytes, max_side: int | None, quality: int) -> bytes:
    """``data`` unchanged when it is a JPEG the loaders decode as it is (1 or 3 components) no larger than
    ``max_side``; otherwise decoded to 8-bit grey or RGB as every loader reads it
    (:func:`mrl.data.decode.to_8bit`: 16-bit samples scaled, palette, alpha and CMYK converted), shrunk
    to ``max_side`` on its longer side and encoded as a JPEG at ``quality``."""
    from PIL import Image

    # Decoded in full even when stored unchanged: a truncated JPEG opens (only its header is read) and
    # would otherwise reach the shards and stop a training epoch; open_image loads it.
    image = open_image(data)
    fits = max_side is None or max(image.size) <= max_side
    if image.format == "JPEG" and fast_channels(data) is not None and fits:
        return data
    image = to_8bit(image)
    if not fits:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(quality))
    return out.getvalue()


def encode_sample(item: tuple[str, int, int | None, int, str]) -> dict[str, Any]:
    """The item written for one image (runs in the writer's worker processes).

    An unreadable image is noted in ``errors_dir`` and stored as an empty placeholder instead of raising,
    so that the split fails as a whole naming every bad file, not only the first; the placeholders never
    leave the hidden directory.
    """
    path, label, max_side, quality, errors_dir = item
    try:
        data = Path(path).read_bytes()
        return {"image": encode_image(data, max_side, quality), "label": int(label)}
    except Exception as err:  # open_image and to_8bit say what is wrong; anything else by its type
        reason = str(err) if isinstance(err, ImageDecodeError) else f"{type(err).__name__}: {err}"
        with open(Path(errors_dir) / f"{os.getpid()}.txt", "a") as f:
            f.write(f"{path} ({reason})\n")
        return {"image": b"", "label": -1}


def _bad_files(errors_dir: Path) -> list[str]:
    return sorted(line for f in errors_dir.glob("*.txt") for line in f.read_text().splitlines() if line)


def check_output_dir(output_dir: str) -> Path:
    if is_remote(output_dir):
        raise MRLError(
            f"output_dir={output_dir}: mrl-prepare-data writes to a local folder or an S3 prefix "
            "(s3://bucket/prefix). For another store, prepare the shards locally, copy the folder there, "
            "then train with data.input_dir=<its URI>."
        )
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MRLError(
            f"output_dir={out} already exists and is not empty: mrl-prepare-data never writes over "
            "existing data. Choose a new output_dir, or delete that folder first."
        )
    parent = next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MRLError(
            f"Cannot create output_dir={out}: {parent} is not writable. Choose another output_dir."
        )
    return out


def check_root(root: str) -> tuple[Path, dict[str, ClassFolders]]:
    """The tree at ``root`` and its splits' listings, checked as ``data=imagefolder`` checks them
    (:func:`mrl.data.tree.list_tree`)."""
    path = Path(root).expanduser().absolute()
    missing = [s for s in ("train", "val") if not (path / s).is_dir()]
    if missing:
        raise MRLError(
            f"root={path} has no {' or '.join(f'{s}/' for s in missing)} folder. mrl-prepare-data reads an "
            "ImageFolder tree: root/train/<class>/<image>, root/val/<class>/<image> and optionally "
            "root/test/<class>/<image>."
        )
    return path, list_tree(path, {split: path / split for split in SPLITS if (path / split).is_dir()})


class SplitProgress:
    """mrl's own progress of one split: a bar on a terminal, otherwise (a log file, CI) a line a minute;
    a line when done."""

    def __init__(self, split: str, total: int, enabled: bool) -> None:
        self.split, self.total, self.enabled = split, total, enabled
        self.started = self.shown = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=f"mrl-prepare-data: {split}", unit="img", dynamic_ncols=True, leave=False
            )

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self.enabled and time.monotonic() - self.shown >= 60:
            self.shown = time.monotonic()
            print(f"mrl-prepare-data: {self.split}: {done}/{self.total} images", flush=True)

    def close(self, done: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        if done and self.enabled:
            seconds = time.monotonic() - self.started
            print(
                f"mrl-prepare-data: {self.split}: {self.total} images written in {seconds:.0f} s", flush=True
            )


FULL_DISK = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def write_failure(reason: str, what: str, out: Path) -> str:
    """The message of a failed write of ``what``: a full disk (or quota) says what to do."""
    reason = " ".join(reason.split())
    full = next((s for s in FULL_DISK if s in reason), None)
    if full:
        return (
            f"Writing {what} failed: {full}. Free space on the disk of {out.parent} (the shards take about "
            "as much as the images, less when max_side shrinks them), or choose an output_dir on a disk "
            f"with room, and run mrl-prepare-data again; nothing was written at {out}."
        )
    return f"Writing {what} failed ({reason[-500:]}); nothing was written at {out}."


def _write_split(
    split: str,
    items: list[tuple[str, int]],
    staging: Path,
    out: Path,
    tree: Path,
    settings: tuple[int | None, int, str],
    chunk_bytes: str,
    workers: int,
    progress: bool,
) -> None:
    """One split's shards into the hidden ``staging`` dir; every unreadable image is named at once."""
    max_side, quality, errors_dir = settings
    if progress:
        print(f"mrl-prepare-data: {split}: {len(items)} images -> {out / split}", flush=True)
    inputs = [(path, label, max_side, quality, errors_dir) for path, label in items]
    job = (str(staging / split), inputs, encode_sample, chunk_bytes, workers)
    shown = SplitProgress(split, len(items), progress)
    try:
        run_in_group(write_items, job, shown.update)
    except RuntimeError as err:
        shown.close(done=False)
        raise MRLError(write_failure(str(err), f"the {split} shards", out)) from err
    bad = _bad_files(Path(errors_dir))
    shown.close(done=not bad)
    if bad:
        listing = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MRLError(
            f"{len(bad)} image(s) of {tree / split} cannot be read: {listing}. Fix or remove them "
            f"and run mrl-prepare-data again; nothing was written at {out}."
        )


def _finish(
    staging: Staging,
    out: Path,
    tree: Path,
    classes: list[str],
    listed: dict[str, list[tuple[str, int]]],
    max_side: int | None,
    quality: int,
) -> None:
    """The metadata written, the helper folders removed, the hidden folder renamed to ``out``."""
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classes": classes,
        "splits": {split: len(items) for split, items in listed.items()},
        "max_side": max_side,
        "quality": quality,
        "source": str(tree),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        shutil.rmtree(staging.path / ERRORS_NAME)
        (staging.path / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        staging.publish(out)
    except OSError as err:
        raise MRLError(write_failure(str(err), f"{METADATA_NAME} and renaming the shards", out)) from err


def _notice(text: str) -> None:
    print(f"mrl-prepare-data: {text}", file=sys.stderr, flush=True)


def prepare_shards(
    root: str,
    output_dir: str,
    max_side: int | None = None,
    quality: int = 90,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
    seed: int = 0,
    progress: bool = True,
) -> Path | str:
    """Write the shards of the ImageFolder tree ``root`` to ``output_dir`` (a local folder, or an
    ``s3://`` prefix: :func:`_prepare_to_s3`); return its path (the URI as it is).
    ``progress=False`` silences the progress lines (not the notices about leftovers).

    SIGINT, SIGTERM and SIGHUP raise :class:`~mrl.data.writer_group.Interrupted` here after the writers
    are ended and the hidden folder is removed; the hidden folders of killed runs are removed first
    (:mod:`mrl.data.staging`)."""
    check_settings(
        {
            "root": root,
            "output_dir": output_dir,
            "max_side": max_side,
            "quality": quality,
            "num_workers": num_workers,
            "chunk_bytes": chunk_bytes,
            "seed": seed,
        }
    )
    if object_store.is_s3(output_dir):
        return _prepare_to_s3(
            root, str(output_dir), max_side, quality, num_workers, chunk_bytes, seed, progress
        )
    with signals_interrupt():
        tree, listings = check_root(root)
        out = check_output_dir(output_dir)
        clear_leftovers(out, _notice)
        try:
            staging = claim(out)
        except OSError as err:
            raise MRLError(write_failure(str(err), f"a folder beside {out}", out)) from err
        try:
            (staging.path / ERRORS_NAME).mkdir()
            workers = int(num_workers or os.cpu_count() or 1)
            listed = {split: list(listing.samples) for split, listing in listings.items()}
            for split, items in listed.items():
                random.Random(seed).shuffle(items)
                settings = (max_side, int(quality), str(staging.path / ERRORS_NAME))
                _write_split(split, items, staging.path, out, tree, settings, chunk_bytes, workers, progress)
            _finish(staging, out, tree, list(listings["train"].classes), listed, max_side, int(quality))
        except BaseException as err:
            with signals_deferred():
                staging.discard()
            if isinstance(err, OSError):  # a full disk while writing beside the workers
                raise MRLError(write_failure(str(err), "the shards", out)) from err
            raise
        finally:
            staging.close()
    return out


def _prepare_to_s3(
    root: str,
    output_dir: str,
    max_side: int | None,
    quality: int,
    num_workers: int | None,
    chunk_bytes: str,
    seed: int,
    progress: bool,
) -> str:
    """``output_dir=s3://bucket/prefix``: the prefix must be empty and reachable (checked first, with the
    AWS environment's endpoint and credentials); the shards are written into a temporary folder (under
    ``$TMPDIR``), uploaded with their metadata last, and the folder removed. An interrupted or failed
    upload removes what it uploaded. (The tree is listed and checked by the local preparation, once.)"""
    object_store.check_empty(output_dir)
    with tempfile.TemporaryDirectory(prefix="mrl-shards-") as tmp:
        local = prepare_shards(
            root, str(Path(tmp) / "shards"), max_side, quality, num_workers, chunk_bytes, seed, progress
        )
        if progress:
            print(f"mrl-prepare-data: uploading to {output_dir}", flush=True)
        with signals_interrupt():
            object_store.upload_dir(Path(local), output_dir, last=METADATA_NAME)
    return output_dir
