"""Reference routed-expert FFN, vectorised: sort (token, choice) pairs by expert, pad each
expert's rows into one (E_active, C, d) batch, two batched matmuls, scatter-add back.
No Python loop over tokens or experts; experts with no token are not computed at all."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false


def moe_ffn(x: Tensor, w13: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """See :func:`fastcap.ops.moe_ffn`."""
    T, d = x.shape
    E = w13.shape[0]
    f = w2.shape[1]
    k = topk_ids.shape[1]
    out = torch.zeros_like(x)
    # guard_or_false: T is data-dependent when the caller dropped padding (torch.compile, the
    # fake-CUDA runs); undecidable there, the general path below handles T = 0 shapes too
    if guard_or_false(T == 0):
        return out + 0 * (w13.sum() + w2.sum() + topk_weights.sum()).to(x.dtype)
    flat_ids = topk_ids.reshape(-1).long()  # (T*k,) pair p = t*k + c
    counts = torch.bincount(flat_ids, minlength=E)  # (E,)
    active = counts.nonzero().squeeze(1)  # (Ea,) experts that receive a token
    remap = torch.full((E,), -1, dtype=torch.long, device=x.device)
    remap[active] = torch.arange(active.numel(), device=x.device)
    order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert
    sorted_ids = flat_ids[order]
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted slot of each expert
    slot = torch.arange(order.numel(), device=x.device) - starts[sorted_ids]  # row inside expert
    C = int(counts.max())
    tokens = order // k  # (P,) token of each sorted pair
    xb = x.new_zeros(active.numel(), C, d)
    xb[remap[sorted_ids], slot] = x[tokens]  # (Ea, C, d)
    h = torch.bmm(xb, w13[active])  # (Ea, C, 2f)
    a = F.silu(h[..., :f]) * h[..., f:]
    y = torch.bmm(a, w2[active])  # (Ea, C, d)
    yp = y[remap[sorted_ids], slot]  # (P, d) rows back in sorted pair order
    w = topk_weights.reshape(-1)[order].to(yp.dtype)
    return out.index_add(0, tokens, yp * w[:, None])
