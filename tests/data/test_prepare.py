"""mrl-prepare-data: every image mode is stored at the scale the loaders read it; every setting is judged
before anything is read or written."""

from __future__ import annotations

import io

import numpy as np
import pytest
from litdata import StreamingDataset
from PIL import Image

from mrl.data.prepare import prepare_shards


def stored(shards, split: str) -> dict[int, list[np.ndarray]]:
    """The stored images of a split, decoded by PIL as grey, by label."""
    dataset = StreamingDataset(str(shards / split))
    out: dict[int, list[np.ndarray]] = {}
    for item in (dataset[i] for i in range(len(dataset))):
        grey = np.asarray(Image.open(io.BytesIO(item["image"])).convert("L"), dtype=np.int16)
        out.setdefault(int(item["label"]), []).append(grey)
    return out


def test_sixteen_bit_greys_are_stored_scaled_not_clipped_white(tmp_path):
    """convert("RGB") clipped 16-bit samples above 255: the shards held white images, and a model
    trained on them ran at chance while data=imagefolder on the same tree learned."""
    tree = tmp_path / "tree"
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # a ramp over every brightness
    pictures = {0: grey, 1: grey[:, ::-1].copy()}
    for split in ("train", "val"):
        for label, picture in pictures.items():
            (tree / split / f"c{label}").mkdir(parents=True)
            Image.fromarray(picture.astype(np.uint16) * 257).save(tree / split / f"c{label}" / "a.png")
    out = prepare_shards(str(tree), str(tmp_path / "out"), quality=100, num_workers=1, progress=False)
    for label, (image,) in stored(out, "val").items():
        error = np.abs(image - pictures[label].astype(np.int16))
        assert error.mean() < 1.5 and error.max() <= 8, (label, error.mean(), error.max())


BAD_SETTINGS = [
    ("max_side=abc", "max_side='abc' is not valid", "max_side=500"),
    ("max_side=4", "max_side=4 is not valid", "integer >= 8"),
    ("quality=high", "quality='high' is not valid", "quality=90"),
    ("quality=0", "quality=0 is not valid", "from 1 to 100"),
    ("num_workers=0", "num_workers=0 is not valid", "positive integer or null"),
    ("chunk_bytes=lots", "chunk_bytes='lots' is not valid", "chunk_bytes=64MB"),
    ("seed=x", "seed='x' is not valid", "an integer"),
    ("+max_sid=500", "max_sid is not an mrl-prepare-data setting", "max_side"),
]


@pytest.mark.parametrize(("setting", "message", "advice"), BAD_SETTINGS, ids=[s[0] for s in BAD_SETTINGS])
def test_bad_settings_are_refused_before_anything_is_read(run_main, tmp_path, setting, message, advice):
    root = tmp_path / "tree"
    (root / "train" / "a").mkdir(parents=True)  # never read: no val/, no images
    result = run_main("mrl-prepare-data", f"root={root}", f"output_dir={tmp_path / 'out'}", setting)
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-2000:]
    assert message in result.output and advice in result.output, result.output[-2000:]
    assert not (tmp_path / "out").exists()
