"""mrl.load's preprocess: raw images of any PIL mode reach the model as the data loaders read the same
files (16-bit samples scaled to 8 bits, not clipped white)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mrl.deploy.preprocessing import image_transform, to_batch
from mrl.errors import MRLError
from mrl.models.spec import TIMM, UINT8, Preprocessing

GREY = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
TIMM_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
KINDS = {
    TIMM: Preprocessing(TIMM, 3, 32, (0.5,) * 3, (0.25,) * 3, TIMM_CONFIG),
    UINT8: Preprocessing(UINT8, 1, 28, (0.5,), (0.25,)),
}


def batch(images, kind: str) -> torch.Tensor:
    preprocessing = KINDS[kind]
    return to_batch(images, preprocessing, lambda: image_transform(preprocessing))


def sixteen_bit_png() -> Image.Image:
    out = io.BytesIO()
    Image.fromarray(GREY.astype(np.uint16) * 257).save(out, "PNG")
    return Image.open(io.BytesIO(out.getvalue()))


@pytest.mark.parametrize("kind", [TIMM, UINT8])
def test_sixteen_bit_images_give_the_inputs_of_their_8bit_twin(kind):
    expected = batch(Image.fromarray(GREY), kind)
    opened = sixteen_bit_png()
    assert opened.mode == "I;16"
    torch.testing.assert_close(batch(opened, kind), expected, rtol=0, atol=0)
    torch.testing.assert_close(batch(GREY.astype(np.uint16) * 257, kind), expected, rtol=0, atol=0)
    torch.testing.assert_close(batch([opened, Image.fromarray(GREY)], kind), expected.repeat(2, 1, 1, 1))


def test_images_without_an_8bit_scale_are_refused():
    with pytest.raises(MRLError, match=r"floating-point samples.*convert it to"):
        batch(Image.fromarray(GREY.astype(np.float32) / 255), TIMM)
    with pytest.raises(MRLError, match=r"uint8 .* or uint16"):
        batch(GREY.astype(np.float32), UINT8)
