"""Transformer building blocks: RMSNorm, SwiGLU, attention (self/cross, with KV cache), layers.

Attention goes through :func:`fastcap.ops.attention` only. When ``capture`` is set on an
:class:`Attention` module, it also stores its probabilities (a diagnostic: entropy
instruments and attention maps); the training path never pays for that otherwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastcap.ops import attention
from fastcap.ops.ref.attention import attention_probs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """Dense gated FFN: (silu(x W_gate) * x W_up) W_down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Attention(nn.Module):
    """Multi-head attention. Self-attention when ``kv`` is None, else cross-attention."""

    def __init__(self, dim: int, heads: int, *, cross: bool = False):
        super().__init__()
        self.heads = heads
        self.cross = cross
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.capture = False
        self.last_probs: Tensor | None = None  # (B, H, Lq, Lk) when capture is set

    def split(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, Dh)

    def project_kv(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, L, Dh) of ``src`` (B, L, D): once per image for cross."""
        k, v = self.kv(src).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(
        self,
        x: Tensor,
        *,
        kv: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
        kv_lens: Tensor | None = None,
        rope_theta: float | None = None,
        cache: dict | None = None,
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D).

        ``kv``: precomputed (k, v) for cross-attention. ``cache``: a dict holding this
        layer's self-attention keys/values so far (unrotated; RoPE is applied in the op from
        positions), extended in place — one-token decoding with bottom-right causality.
        """
        B, L, D = x.shape
        q = self.split(self.q(x))
        if kv is None:
            k, v = self.project_kv(x)
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        else:
            k, v = kv
        out = attention(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta)
        if self.capture:
            with torch.no_grad():
                self.last_probs = attention_probs(
                    q, k, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta
                )
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class EncoderLayer(nn.Module):
    """Pre-norm, non-causal self-attention + SwiGLU over image tokens."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))
