"""``mrl-prepare-data``: an ImageFolder tree -> LitData shards of JPEG bytes and labels (``data=shards``).

Each split (``train``, ``val``, and ``test`` when present) becomes one LitData dataset written by
``litdata.optimize`` in parallel worker processes with its progress bar. Images are stored as they are
when they already are RGB or grey JPEGs within ``max_side``; others are decoded, shrunk so their longer
side is ``max_side`` (the paper's FFCV files: 500 px) and re-encoded as JPEG at ``quality``, so every
stored image decodes with nvJPEG too. The file order is shuffled (seeded) before writing: LitData shuffles
chunks and items within chunks, which mixes classes only if the chunks do.

Nothing is written at ``output_dir`` until every split is complete: the shards are built in a hidden
sibling directory and renamed into place, and an existing non-empty ``output_dir`` is refused.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from mrl.data.shards import FORMAT, FORMAT_VERSION, METADATA_NAME, SPLITS, is_remote
from mrl.errors import MRLError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_split(root: Path, split: str, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image of ``root/split``, labels indexing ``classes`` (train's)."""
    folder = root / split
    index = {name: i for i, name in enumerate(classes)}
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = [name for name in found if name not in index]
    if unknown:
        raise MRLError(
            f"{folder} has class folders that train/ lacks ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}): every split's classes must be train's."
        )
    items = []
    for name in found:
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((str(path), index[name]))
    return items


def encode_image(data: bytes, max_side: int | None, quality: int) -> bytes:
    """``data`` unchanged when it is a readable RGB or grey JPEG no larger than ``max_side``; otherwise
    decoded, shrunk to ``max_side`` on its longer side and encoded as an RGB JPEG at ``quality``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fits = max_side is None or max(image.size) <= max_side
        # Decoded in full even when stored unchanged: a truncated JPEG opens (only its header is read)
        # and would otherwise reach the shards and stop a training epoch; load() raises on it.
        image.load()
        if image.format == "JPEG" and image.mode in ("RGB", "L") and fits:
            return data
        image = image.convert("RGB")
        if not fits:
            scale = max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=int(quality))
        return out.getvalue()


def encode_sample(item: tuple[str, int, int | None, int, str]) -> dict[str, Any]:
    """``litdata.optimize``'s per-item function (runs in its worker processes).

    An unreadable image is noted in ``errors_dir`` and stored as an empty placeholder instead of raising:
    a worker that raises is terminated by LitData, and the helper processes it started are left behind
    (they keep a terminal or a test's output open). The split then fails as a whole, naming every bad
    file, and the placeholders never leave the partial directory.
    """
    path, label, max_side, quality, errors_dir = item
    try:
        data = Path(path).read_bytes()
        return {"image": encode_image(data, max_side, quality), "label": int(label)}
    except Exception as err:  # PIL raises several types for unreadable files
        from PIL import UnidentifiedImageError

        reason = (
            "not an image file" if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}"
        )
        with open(Path(errors_dir) / f"{os.getpid()}.txt", "a") as f:
            f.write(f"{path} ({reason})\n")
        return {"image": b"", "label": -1}


def _bad_files(errors_dir: Path) -> list[str]:
    return sorted(line for f in errors_dir.glob("*.txt") for line in f.read_text().splitlines() if line)


def check_output_dir(output_dir: str) -> Path:
    if is_remote(output_dir):
        raise MRLError(
            f"output_dir={output_dir}: mrl-prepare-data writes to a local folder. Prepare the shards "
            "locally, copy the folder to the object store (e.g. `aws s3 sync <dir> s3://bucket/dir`), then "
            "train with data.input_dir=s3://bucket/dir."
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


def check_root(root: str) -> tuple[Path, list[str]]:
    path = Path(root).expanduser().absolute()
    missing = [s for s in ("train", "val") if not (path / s).is_dir()]
    if missing:
        raise MRLError(
            f"root={path} has no {' or '.join(f'{s}/' for s in missing)} folder. mrl-prepare-data reads an "
            "ImageFolder tree: root/train/<class>/<image>, root/val/<class>/<image> and optionally "
            "root/test/<class>/<image>."
        )
    classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
    if not classes:
        raise MRLError(f"{path / 'train'} holds no class folders (root/train/<class>/<image>).")
    return path, classes


def _write_split(
    split: str,
    items: list[tuple[str, int]],
    partial: Path,
    out: Path,
    tree: Path,
    settings: tuple[int | None, int, str],
    chunk_bytes: str,
    workers: int,
    progress: bool,
) -> None:
    """One split's shards into the hidden ``partial`` dir; every unreadable image is named at once."""
    from litdata import optimize

    max_side, quality, errors_dir = settings
    if progress:
        print(f"mrl-prepare-data: {split}: {len(items)} images -> {out / split}", flush=True)
    try:
        optimize(
            fn=encode_sample,
            inputs=[(path, label, max_side, quality, errors_dir) for path, label in items],
            output_dir=str(partial / split),
            chunk_bytes=chunk_bytes,
            num_workers=min(workers, len(items)),
            reorder_files=False,
            keep_data_ordered=True,
            mode="overwrite",
            verbose=progress,
            # fork: workers start in milliseconds instead of re-importing torch (spawn, seconds per
            # split); nothing here has started threads that a fork would copy mid-use
            start_method="fork",
        )
    except RuntimeError as err:
        raise MRLError(
            f"Writing the {split} shards failed ({' '.join(str(err).split())[-500:]}); nothing was "
            f"written at {out}."
        ) from err
    bad = _bad_files(Path(errors_dir))
    if bad:
        listing = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MRLError(
            f"{len(bad)} image(s) of {tree / split} cannot be read: {listing}. Fix or remove them "
            f"and run mrl-prepare-data again; nothing was written at {out}."
        )


def prepare_shards(
    root: str,
    output_dir: str,
    max_side: int | None = None,
    quality: int = 90,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the shards of the ImageFolder tree ``root`` to ``output_dir``; return its path.
    ``progress=False`` silences LitData's progress bar and messages."""
    if max_side is not None and int(max_side) < 8:
        raise MRLError(
            f"max_side={max_side} is too small: give the longer side's pixels (e.g. 500), or null."
        )
    if not 1 <= int(quality) <= 100:
        raise MRLError(f"quality={quality}: JPEG quality must be between 1 and 100.")
    tree, classes = check_root(root)
    out = check_output_dir(output_dir)
    splits = [s for s in SPLITS if (tree / s).is_dir()]
    listed = {split: list_split(tree, split, classes) for split in splits}
    for split, items in listed.items():
        if not items:
            raise MRLError(f"{tree / split} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    workers = int(num_workers or os.cpu_count() or 1)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    errors_dir = partial / ".errors"
    errors_dir.mkdir(parents=True)
    try:
        for split, items in listed.items():
            random.Random(seed).shuffle(items)
            settings = (max_side, int(quality), str(errors_dir))
            _write_split(split, items, partial, out, tree, settings, chunk_bytes, workers, progress)
        shutil.rmtree(errors_dir)
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "classes": classes,
            "splits": {split: len(items) for split, items in listed.items()},
            "max_side": max_side,
            "quality": int(quality),
            "source": str(tree),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (partial / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs it gone on some file systems
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
