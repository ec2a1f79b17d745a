"""Image files -> ``uint8 (C, H, W)`` with a model's channels: the one place where images are decoded and
converted, for every path that reads them (image folders, shards, robustness sets, ``mrl-prepare-data``
and ``mrl.load``'s :meth:`~mrl.deploy.MatryoshkaModel.preprocess`).

Two decoders give one result:

- the common files, JPEGs of 1 or 3 components and 8-bit grey or RGB PNGs, decode with torchvision
  (libjpeg-turbo, libpng; nvJPEG for ``decode=gpu``), the fast path of large data sets;
- every other file PIL opens (16-bit PNG, TIFF and PGM, palette, alpha, 1-bit, CMYK, BMP, PPM, WebP ...)
  decodes with PIL, and :func:`to_8bit` turns its mode into 8-bit grey or RGB.

For the files of the fast path both decoders give the same pixels, so what reaches a model depends on the
file, never on the path. :func:`match_channels` then gives the model's channels: grey repeated to RGB, RGB
to PIL's luminance (``convert("L")``'s integer formula), alpha dropped, as PIL's ``convert`` does.

16-bit samples keep their high byte (``x >> 8``: 0-65535 onto 0-255 in 256 equal steps). That is what
PIL itself does when it opens a 16-bit RGB(A) PNG or TIFF (it has no 16-bit colour mode) and what
torchvision's ``to_dtype(uint16 -> uint8, scale=True)`` does, so 16-bit grey and 16-bit colour files get
one scale. PIL's own ``convert`` of a 16-bit grey image (mode ``I;16``) clips every value above 255 to
white instead, and a per-image range (min-max) would give each image its own brightness scale. Files of
32-bit integer or floating-point samples (PIL modes ``I`` and ``F`` from TIFF) have no agreed 8-bit scale
and are refused, by name.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from mrl.errors import MRLError

# PIL modes of 16-bit grey samples; mode "I" holds them too when the file is a 16-bit PNG or PGM
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")
GREY_MODES = ("1", "L", "LA", "La")
# the formats and modes the fast path decodes, and the sentence that says what to do with the others
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
CONVERT_ADVICE = "convert it to an 8- or 16-bit PNG or to a JPEG"


class ImageDecodeError(RuntimeError):
    """A file that does not decode (truncated, corrupt). A RuntimeError, as torchvision's decoders
    raise, so every reader handles both alike."""


class UnsupportedImage(ImageDecodeError):
    """A file that is no image format PIL or torchvision reads, or whose samples have no 8-bit scale."""


def as_uint8_tensor(data: torch.Tensor | bytes | bytearray | memoryview | np.ndarray) -> torch.Tensor:
    """Encoded bytes as the 1-d ``uint8`` tensor torchvision's decoders take."""
    if isinstance(data, bytes | bytearray | memoryview):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    return data


def _jpeg_components(buf: Any) -> int | None:
    """The number of colour components in a JPEG's frame header (its SOF segment), None if not found."""
    i, n = 2, len(buf)
    while i + 9 < n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return int(buf[i + 9])
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        else:
            i += 2 + ((buf[i + 2] << 8) | buf[i + 3])
    return None


def fast_channels(data: torch.Tensor | bytes | np.ndarray) -> int | None:
    """1 or 3 when torchvision's decoders read the file as PIL would (a JPEG of 1 or 3 components, an
    8-bit grey or RGB PNG): its channels; None when it goes through PIL. Reads the header only."""
    buf = memoryview(data.numpy()) if isinstance(data, torch.Tensor) else memoryview(data)
    if bytes(buf[:8]) == PNG_SIGNATURE and len(buf) >= 26 and bytes(buf[12:16]) == b"IHDR":
        depth, colour = buf[24], buf[25]
        return {0: 1, 2: 3}.get(colour) if depth == 8 else None
    if bytes(buf[:2]) == JPEG_MAGIC:
        components = _jpeg_components(buf)
        return components if components in (1, 3) else None
    return None


def is_fast_jpeg(data: torch.Tensor | bytes | np.ndarray) -> bool:
    """A JPEG that nvJPEG decodes as PIL would (1 or 3 components: no CMYK): ``decode=gpu`` takes it."""
    buf = memoryview(data.numpy()) if isinstance(data, torch.Tensor) else memoryview(data)
    return bytes(buf[:2]) == JPEG_MAGIC and fast_channels(data) is not None


