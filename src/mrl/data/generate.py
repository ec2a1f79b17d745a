"""ImageNet-like JPEG trees made up on the spot: for tests, benchmarks and trying the shard workflow on a
machine without the real data (``python -m mrl.data.generate <root> --classes 10 --train 50``).

Each class has its own smooth colour field, and every image adds mid-frequency texture and pixel
noise to it, so the classes are learnable and the files compress like photographs: at 500x375 and
quality 90 an image takes about 110 KB, as an average ImageNet JPEG does.
"""

from __future__ import annotations

import argparse
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _field(
    rng: np.random.Generator, height: int, width: int, cells: tuple[int, int], scale: float
) -> np.ndarray:
    from PIL import Image

    low = rng.normal(size=(*cells, 3))
    low = (low - low.min()) / max(np.ptp(low), 1e-6) * scale
    image = Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def make_jpeg(label: int, index: int, size: tuple[int, int], quality: int, seed: int) -> bytes:
    """One image of class ``label``: ``size`` is (width, height); a function of its arguments alone."""
    from PIL import Image

    width, height = size
    base = _field(np.random.default_rng((seed, label)), height, width, (6, 8), 255.0)
    rng = np.random.default_rng((seed, label, index))
    texture = _field(rng, height, width, (max(1, height // 4), max(1, width // 4)), 160.0) - 80.0
    pixels = base + texture + rng.normal(0.0, 20.0, size=base.shape)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write(job: tuple[str, int, int, tuple[int, int], int, int]) -> None:
    path, label, index, size, quality, seed = job
    Path(path).write_bytes(make_jpeg(label, index, size, quality, seed))


def write_image_tree(
    root: str | Path,
    classes: int = 10,
    per_class: dict[str, int] | None = None,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Write ``root/<split>/<class>/<n>.jpg`` for each split in ``per_class`` (images per class); every
    fourth image is portrait (``size`` turned). Returns ``root``."""
    root = Path(root)
    per_class = per_class or {"train": 20, "val": 5}
    jobs = []
    for s, (split, count) in enumerate(per_class.items()):
        for label in range(classes):
            folder = root / split / f"class_{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                index = s * 1_000_000 + n
                shape = size if n % 4 else (size[1], size[0])
                jobs.append((str(folder / f"{n:06d}.jpg"), label, index, shape, quality, seed))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write, jobs, chunksize=64))
    else:
        for job in jobs:
            _write(job)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mrl.data.generate",
        description=__doc__.split("\n\n")[0].replace("``", ""),  # the whole first paragraph
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", help="folder the tree is written to: root/train/<class>/, root/val/<class>/")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (class folders)")
    parser.add_argument("--train", type=int, default=50, help="training images per class")
    parser.add_argument("--val", type=int, default=10, help="validation images per class")
    parser.add_argument(
        "--width",
        type=int,
        default=500,
        help="image width in pixels (every fourth image is portrait: width and height swapped)",
    )
    parser.add_argument("--height", type=int, default=375, help="image height in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the images: the same seed, the same files"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes the images are written by")
    args = parser.parse_args(argv)
    root = write_image_tree(
        args.root,
        args.classes,
        {"train": args.train, "val": args.val},
        (args.width, args.height),
        args.quality,
        seed=args.seed,
        workers=args.workers,
    )
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
