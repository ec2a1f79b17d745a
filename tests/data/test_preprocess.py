"""The uint8 image pipeline against timm's PIL transforms: same crop parameters, same pixels."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from mrl.data.decode import decode_rgb
from mrl.data.generate import make_jpeg
from mrl.data.preprocess import (
    BatchTransform,
    CropSpec,
    ImageTransform,
    check_augment,
    eval_crop,
    random_resized_crop_params,
    sample_rng,
    train_crop,
)
from mrl.errors import MRLError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# One grey level, in the units of normalised images.
LEVEL = 1 / 255 / min(STD)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """A landscape, a portrait and a square ImageNet-like JPEG."""
    return [
        make_jpeg(1, 0, (500, 375), 90, 0),
        make_jpeg(2, 1, (375, 500), 90, 0),
        make_jpeg(3, 2, (96, 96), 90, 0),
    ]


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def as_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("shape", [(500, 375), (375, 500), (1000, 50), (50, 1000), (64, 64)])
def test_crop_parameters_are_timms_draws(shape):
    """Same random numbers, same crop as timm's RandomResizedCropAndInterpolation (fallback included)."""
    image = Image.new("RGB", shape)
    for seed in range(300):
        random.seed(seed)
        expected = RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        got = random_resized_crop_params(shape[1], shape[0], (0.08, 1.0), (3 / 4, 4 / 3), random.Random(seed))
        assert got == expected, seed


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_training_crop_matches_timm_pixels(jpegs, interpolation):
    spec = CropSpec(size=224, interpolation=interpolation)
    timm_crop = RandomResizedCropAndInterpolation(224, interpolation=interpolation)
    for data in jpegs:
        image = pil(data)
        for params in [(0, 0, image.height, image.width), (10, 30, 80, 60), (5, 7, 90, 95)]:
            timm_crop.get_params = lambda *_, p=params: p
            expected = as_uint8(timm_crop(image)).int()
            got = train_crop(decode_rgb(data), params, spec).int()
            assert got.shape == expected.shape == (3, 224, 224)
            diff = (got - expected).abs()
            assert diff.max() <= 2 and diff.float().mean() < 0.25, (params, diff.max(), diff.float().mean())


@pytest.mark.parametrize(
    ("interpolation", "crop_pct", "crop_mode", "size"),
    [("bicubic", 0.95, "center", 224), ("bilinear", 0.875, "center", 160), ("bicubic", 0.9, "squash", 224)],
)
def test_evaluation_matches_timms_eval_transform(jpegs, interpolation, crop_pct, crop_mode, size):
    """Decode + resize + center crop + normalise against timm's full eval transform (PIL, float)."""
    config = {
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "mean": MEAN,
        "std": STD,
    }
    timm_eval = create_transform(input_size=(3, size, size), is_training=False, **config)
    spec = CropSpec.from_data_config(config, size)
    batch = BatchTransform(MEAN, STD)
    for data in jpegs:
        expected = timm_eval(pil(data))
        got = batch(eval_crop(decode_rgb(data), spec).unsqueeze(0), train=False)[0]
        assert got.shape == expected.shape
        diff = (got - expected).abs()
        assert diff.max() <= 2 * LEVEL + 1e-6 and diff.mean() < 0.25 * LEVEL


def test_training_pipeline_with_flip_matches_timm(jpegs):
    """The whole training path (worker crop, device flip and normalisation) against timm's training
    transform with the same crop and a certain flip, colour jitter off."""
    data = jpegs[0]
    timm_train = create_transform(
        224, is_training=True, interpolation="bicubic", hflip=1.0, color_jitter=None
    )
    crop = timm_train.transforms[0]
    crop.get_params = lambda *_: (20, 40, 300, 280)
    expected = timm_train(pil(data))
    x = train_crop(decode_rgb(data), (20, 40, 300, 280), CropSpec(224, "bicubic")).unsqueeze(0)
    got = BatchTransform(MEAN, STD, {"hflip": 1.0})(x, train=True)[0]
    diff = (got - expected).abs()
    assert diff.max() <= 2 * LEVEL + 1e-6 and diff.mean() < 0.25 * LEVEL


def test_training_crops_are_functions_of_the_sample(jpegs):
    transform = ImageTransform(CropSpec(64), train=True)
    first = transform(jpegs[0], sample_rng(0, 1, 5))
    assert torch.equal(first, transform(jpegs[0], sample_rng(0, 1, 5)))
    assert not torch.equal(first, transform(jpegs[0], sample_rng(0, 2, 5)))  # next epoch, new crop
    assert not torch.equal(first, transform(jpegs[0], sample_rng(0, 1, 6)))


def test_timm_auto_augment_runs_on_the_crop_reproducibly(jpegs):
    transform = ImageTransform(CropSpec(64), True, {"auto_augment": "rand-m9-mstd0.5-inc1"}, MEAN)
    state, np_state = random.getstate(), np.random.get_state()[1].copy()
    outs = [transform(jpegs[0], random.Random(seed)) for seed in (1, 1, 2)]
    assert random.getstate() == state, "the process-wide random state must be left as it was"
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert outs[0].dtype == torch.uint8 and outs[0].shape == (3, 64, 64)
    assert torch.equal(outs[0], outs[1])
    plain = ImageTransform(CropSpec(64), True)(jpegs[0], random.Random(1))
    assert not torch.equal(outs[0], plain), "RandAugment changed nothing"
    assert not torch.equal(outs[0], outs[2])


def test_random_erasing_on_the_device_batch():
    x = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    plain = BatchTransform(MEAN, STD)(x, train=True)
    erased = BatchTransform(MEAN, STD, {"re_prob": 1.0})(x, train=True)
    assert torch.equal(
        BatchTransform(MEAN, STD, {"re_prob": 1.0})(x, train=False), BatchTransform(MEAN, STD)(x, train=False)
    )
    assert (erased == 0).any() and not (plain == 0).any()


def test_unknown_augment_key_is_refused():
    with pytest.raises(MRLError, match="auto_agument"):
        check_augment({"auto_agument": "rand-m9"})
    assert check_augment({"re_prob": 0.25}) == {"re_prob": 0.25}


def test_decode_gives_rgb_for_grey_png_and_cmyk():
    for mode, fmt in (("L", "JPEG"), ("RGB", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG")):
        out = io.BytesIO()
        Image.new(mode, (20, 10)).save(out, fmt)
        assert decode_rgb(out.getvalue()).shape == (3, 10, 20), mode


def test_crop_spec_refuses_what_it_cannot_reproduce():
    with pytest.raises(MRLError, match="crop_mode"):
        CropSpec.from_data_config({"crop_mode": "border"}, 224)
    with pytest.raises(MRLError, match="Interpolation"):
        CropSpec.from_data_config({"interpolation": "lanczos"}, 224)
