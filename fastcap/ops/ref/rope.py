"""Rotary position embedding, NeoX rotate-half layout (shared by the reference and tests).

The cos/sin tables come from :func:`fastcap.common.rope.rope_cos_sin`, which the Triton kernel
uses too.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from fastcap.common.rope import rope_cos_sin

__all__ = ["apply_rope", "rope_cos_sin", "rope_range"]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., L, D) by position: x * cos + rotate_half(x) * sin, in at least fp32."""
    half = x.shape[-1] // 2
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


@lru_cache(maxsize=64)
def _table(n: int, dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    # outside inference mode: a table first built while decoding is reused by training steps
    with torch.inference_mode(False):
        return rope_cos_sin(torch.arange(n, device=device), dim, theta)


def rope_range(
    start: int, stop: int, dim: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos/sin (stop - start, dim) fp32 for positions start..stop-1 (start may be negative);
    tables for non-negative ranges are cached, so decoding does not rebuild them each step."""
    if start < 0:
        return rope_cos_sin(torch.arange(start, stop, device=device), dim, theta)
    n = 1 << max(stop - 1, 1).bit_length()  # cache by power-of-two length
    cos, sin = _table(n, dim, float(theta), torch.device(device))
    return cos[start:stop], sin[start:stop]
