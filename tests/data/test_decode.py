"""Image files of every mode PIL opens -> the same uint8 pixels of the model's channels, whichever decoder
(torchvision or PIL) reads them; 16-bit samples keep their high byte; what has no 8-bit scale is refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mrl.data.decode import (
    UnsupportedImage,
    decode_channels,
    fast_channels,
    is_fast_jpeg,
    match_channels,
    pil_channels,
)
from mrl.data.generate import make_jpeg
from mrl.errors import MRLError

RNG = np.random.default_rng(0)
SIXTEEN = RNG.integers(0, 65536, (10, 20), dtype=np.uint16)
RGB = RNG.integers(0, 256, (10, 20, 3), dtype=np.uint8)
RGBA = np.dstack([RGB, RGB[..., :1]])


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def grey_as(grey: np.ndarray, in_chans: int) -> torch.Tensor:
    """A plain reference: grey (H, W) uint8 as (in_chans, H, W)."""
    return torch.from_numpy(np.repeat(grey[None], in_chans, axis=0))


def pil_reference(data: bytes, in_chans: int) -> torch.Tensor:
    """What PIL's own convert gives for an 8-bit file: the model's channels as (C, H, W)."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("L" if in_chans == 1 else "RGB"))
    return torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1)


SIXTEEN_BIT = {
    "png I;16": encoded(Image.fromarray(SIXTEEN), "PNG"),
    "tiff I;16": encoded(Image.fromarray(SIXTEEN), "TIFF"),
    "tiff I;16B": encoded(Image.frombytes("I;16B", (20, 10), SIXTEEN.astype(">u2").tobytes()), "TIFF"),
    "pgm 16-bit": encoded(Image.fromarray(SIXTEEN), "PPM"),
}
EIGHT_BIT = {
    "jpeg RGB": encoded(Image.fromarray(RGB), "JPEG"),
    "jpeg L": encoded(Image.fromarray(RGB[..., 0]), "JPEG"),
    "jpeg CMYK": encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG"),
    "png RGB": encoded(Image.fromarray(RGB), "PNG"),
    "png L": encoded(Image.fromarray(RGB[..., 0]), "PNG"),
    "png 1": encoded(Image.fromarray(RGB[..., 0]).convert("1"), "PNG"),
    "png P": encoded(Image.fromarray(RGB).convert("P"), "PNG"),
    "png LA": encoded(Image.fromarray(RGBA[..., :2].copy(), "LA"), "PNG"),
    "png RGBA": encoded(Image.fromarray(RGBA, "RGBA"), "PNG"),
    "bmp RGB": encoded(Image.fromarray(RGB), "BMP"),
    "ppm RGB": encoded(Image.fromarray(RGB), "PPM"),
    "tiff RGB": encoded(Image.fromarray(RGB), "TIFF"),
    "webp RGBA": encoded(Image.fromarray(RGBA, "RGBA"), "WEBP", lossless=True),
}


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("name", list(SIXTEEN_BIT))
def test_sixteen_bit_grey_keeps_its_high_byte(name, in_chans):
    image = decode_channels(SIXTEEN_BIT[name], in_chans)
    assert image.dtype == torch.uint8
    assert torch.equal(image, grey_as((SIXTEEN >> 8).astype(np.uint8), in_chans))


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("name", list(EIGHT_BIT))
def test_eight_bit_modes_give_pils_conversion(name, in_chans):
    assert torch.equal(decode_channels(EIGHT_BIT[name], in_chans), pil_reference(EIGHT_BIT[name], in_chans))


def png_rgb16(samples: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one): signature, IHDR, one IDAT of unfiltered rows, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = samples.shape
    rows = b"".join(b"\x00" + samples[i].astype(">u2").tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_colour_and_grey_files_get_one_scale():
    """PIL opens a 16-bit RGB PNG as 8-bit RGB, the high bytes; torchvision decodes it to uint16: both
    paths, and the 16-bit grey file of the same samples, give the high bytes."""
    samples = RNG.integers(0, 65536, (10, 20, 3), dtype=np.uint16)
    high = torch.from_numpy((samples >> 8).astype(np.uint8)).permute(2, 0, 1)
    data = png_rgb16(samples)
    assert torch.equal(decode_channels(data, 3), high)
    assert torch.equal(pil_reference(data, 3), high)
    assert torch.equal(
        decode_channels(encoded(Image.fromarray(samples[..., 0].copy()), "PNG"), 3)[0], high[0]
    )


def test_the_fast_path_takes_only_what_it_reads_as_pil_does():
    assert fast_channels(EIGHT_BIT["jpeg RGB"]) == 3 and fast_channels(EIGHT_BIT["jpeg L"]) == 1
    assert fast_channels(EIGHT_BIT["png RGB"]) == 3 and fast_channels(EIGHT_BIT["png L"]) == 1
    for name in ("jpeg CMYK", "png P", "png RGBA", "png 1", "bmp RGB", "webp RGBA"):
        assert fast_channels(EIGHT_BIT[name]) is None, name
    assert fast_channels(SIXTEEN_BIT["png I;16"]) is None
    # a JPEG with a large EXIF segment before its frame header, and as a tensor (the loaders' bytes)
    jpeg = make_jpeg(0, 0, (40, 30), 90, 0)
    exif = b"\xff\xe1" + (2 + 3000).to_bytes(2, "big") + bytes(3000)
    with_exif = jpeg[:2] + exif + jpeg[2:]
    assert fast_channels(torch.frombuffer(bytearray(with_exif), dtype=torch.uint8)) == 3
    assert is_fast_jpeg(with_exif) and not is_fast_jpeg(EIGHT_BIT["jpeg CMYK"])
    assert not is_fast_jpeg(EIGHT_BIT["png RGB"])


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (SIXTEEN.astype(np.int32), "32-bit integer samples"),
        (SIXTEEN.astype(np.float32) / 65535, "floating-point samples"),
    ],
)
def test_samples_without_an_8bit_scale_are_refused(array, words):
    data = encoded(Image.fromarray(array), "TIFF")
    with pytest.raises(UnsupportedImage, match=words):
        decode_channels(data, 3)


def test_files_no_decoder_reads_are_unsupported_not_corrupt():
    with pytest.raises(UnsupportedImage, match="Unsupported image file"):
        decode_channels(b"these are notes, not an image", 3)


def test_channels_match_pils_convert():
    rgba = torch.from_numpy(RGBA).permute(2, 0, 1)
    grey = torch.from_numpy(np.asarray(Image.fromarray(RGB).convert("L")).copy())
    assert torch.equal(match_channels(rgba, 1)[0], grey)  # alpha dropped, PIL's luminance exactly
    assert torch.equal(match_channels(rgba, 3), rgba[:3])
    assert torch.equal(match_channels(grey[None], 3), grey.expand(3, -1, -1))
    assert torch.equal(
        pil_channels(Image.fromarray(RGB).convert("P"), 3), pil_reference(EIGHT_BIT["png P"], 3)
    )
    with pytest.raises(MRLError, match="1 or 3 channels"):
        match_channels(rgba, 2)
