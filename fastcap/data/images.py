"""Image decoding shared by training, evaluation, captioning and the server. Readers hand the
model uint8 pixels; it normalises them with its trunk's own statistics (fastcap.model.trunks).

One bounded decoder serves every reader (:class:`~fastcap.data.captionset.CaptionSet`,
:class:`~fastcap.data.stream.StreamSet`, :class:`~fastcap.data.wds.WdsSet`, ``fastcap-caption``,
:mod:`fastcap.api` and ``fastcap-serve``), so what an image may cost is decided in one place:

- the header is read first (PIL, no pixel decoded): an image over ``max_pixels`` (width x
  height of its first frame) is :class:`ImageTooLarge` before any decoding, in microseconds;
- only the first frame of an animated or multi-page image (GIF, APNG, WebP, TIFF) is decoded,
  so a decode allocates one frame: at most :data:`DECODE_BYTES_PER_PIXEL` bytes a pixel;
- the frame is turned upright as its EXIF orientation tag says (:func:`orient`, after the
  decoder's own frame is freed), so every reader and the server see a photo as browsers do;
- :func:`fit` crops the centre square *before* resizing it to the model's size, so the resize
  reads at most min(H, W)^2 pixels and writes size^2, whatever the aspect ratio (a 8000 x 4
  strip costs a 4 x 4 crop, not a 900 MB resize of 224 x 448,000);
- anything that is not an image, or a broken one, is :class:`NotAnImage` (a ValueError) with
  one line saying why; readers count it as a bad record, the server answers 415.

JPEG and WebP go to torchvision's decoders (libjpeg-turbo, libwebp); PNG, GIF and the formats
torchvision lacks (BMP, TIFF, ...) to PIL, which decodes the first frame alone. Not PNG to
torchvision: its ``decode_png`` (0.29) dies of a segmentation fault on a PNG whose IDAT fails
its check (after "libpng error: IDAT: incorrect data check"), found by tests/test_fuzz_images.py;
one such upload would kill the server, one such file a training run.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

log = logging.getLogger("fastcap.data")

READ_MAX_PIXELS = 8192 * 8192
"""The readers' default limit on width x height (64 MPix: any camera's photo); the server's is
its own ``--max-pixels``."""
DECODE_BYTES_PER_PIXEL = 12
"""What decoding one frame allocates at most, per pixel: the decoder's frame (up to 8 bytes, a
16-bit RGBA PNG) and its RGB uint8 copy (3), rounded up. So a decode under ``max_pixels``
allocates at most ``max_pixels * DECODE_BYTES_PER_PIXEL`` bytes (:func:`decode_bytes_limit`)."""
_TORCHVISION = ("JPEG", "WEBP")  # formats whose torchvision decoder reads one frame, safely


class ImageError(ValueError):
    """An image that cannot be used; ``status`` is the HTTP answer the server gives."""

    status = 415


class NotAnImage(ImageError):
    """Not an image, or a broken one (truncated, corrupt, zero bytes)."""


class ImageTooLarge(ImageError):
    """Over the pixel limit, read from the header before decoding."""

    status = 413


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding a pixel."""

    format: str
    width: int
    height: int
    mode: str
    frames: int


def decode_bytes_limit(max_pixels: int) -> int:
    """The most bytes one decode under ``max_pixels`` allocates."""
    return max_pixels * DECODE_BYTES_PER_PIXEL


