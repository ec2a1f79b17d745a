"""data=imagefolder (and robustness sets, which read files the same way): 8- and 16-bit images of one
picture reach the model as the same pixels, whatever the tree mixes; files mrl does not read are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrl.data.image_folder import ImageFolderDataModule, image_files, list_image_folder
from mrl.errors import MRLError

RESNET_CONFIG = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SPLITS = {"train": 3, "val": 2}


def picture(label: int, index: int) -> np.ndarray:
    """A grey picture (H, W) uint8 of its own, with every grey level from dark to bright."""
    rng = np.random.default_rng((label, index))
    return rng.integers(0, 256, (30, 40), dtype=np.uint8)


def write_tree(root: Path, sixteen_bit) -> Path:
    """Two classes of grey PNGs; ``sixteen_bit(split, index)`` says which are stored with 16-bit samples
    (the 8-bit picture times 257: the same image at 16 bits)."""
    for split, count in SPLITS.items():
        for label in range(2):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                grey = picture(label, index)
                image = grey.astype(np.uint16) * 257 if sixteen_bit(split, index) else grey
                Image.fromarray(image).save(folder / f"{index}.png")
    return root


def datamodule(root: Path, decode: str = "cpu") -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=str(root), img_size=16, batch_size=4, eval_batch_size=8, num_workers=0, decode=decode
    )
    dm.configure_transforms(RESNET_CONFIG)
    dm.setup()
    return dm


def model_inputs(dm: ImageFolderDataModule, loader) -> torch.Tensor:
    return torch.cat([dm.model_inputs(batch)[0] for batch in loader])


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_sixteen_bit_tree_gives_the_model_the_pixels_of_its_8bit_twin(tmp_path, decode):
    """A 16-bit tree used to reach the model unscaled (values up to 65535 divided by 255)."""
    eight = datamodule(write_tree(tmp_path / "eight", lambda split, i: False), decode)
    sixteen = datamodule(write_tree(tmp_path / "sixteen", lambda split, i: True), decode)
    expected = model_inputs(eight, eight.val_dataloader())
    assert expected.abs().max() < 3  # normalised 8-bit pixels
    assert torch.equal(model_inputs(sixteen, sixteen.val_dataloader()), expected)
    # its files as a robustness set: the same inputs again
    as_set = image_files(sixteen, list_image_folder(tmp_path / "sixteen" / "val"))
    assert torch.equal(model_inputs(sixteen, sixteen.loader(as_set)), expected)


def test_a_tree_mixing_8_and_16_bit_pngs_trains_and_evaluates_on_one_scale(tmp_path):
    """Mixed trees used to stop the loader with torch's "Promotion for uint16 ... not supported"."""
    eight = datamodule(write_tree(tmp_path / "eight", lambda split, i: False))
    mixed = datamodule(write_tree(tmp_path / "mixed", lambda split, i: i % 2 == 1))
    assert torch.equal(
        model_inputs(mixed, mixed.val_dataloader()), model_inputs(eight, eight.val_dataloader())
    )
    x, y = next(iter(mixed.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 16, 16) and y.shape == (4,)


@pytest.mark.parametrize(("suffix", "fmt"), [(".bmp", "BMP"), (".tif", "TIFF"), (".ppm", "PPM")])
def test_formats_torchvision_does_not_decode_are_read_as_pngs_are(tmp_path, suffix, fmt):
    """BMP, TIFF and PPM files (listed by ImageFolder) used to fail as "truncated or corrupt"."""
    png = datamodule(write_tree(tmp_path / "png", lambda split, i: False))
    other = write_tree(tmp_path / "other", lambda split, i: False)
    for path in other.rglob("*.png"):
        Image.open(path).save(path.with_suffix(suffix), fmt)
        path.unlink()
    other_dm = datamodule(other)
    assert torch.equal(
        model_inputs(other_dm, other_dm.val_dataloader()), model_inputs(png, png.val_dataloader())
    )


def test_a_file_without_an_8bit_scale_is_named_with_what_to_do(tmp_path):
    root = write_tree(tmp_path / "tree", lambda split, i: False)
    bad = root / "val" / "class_1" / "floats.tif"
    Image.fromarray(np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20)).save(bad)
    dm = datamodule(root)
    with pytest.raises(MRLError) as err:
        model_inputs(dm, dm.val_dataloader())
    message = str(err.value)
    assert str(bad) in message and "floating-point samples" in message and "convert it to" in message
    assert "truncated" not in message
