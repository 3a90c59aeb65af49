"""RoPE cos/sin tables, NeoX rotate-half layout (shared by the attention kernel and reference)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(
    positions: Tensor, dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (L, dim) for integer ``positions`` (L,), possibly negative.

    Frequency i (i < dim/2) is theta^(-2i/dim); the table repeats it for both halves.
    """
    inv_freq = theta ** (
        -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    )
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (L, dim/2)
    ang = torch.cat([ang, ang], dim=-1)  # (L, dim)
    return ang.cos().to(dtype), ang.sin().to(dtype)