def _why(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0][:160]
    return first or type(e).__name__


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """PIL's lazy open (header only); NotAnImage / ImageTooLarge (PIL's own bomb check, at
    twice ``Image.MAX_IMAGE_PIXELS``, may fire before ours)."""
    if not data:
        raise NotAnImage("zero-byte file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"over the limit of {max_pixels} pixels ({_why(e)})") from None
    except Image.UnidentifiedImageError:
        raise NotAnImage("not an image (no known image format)") from None
    except Exception as e:  # PIL's answers to a broken header: OSError, SyntaxError, struct...
        raise NotAnImage(f"not an image that can be decoded ({_why(e)})") from None


def probe(data: bytes) -> Header:
    """The header of encoded image bytes; NotAnImage if there is none."""
    with _open(data, 2**62) as im:
        return Header(im.format or "?", *im.size, im.mode, getattr(im, "n_frames", 1))


def _check(w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise NotAnImage(f"{w}x{h}: an image with no pixels")
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} is {w * h} pixels, over the limit of {max_pixels} pixels")


def decode_rgb(data: bytes, *, max_pixels: int = READ_MAX_PIXELS) -> Tensor:
    """Encoded image bytes -> its first frame as uint8 (3, H, W) (a 16-bit image scaled),
    upright: turned as its EXIF orientation tag says (a phone's portrait photo is stored
    sideways with tag 6 or 8), as PIL's ``ImageOps.exif_transpose`` and browsers show it.

    The size is checked from the header first (:class:`ImageTooLarge`); anything unreadable is
    :class:`NotAnImage`. Never decodes more than one frame. The turn runs after the decoder's
    own frame is freed, so it adds one uint8 copy (3 bytes a pixel) to a decode's peak.
    """
    img, orientation = _decode_first_frame(data, max_pixels)
    return orient(img, orientation)


def orient(img: Tensor, orientation: int) -> Tensor:
    """(..., H, W) stored with EXIF orientation ``orientation`` (1-8) -> upright (a copy unless
    1 or unknown): 2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise,
    7 transverse, 8 quarter turn counter-clockwise (PIL's ``exif_transpose`` table)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1).contiguous()
    if orientation == 6:
        return img.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.rot90(1, dims=(-2, -1))
    return img


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (0x0112) of an opened image, 1 if absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block does not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _decode_first_frame(data: bytes, max_pixels: int) -> tuple[Tensor, int]:
    """-> (the first frame as stored, uint8 (3, H, W); its EXIF orientation)."""
    im = _open(data, max_pixels)
    try:
        fmt, (w, h) = im.format, im.size
        _check(w, h, max_pixels)
        turn = _orientation(im)
        if fmt in _TORCHVISION:
            try:
                img = decode_image(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
                )
                return _to_uint8(img[0] if img.ndim == 4 else img), turn
            except RuntimeError:
                pass  # PIL may still read it (a JPEG libjpeg-turbo refuses, ...)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.seek(0)
                im.load()
                rgb = _pil_rgb(im)
        except Exception as e:  # truncated, corrupt: whatever PIL raises
            raise NotAnImage(f"{fmt} image that cannot be decoded ({_why(e)})") from None
        if rgb.shape[:2] != (h, w):  # a header that lied
            raise NotAnImage(f"{fmt} image decodes to {rgb.shape[1]}x{rgb.shape[0]}, not {w}x{h}")
        with warnings.catch_warnings():  # read-only: fit() copies what it keeps
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(rgb).permute(2, 0, 1), turn
    finally:
        im.close()


def _to_uint8(img: Tensor, rows: int = 256) -> Tensor:
    """(3, H, W) of any integer dtype (a 16-bit PNG's uint16) -> uint8, ``rows`` rows at a
    time, so the conversion's float temporaries stay small (whole: 12 bytes a pixel more)."""
    if img.dtype == torch.uint8:
        return img
    out = torch.empty(img.shape, dtype=torch.uint8)
    for r in range(0, img.shape[-2], rows):
        out[:, r : r + rows] = TF.to_dtype(img[:, r : r + rows], torch.uint8, scale=True)
    return out


def _pil_rgb(im: Image.Image) -> np.ndarray:
    """A loaded PIL frame -> (H, W, 3) uint8. 16-bit gray keeps its high byte (PIL's own
    convert() would clip it at 255); an RGB frame is not converted (PIL holds RGB as 4 bytes
    a pixel: convert() would copy it)."""
    if im.mode.startswith("I;16"):
        g = (np.asarray(im) >> 8).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def fit(img: Tensor, size: int) -> Tensor:
    """(3, H, W) uint8 or uint16 -> uint8 (3, size, size): the centre square (side min(H, W)),
    resized to ``size`` (antialiased). The crop comes first, so the resize never reads more
    than min(H, W)^2 pixels or writes more than size^2."""
    h, w = img.shape[-2:]
    s = min(h, w)
    if (h, w) != (s, s):
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        img = img[..., top : top + s, left : left + s]
    img = _to_uint8(img)
    if s != size:
        img = TF.resize(img, [size, size], antialias=True)
    return img.contiguous()


_fit = fit  # the name fastcap.api imports


def decode_bytes(data: bytes, size: int, *, max_pixels: int = READ_MAX_PIXELS) -> Tensor:
    """Encoded image bytes -> uint8 (3, size, size): :func:`decode_rgb`, then :func:`fit`.
    Raises :class:`ImageError` (a ValueError) with one line saying why."""
    return fit(decode_rgb(data, max_pixels=max_pixels), size)


def read_image(path: str | Path, size: int, *, max_pixels: int = READ_MAX_PIXELS) -> Tensor:
    """Decode an image file (RGB, gray, RGBA, palette, CMYK, 16-bit; the first frame of an
    animated one) to uint8 (3, size, size), as :func:`decode_bytes`. Raises on a file that
    cannot be read or decoded (OSError, :class:`ImageError`)."""
    return decode_bytes(Path(path).read_bytes(), size, max_pixels=max_pixels)
