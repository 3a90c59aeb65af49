"""Photos are read upright: the EXIF orientation tag (a phone stores a portrait photo sideways,
tagged 6 or 8) is applied by the one decoder every reader and the server share, as PIL's
``ImageOps.exif_transpose`` and browsers show the photo. Before, the tag was ignored: a portrait
photo was captioned lying on its side (checked: these tests fail with it ignored)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastcap.data.images import decode_bytes, decode_rgb, probe

H, W = 12, 20  # a landscape frame: a turn by a quarter makes it portrait


def _stored(fmt: str, orientation: int) -> tuple[bytes, np.ndarray]:
    """An image as a camera stores it, tagged ``orientation``; and how it should look."""
    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    if fmt == "JPEG":  # smooth, so that the decoders' rounding stays small
        pixels = np.repeat(np.repeat(pixels[::4, ::4], 4, 0), 4, 1)[:H, :W]
    im = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    return data, upright


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_is_read_upright(orientation):
    """PNG (PIL's path): pixel for pixel what exif_transpose shows."""
    data, upright = _stored("PNG", orientation)
    got = decode_rgb(data).permute(1, 2, 0).numpy()
    assert got.shape == upright.shape
    assert np.array_equal(got, upright)
    assert probe(data).width * probe(data).height == H * W  # the limits see the same pixels


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_is_read_upright(orientation):
    """JPEG (torchvision's decoder, which ignores the tag unless asked): same shape and, up to
    the two decoders' rounding, the same pixels as PIL's exif_transpose."""
    data, upright = _stored("JPEG", orientation)
    got = decode_rgb(data).permute(1, 2, 0).numpy().astype(np.int16)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 3.0


def test_every_reader_gets_the_upright_photo():
    """decode_bytes (the training readers', fastcap-caption's) fits the upright frame: a
    portrait photo's centre square, not the sideways one's."""
    data, upright = _stored("PNG", 6)
    want = decode_bytes(_png(upright), 8)
    assert torch.equal(decode_bytes(data, 8), want)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_a_broken_or_odd_tag_leaves_the_frame_as_stored():
    """Orientation 0 or 9 (outside EXIF's 1-8) is ignored, not an error."""
    for bad in (0, 9):
        data, _ = _stored("PNG", 1)
        im = Image.open(io.BytesIO(data))
        exif = Image.Exif()
        exif[0x0112] = bad
        buf = io.BytesIO()
        im.save(buf, format="PNG", exif=exif.tobytes())
        assert decode_rgb(buf.getvalue()).shape == (3, H, W)
