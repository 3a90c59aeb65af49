"""Image decoding and normalisation shared by training, evaluation and captioning."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file

log = logging.getLogger("fastcap.data")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _fit(img: Tensor, size: int) -> Tensor:
    """Decoded (3, H, W) -> uint8 (3, size, size): shorter side to ``size``, centre crop."""
    if img.dtype != torch.uint8:
        img = TF.to_dtype(img, torch.uint8, scale=True)
    if img.shape[-2:] != (size, size):
        img = TF.resize(img, size, antialias=True)
        img = TF.center_crop(img, [size, size])
    return img.contiguous()


def read_image(path: str | Path, size: int) -> Tensor:
    """Decode any image file (RGB, gray, RGBA, palette, 16-bit) to uint8 (3, size, size).

    Resized (shorter side to ``size``, antialiased) and centre-cropped. Raises on a file that
    cannot be decoded.
    """
    return _fit(decode_image(read_file(str(path)), mode=ImageReadMode.RGB), size)


def decode_bytes(data: bytes, size: int) -> Tensor:
    """Encoded image bytes -> uint8 (3, size, size), as :func:`read_image`."""
    if not data:
        raise ValueError("zero-byte image")
    img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    return _fit(img, size)


def normalize(u8: Tensor) -> Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, S, S), ImageNet mean/std, channels-last memory."""
    x = (u8.float() / 255.0 - MEAN.to(u8.device)) / STD.to(u8.device)
    return x.contiguous(memory_format=torch.channels_last)
