"""Transformer building blocks: RMSNorm, SwiGLU, attention (self/cross, with KV cache), layers.

Attention goes through :func:`fastcap.ops.attention` only. When ``capture`` is set on an
:class:`Attention` module, it also stores its probabilities (a diagnostic: entropy
instruments and attention maps); the training path never pays for that otherwise.

Decoding keeps each self-attention layer's keys and values in a :class:`KVCache`: buffers
allocated once for the whole caption and written in place. Its keys are stored already rotated,
so a step rotates only its new key and query, and attends to the filled prefix (a view) with
no mask when every row has the same length, which the decoders guarantee.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastcap.ops import attention, dispatch
from fastcap.ops.ref.attention import attention_probs
from fastcap.ops.ref.rope import rope_range


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

    def decode(self, x: Tensor) -> Tensor:
        """:meth:`forward` on the weights directly (see ``Attention.decode_self``)."""
        gate, up = F.linear(x, self.w13.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2.weight)


class KVCache:
    """One self-attention layer's keys and values while decoding, preallocated and written in
    place (no ``torch.cat`` per step).

    ``k``, ``v``: (R, H, capacity, Dh) views of buffers allocated on the first :meth:`append`
    (R: the rows of that call; rows that leave later free the tail). Positions ``[0, len)`` are
    filled. Keys are stored rotated (RoPE at their own position, see :meth:`rotate`), values as
    they are. The cache also keeps what its layer needs once per decoding call: the q and kv
    weights concatenated (``w_qkv``) and the RoPE tables.

    ``attend`` is the attention implementation ``FASTCAP_KERNELS`` selects for ``device``,
    resolved once per decoding call: :func:`fastcap.ops.attention` checks its arguments and
    reads the flag on every call, which measured about a tenth of a CPU decoding step, while
    the decoding path builds its shapes itself. Cross-attention uses it too while decoding.

    Static mode (``pos`` given: a (1,) long tensor on ``device`` that the decoder shares among
    its layers and advances itself): one position per step, written at ``pos``; attention reads
    the whole buffers with a length mask. Every step then runs the same kernels on the same
    memory, with no value read on the host: what a CUDA graph replays.
    """

    def __init__(self, capacity: int, device: torch.device | str, pos: Tensor | None = None):
        self.capacity = capacity
        self.attend = dispatch.get("attention", torch.device(device))
        self.pos = pos
        self.len = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._bufs: tuple[Tensor, Tensor] | None = None  # the buffers k and v are rows of
        self._spare: tuple[Tensor, Tensor] | None = None  # a second pair, for row reordering
        self.w_qkv: Tensor | None = None  # (3D, D)
        self._rope: tuple[Tensor, Tensor] | None = None  # cos, signed sin (capacity, Dh)

    def check(self, R: int, L: int) -> None:
        """Raise unless R rows and L new positions fit (static mode: one position a step; its
        bound is the caller's, since pos lives on the device)."""
        rows = R if self.k is None else self.k.shape[0]
        if self.pos is not None:
            if rows != R or L != 1:
                raise ValueError(f"KVCache (static): one position of {rows} rows a step, got {L}")
        elif rows != R or self.len + L > self.capacity:
            raise ValueError(
                f"KVCache: {R} rows and {self.len} + {L} positions do not fit "
                f"{rows} rows x {self.capacity} positions"
            )

    def rotate(self, x: Tensor, theta: float) -> Tensor:
        """RoPE of x (R, h, L, Dh) at positions len .. len + L - 1, bit for bit what
        :func:`fastcap.ops.ref.rope.apply_rope` gives: rotate_half's sign is folded into the
        sin table, so x * cos + roll(x) * sin' is two products and a sum, as there."""
        L, Dh = x.shape[2], x.shape[3]
        if self._rope is None:
            cos, sin = rope_range(0, self.capacity, Dh, theta, x.device)
            dt = torch.promote_types(x.dtype, torch.float32)
            sign = torch.ones(Dh, dtype=dt, device=x.device)
            sign[: Dh // 2] = -1
            self._rope = (cos.to(dt), sin.to(dt) * sign)
        if self.pos is None:
            cos, sin = (t.narrow(0, self.len, L) for t in self._rope)
        else:
            cos, sin = (t.index_select(0, self.pos) for t in self._rope)
        xf = x.to(cos.dtype)
        return (xf * cos + xf.roll(Dh // 2, -1) * sin).to(x.dtype)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions k, v (R, H, L, Dh) -> the filled keys and values
        (R, H, len + L, Dh), views of the buffers."""
        R, H, L, D = k.shape
        if self.k is None:
            self._bufs = (k.new_empty(R, H, self.capacity, D), v.new_empty(R, H, self.capacity, D))
            self.k, self.v = self._bufs
            if self.pos is not None:  # masked, but never uninitialised (NaN * 0 is NaN)
                self.k.zero_(), self.v.zero_()
        self.check(R, L)
        if self.pos is not None:
            self.k.index_copy_(2, self.pos, k)
            self.v.index_copy_(2, self.pos, v)
            return self.k, self.v
        self.k.narrow(2, self.len, L).copy_(k)
        self.v.narrow(2, self.len, L).copy_(v)
        self.len += L
        return self.k.narrow(2, 0, self.len), self.v.narrow(2, 0, self.len)

    def select_rows(self, idx: Tensor) -> None:
        """Row i becomes old row ``idx[i]`` (beam reordering; finished rows leaving). The filled
        prefix is gathered into the second pair of buffers, which then swaps with the first: no
        allocation after the first call."""
        if self.k is None:
            return
        if self._spare is None:
            self._spare = (torch.empty_like(self._bufs[0]), torch.empty_like(self._bufs[1]))
        k2, v2 = self._spare
        if self.pos is not None:  # the same memory every step: gather, then copy back
            torch.index_select(self.k, 0, idx, out=k2)
            torch.index_select(self.v, 0, idx, out=v2)
            self.k.copy_(k2), self.v.copy_(v2)
            return
        n, t = idx.numel(), self.len
        torch.index_select(self.k.narrow(2, 0, t), 0, idx, out=k2[:n, :, :t])
        torch.index_select(self.v.narrow(2, 0, t), 0, idx, out=v2[:n, :, :t])
        self._bufs, self._spare = self._spare, self._bufs
        self.k, self.v = k2[:n], v2[:n]


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
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D).

        ``kv``: precomputed (k, v) (Bk, H, N, Dh) for cross-attention; Bk may divide B, when
        each group of B / Bk consecutive rows (the beams of one image) shares its image's keys.
        Decoding with a :class:`KVCache` goes through :meth:`decode_self` and
        :meth:`decode_cross` instead.
        """
        B, L, D = x.shape
        q = self.split(self.q(x))
        if kv is None:
            k, v = self.project_kv(x)
        else:
            k, v = kv
            if k.shape[0] != B:
                return self.o(self._grouped_cross(q, k, v, attention))
        out = attention(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta)
        if self.capture:
            with torch.no_grad():
                self.last_probs = attention_probs(
                    q, k, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta
                )
        return self.o(out.transpose(1, 2).reshape(B, L, D))

    # ------------------------------------------------------------------ decoding
    # The weights are read directly (F.linear), not through the Linear modules: a decoding
    # copy runs no hooks, and the modules' call overhead measured a twentieth of a CPU step.
    def decode_self(self, x: Tensor, cache: KVCache, rope_theta: float | None) -> Tensor:
        """Causal self-attention of the new positions x (B, L, D) over the cache and
        themselves (every row holds every position) -> (B, L, D).

        q, k and v come from one matmul (the weights concatenated once per cache: the same
        products, bit for bit, in one call). RoPE as the op applies it (key j at position j,
        query i at i + Lk - Lq), to the new positions only, q and k in one pass: the cached
        keys were rotated when they were written.
        """
        B, L, D = x.shape
        H, Dh = self.heads, D // self.heads
        if cache.w_qkv is None:
            cache.w_qkv = torch.cat([self.q.weight, self.kv.weight])
        cache.check(B, L)
        qkv = F.linear(x, cache.w_qkv).view(B, L, 3 * H, Dh).transpose(1, 2)  # (B, 3H, L, Dh)
        qk = qkv.narrow(1, 0, 2 * H)
        if rope_theta is not None:
            qk = cache.rotate(qk, rope_theta)
        q = qk.narrow(1, 0, H)
        k, v = cache.append(qk.narrow(1, H, H), qkv.narrow(1, 2 * H, H))
        # static: the buffers' keys past pos are not written yet
        kv_lens = None if cache.pos is None else (cache.pos + 1).expand(B)
        # one new position sees every key: no causal mask to build
        causal = L > 1
        out = cache.attend(q, k, v, causal=causal, kv_lens=kv_lens)
        if self.capture:
            with torch.no_grad():
                self.last_probs = attention_probs(q, k, causal=causal, kv_lens=kv_lens)
        return F.linear(out.transpose(1, 2).reshape(B, L, D), self.o.weight)

    def decode_cross(self, x: Tensor, kv: tuple[Tensor, Tensor], attend) -> Tensor:
        """Cross-attention of x (B, L, D) to the image keys/values ``kv`` (one row per row of
        x, or per group of rows: see :meth:`forward`) with ``attend`` (a
        :attr:`KVCache.attend`) -> (B, L, D)."""
        B, L, D = x.shape
        q = self.split(F.linear(x, self.q.weight))
        k, v = kv
        if k.shape[0] != B:
            return F.linear(self._grouped_cross(q, k, v, attend), self.o.weight)
        out = attend(q, k, v)
        if self.capture:
            with torch.no_grad():
                self.last_probs = attention_probs(q, k)
        return F.linear(out.transpose(1, 2).reshape(B, L, D), self.o.weight)

    def _grouped_cross(self, q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        """Cross-attention of q (B, H, L, Dh) whose groups of g = B / Bk consecutive rows share
        keys k, v (Bk, H, N, Dh): each group is one block of g * L queries, so the keys are
        neither repeated nor reordered with the beams. Returns the heads merged, (B, L, D),
        before the output projection."""
        B, H, L, Dh = q.shape
        Bk = k.shape[0]
        if B % Bk:
            raise ValueError(f"cross-attention: {B} query rows do not group over {Bk} key rows")
        g = B // Bk
        qg = q.reshape(Bk, g, H, L, Dh).transpose(1, 2).reshape(Bk, H, g * L, Dh)
        out = attend(qg, k, v)  # (Bk, H, g * L, Dh)
        if self.capture:
            with torch.no_grad():
                p = attention_probs(qg, k)
                self.last_probs = p.reshape(Bk, H, g, L, -1).transpose(1, 2).reshape(B, H, L, -1)
        out = out.reshape(Bk, H, g, L, Dh).permute(0, 2, 3, 1, 4)  # (Bk, g, L, H, Dh)
        return out.reshape(B, L, H * Dh)


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