def to_8bit(image: Any) -> Any:
    """A PIL image of any mode as an 8-bit grey (``L``) or RGB image, with the scale of the module's
    docstring; :class:`UnsupportedImage` for samples without an 8-bit scale."""
    from PIL import Image

    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format in SIXTEEN_BIT_FORMATS):
        samples = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray((samples >> 8).astype(np.uint8), "L")
    if mode in ("I", "F") or mode.startswith("I;"):
        kind = {"F": "floating-point", "I": "32-bit integer"}.get(mode, "signed or 32-bit integer")
        raise UnsupportedImage(
            f"it holds {kind} samples (PIL mode {mode}), which have no agreed scale of 8-bit grey levels: "
            f"{CONVERT_ADVICE}"
        )
    try:
        return image.convert("L" if mode in GREY_MODES else "RGB")
    except ValueError as err:  # a mode PIL cannot convert
        raise UnsupportedImage(
            f"PIL cannot convert its mode {mode} to RGB ({err}): {CONVERT_ADVICE}"
        ) from err


def match_channels(image: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``uint8 (C, H, W)`` (grey, grey + alpha, RGB or RGBA) -> ``uint8 (in_chans, H, W)`` as PIL's
    ``convert`` does: alpha dropped, grey repeated to RGB, RGB to luminance ``L = (19595 R + 38470 G +
    7471 B + 2^15) >> 16`` (PIL's integer ITU-R 601-2 formula, exactly)."""
    channels = image.shape[0]
    if channels in (2, 4):
        image = image[: channels - 1]
        channels -= 1
    if channels == in_chans:
        return image
    if in_chans == 3 and channels == 1:
        return image.repeat(3, 1, 1)
    if in_chans == 1 and channels == 3:
        r, g, b = image.to(torch.int32).unbind(0)
        return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).to(torch.uint8).unsqueeze(0)
    raise MRLError(
        f"Images are read as grey or RGB images (1 or 3 channels), not {in_chans}; got one with {channels}."
    )


def pil_channels(image: Any, in_chans: int) -> torch.Tensor:
    """A PIL image -> ``uint8 (in_chans, H, W)``: :func:`to_8bit`, then :func:`match_channels`."""
    array = np.asarray(to_8bit(image))
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return match_channels(tensor, in_chans)


def open_image(data: bytes) -> Any:
    """The PIL image of encoded ``data``, decoded in full (a truncated file fails here, not later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as err:
        raise UnsupportedImage(
            "Unsupported image file: neither torchvision nor PIL reads its format (another kind of file, "
            f"or a format such as HEIC or AVIF); {CONVERT_ADVICE}"
        ) from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError ... on broken files
        raise ImageDecodeError(f"{type(err).__name__}: {' '.join(str(err).split())}") from err
    return image


def decode_channels(data: torch.Tensor | bytes | np.ndarray, in_chans: int) -> torch.Tensor:
    """Encoded image bytes -> ``uint8 (in_chans, H, W)``, the same pixels whichever decoder reads them."""
    if in_chans not in (1, 3):
        raise MRLError(f"Image files are read as grey or RGB images (1 or 3 channels), not {in_chans}.")
    tensor = as_uint8_tensor(data)
    native = fast_channels(tensor)
    if native is not None:
        image = decode_image(tensor, mode=ImageReadMode.GRAY if native == 1 else ImageReadMode.RGB)
        if image.dtype == torch.uint8 and image.shape[0] == native:
            return match_channels(image, in_chans)
    return pil_channels(open_image(tensor.numpy().tobytes()), in_chans)


def decode_rgb(data: torch.Tensor | bytes | np.ndarray) -> torch.Tensor:
    """Encoded image bytes -> ``uint8 (3, H, W)`` RGB."""
    return decode_channels(data, 3)


def decode_reason(err: BaseException) -> str:
    """A decode error in a few words: without torchvision's C++ source location and later sentences."""
    text = re.sub(r"^\w+, \S+:\d+, ", "", " ".join(str(err).split()))
    return text.split(". ")[0].rstrip(".") or type(err).__name__
