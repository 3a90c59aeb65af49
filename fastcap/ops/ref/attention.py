"""Reference attention: RoPE, causal (bottom-right aligned) and key padding, through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcap.ops.ref.rope import apply_rope, rope_range


def attention_mask(
    Lq: int, Lk: int, *, causal: bool, kv_lens: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean mask (B or 1, 1, Lq, Lk), True where query i may attend key j; None if no mask."""
    if not causal and kv_lens is None:
        return None
    j = torch.arange(Lk, device=device)
    mask = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)
        mask = mask & (j[None, :] <= i[:, None] + (Lk - Lq))[None, None]
    if kv_lens is not None:
        mask = mask & (j[None, :] < kv_lens.to(device)[:, None])[:, None, None, :]
    return mask


def rotate_qk(q: Tensor, k: Tensor, rope_theta: float) -> tuple[Tensor, Tensor]:
    """Apply RoPE with key j at position j and query i at i + (Lk - Lq)."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    cos_k, sin_k = rope_range(0, Lk, D, rope_theta, q.device)
    cos_q, sin_q = rope_range(Lk - Lq, Lk, D, rope_theta, q.device)
    return apply_rope(q, cos_q, sin_q), apply_rope(k, cos_k, sin_k)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    kv_lens: Tensor | None = None,
    rope_theta: float | None = None,
    scale: float | None = None,
) -> Tensor:
    """See :func:`fastcap.ops.attention`. Rows that see no key return exactly 0."""
    Lq, Lk = q.shape[2], k.shape[2]
    if rope_theta is not None:
        q, k = rotate_qk(q, k, rope_theta)
    mask = attention_mask(Lq, Lk, causal=causal, kv_lens=kv_lens, device=q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    live = mask.any(dim=-1, keepdim=True)  # (B|1, 1, Lq, 1): does the row see any key?
    # A fully masked row would give NaN in softmax: let it see everything, then zero it.
    safe = mask | ~live
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))


def attention_probs(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    kv_lens: Tensor | None = None,
    rope_theta: float | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention probabilities (B, H, Lq, Lk) in fp32, for diagnostics and attention maps.

    Not on the training path; rows that see no key are all zero.
    """
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    if rope_theta is not None:
        q, k = rotate_qk(q, k, rope_theta)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else D**-0.5)
    mask = attention_mask(Lq, Lk, causal=causal, kv_lens=kv_lens, device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)
