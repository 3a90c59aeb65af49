"""Fused attention in Triton: RoPE, bottom-right causal, key padding; forward and backward.

Computes exactly what :func:`fastcap.ops.ref.attention.attention` computes, FlashAttention-2
style: the forward streams key blocks through an online softmax with fp32 accumulators and saves
the log-sum-exp per query row; the backward recomputes the probabilities from it.

* RoPE (NeoX rotate-half) is applied as blocks are loaded: q once per query block, k per key
  block, both from a small fp32 cos/sin table built in fp64 on the host (the same numbers as the
  reference). No rotated copy of q or k is ever written. Key j sits at position j, query i at
  i + (Lk - Lq); when Lq > Lk those query positions are negative and the table starts there.
  The dot products run on the two halves of the head dim, so rotate-half needs no shuffle.
* Causal masking skips every key block that lies entirely above the diagonal and masks only the
  blocks that cross it (or the kv_lens boundary); fully visible blocks run without a mask.
* A query row that sees no key writes 0 and a log-sum-exp of +1e30: finite, and large enough
  that exp(s - lse) is exactly 0 for every score, so the backward gives it zero gradient
  without NaN or Inf (FlashAttention-2 stores +inf there; we keep it finite).
* The backward is deterministic: one kernel owns a key block and accumulates dk, dv over query
  blocks; a second owns a query block and accumulates dq over key blocks. No atomics: fp32
  atomic adds on dq would make gradients depend on scheduling order. The price is recomputing
  the probabilities in both kernels.
* fp32 inputs use IEEE fp32 dots unless ``torch.set_float32_matmul_precision`` allows TF32,
  following PyTorch's own matmul rule.

Head dims up to 256 are supported (any size; not-power-of-two dims are padded in registers).
Block sizes are autotuned per (head dim, causal, RoPE, length bucket) among the tiles that
compile without register spills for the device's architecture (sm_80 or sm_90, checked by
tests/gpu_compile.py); under ``TRITON_INTERPRET=1`` a fixed 16 x 16 config is used so CPU tests
exercise multi-block loops.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcap.common.capability import OPTIN_SHARED, shared_memory_limit
from fastcap.common.rope import rope_cos_sin

__all__ = ["attention", "attention_fwd", "attention_bwd", "EMPTY_ROW_LSE", "MAX_HEAD_DIM"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EMPTY_ROW_LSE = 1e30  # log-sum-exp stored for a query row that sees no key
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# fmt: off
# Argument lists are grouped by role (pointers, strides, sizes, constexprs) rather than one per
# line: with ~30 arguments per kernel that is what keeps them readable.


@triton.jit
def _rope(x1, x2, COS, SIN, tab_rows, ok, d, HALF: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate halves (x1, x2), fp32 (R, BLOCK_H), by the angles at table rows tab_rows (R,).

    Forward: (x1 c - x2 s, x2 c + x1 s). The gradient of a rotation is the inverse rotation,
    the same with s negated.
    """
    offs = tab_rows[:, None] * HALF + d[None, :]
    c = tl.load(COS + offs, mask=ok, other=0.0)
    s = tl.load(SIN + offs, mask=ok, other=0.0)
    if INVERSE:
        s = -s
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _load_qk(base, rows, n_rows, stride_l, COS, SIN, tab_rows, d,
             HALF1: tl.constexpr, HALF2: tl.constexpr, ROPE: tl.constexpr):
    """Rows (R,) of a q or k slice at base ((L, D), row stride stride_l) as the halves
    [0, HALF1) and [HALF1, D), each (R, BLOCK_H), rotated if ROPE. Rows >= n_rows read 0."""
    ok = rows < n_rows
    ok1 = ok[:, None] & (d[None, :] < HALF1)
    ok2 = ok[:, None] & (d[None, :] < HALF2)
    ptr = base + rows[:, None] * stride_l + d[None, :]
    x1 = tl.load(ptr, mask=ok1, other=0.0)
    x2 = tl.load(ptr + HALF1, mask=ok2, other=0.0)
    if ROPE:
        # Rotate in fp32 and round once, as the reference does before its matmul.
        r1, r2 = _rope(x1.to(tl.float32), x2.to(tl.float32), COS, SIN, tab_rows, ok1, d, HALF1,
                       False)
        x1 = r1.to(x1.dtype)
        x2 = r2.to(x2.dtype)
    return x1, x2


@triton.jit
def _store_grad(base, rows, n_rows, g1, g2, scale, COS, SIN, tab_rows, d,
                HALF1: tl.constexpr, HALF2: tl.constexpr, ROPE: tl.constexpr):
    """Store scale * (g1, g2), fp32 halves (R, BLOCK_H) of a gradient taken in the rotated
    frame, into rows (R,) of the contiguous (L, D) slice at base, rotated back if ROPE."""
    ok = rows < n_rows
    ok1 = ok[:, None] & (d[None, :] < HALF1)
    ok2 = ok[:, None] & (d[None, :] < HALF2)
    g1 = g1 * scale
    g2 = g2 * scale
    if ROPE:
        g1, g2 = _rope(g1, g2, COS, SIN, tab_rows, ok1, d, HALF1, True)
    ptr = base + rows[:, None] * (HALF1 + HALF2) + d[None, :]
    tl.store(ptr, g1.to(base.dtype.element_ty), mask=ok1)
    tl.store(ptr + HALF1, g2.to(base.dtype.element_ty), mask=ok2)


@triton.jit
def _load_rows(base, rows, n_rows, stride_l, d, HEAD_DIM: tl.constexpr):
    """Rows (R,) of a v / dO slice at base ((L, D), row stride stride_l) as (R, BLOCK_D)."""
    ok = (rows[:, None] < n_rows) & (d[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_l + d[None, :], mask=ok, other=0.0)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q1, q2, offs_m,
               k_base,  # K at (b, h): (Lk, D), row stride stride_kl
               v_base,  # V at (b, h): (Lk, D), row stride stride_vl
               COS,  # (Lt, D/2) fp32 cos table
               SIN,  # (Lt, D/2) fp32 sin table
               stride_kl, stride_vl, lo, hi, n_valid, q_shift, rope_p0, qk_scale,
               HEAD_DIM: tl.constexpr, HALF1: tl.constexpr, HALF2: tl.constexpr,
               CAUSAL: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED applies the causal and padding mask."""
    d_h = tl.arange(0, BLOCK_H)
    d_v = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # Padding keys are never read (n_valid <= Lk), so they cannot leak NaN from memory.
        k1, k2 = _load_qk(k_base, offs_n, n_valid, stride_kl, COS, SIN, offs_n - rope_p0, d_h,
                          HALF1, HALF2, ROPE)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PREC) * qk_scale  # log2 domain
        if MASKED:
            keep = offs_n[None, :] < n_valid
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + q_shift)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet has m = -inf: subtract 0 instead of inf - inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, n_valid, stride_vl, d_v, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,  # (B, H, Lq, D), strides (stride_qb, stride_qh, stride_ql, 1)
    K,  # (B, H, Lk, D), strides (stride_kb, stride_kh, stride_kl, 1)
    V,  # (B, H, Lk, D), strides (stride_vb, stride_vh, stride_vl, 1)
    O,  # (B, H, Lq, D) contiguous, q's dtype
    LSE,  # (B, H, Lq) fp32: natural-log log-sum-exp of each row's scaled, masked scores
    KV_LENS,  # (B,) int32 valid keys per batch row; read only if HAS_KV_LENS
    COS,  # (Lt, D/2) fp32 cos of positions rope_p0 .. rope_p0 + Lt - 1; read only if ROPE
    SIN,  # (Lt, D/2) fp32 sin of the same positions; read only if ROPE
    sm_scale, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, H, Lq, Lk, rope_p0,
    lq_bucket, lk_bucket,  # powers of two of Lq, Lk: autotune keys only
    HEAD_DIM: tl.constexpr, HALF1: tl.constexpr, HALF2: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_shift = Lk - Lq  # query i sits at position i + q_shift
    n_valid = Lk
    if HAS_KV_LENS:
        n_valid = tl.minimum(tl.maximum(tl.load(KV_LENS + b), 0), Lk)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    d_h = tl.arange(0, BLOCK_H)
    d_v = tl.arange(0, BLOCK_D)
    q1, q2 = _load_qk(Q + b * stride_qb + h * stride_qh, offs_m, Lq, stride_ql, COS, SIN,
                      offs_m + q_shift - rope_p0, d_h, HALF1, HALF2, ROPE)

    # Keys [0, n_full) are visible to every row of this block: no mask. Keys [n_full, hi) cross
    # the diagonal or the padding boundary: masked. Blocks from hi on are never visited.
    hi = n_valid
    n_full = n_valid
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + q_shift)
        n_full = tl.minimum(n_full, start_m + 1 + q_shift)
    hi = tl.maximum(hi, 0)
    n_full = tl.maximum(n_full, 0) // BLOCK_N * BLOCK_N

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634  # exp2 is the native instruction
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, offs_m, k_base, v_base, COS, SIN,
                               stride_kl, stride_vl, 0, n_full, n_valid, q_shift, rope_p0,
                               qk_scale, HEAD_DIM, HALF1, HALF2, CAUSAL, ROPE, False, DOT_PREC,
                               BLOCK_N, BLOCK_H, BLOCK_D)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, offs_m, k_base, v_base, COS, SIN,
                               stride_kl, stride_vl, n_full, hi, n_valid, q_shift, rope_p0,
                               qk_scale, HEAD_DIM, HALF1, HALF2, CAUSAL, ROPE, True, DOT_PREC,
                               BLOCK_N, BLOCK_H, BLOCK_D)

    empty = l_i == 0.0  # the row saw no key
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, 1e30, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row = (b * H + h) * Lq + offs_m
    ok = offs_m < Lq
    o_ptr = O + row[:, None] * HEAD_DIM + d_v[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=ok[:, None] & (d_v[None, :] < HEAD_DIM))
    tl.store(LSE + row, lse, mask=ok)


@triton.jit
def _bwd_delta_kernel(
    O,  # (R, D) contiguous, R = B * H * Lq: the forward output
    DO,  # (R, D) contiguous: the output gradient
    DELTA,  # (R,) fp32 out: rowsum(dO * O), the softmax-backward correction
    n_rows, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    o = _load_rows(O, rows, n_rows, HEAD_DIM, d, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO, rows, n_rows, HEAD_DIM, d, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n,
                    q_base,  # Q at (b, h): (Lq, D), row stride stride_ql
                    do_base,  # dO at (b, h): (Lq, D) contiguous
                    lse_base,  # LSE at (b, h): (Lq,) fp32
                    delta_base,  # DELTA at (b, h): (Lq,) fp32
                    COS,  # (Lt, D/2) fp32 cos table
                    SIN,  # (Lt, D/2) fp32 sin table
                    stride_ql, lo, hi, Lq, n_valid, q_shift, rope_p0, qk_scale,
                    HEAD_DIM: tl.constexpr, HALF1: tl.constexpr, HALF2: tl.constexpr,
                    CAUSAL: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Accumulate dk, dv of one key block over query blocks [lo, hi)."""
    d_h = tl.arange(0, BLOCK_H)
    d_v = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = offs_m < Lq
        q1, q2 = _load_qk(q_base, offs_m, Lq, stride_ql, COS, SIN, offs_m + q_shift - rope_p0,
                          d_h, HALF1, HALF2, ROPE)
        # Rows past Lq read q = dO = lse = delta = 0, so they add exactly 0 below.
        do = _load_rows(do_base, offs_m, Lq, HEAD_DIM, d_v, HEAD_DIM)
        lse2 = tl.load(lse_base + offs_m, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
        # Transposed scores (BLOCK_N, BLOCK_M), so dk and dv need no transpose of their own.
        st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = offs_n[:, None] < n_valid
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + q_shift)
            st = tl.where(keep, st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,  # (B, H, Lq, D), strides (stride_qb, stride_qh, stride_ql, 1)
    K,  # (B, H, Lk, D), strides (stride_kb, stride_kh, stride_kl, 1)
    V,  # (B, H, Lk, D), strides (stride_vb, stride_vh, stride_vl, 1)
    DO,  # (B, H, Lq, D) contiguous
    LSE,  # (B, H, Lq) fp32 from the forward
    DELTA,  # (B, H, Lq) fp32 rowsum(dO * O)
    DK,  # (B, H, Lk, D) contiguous out, k's dtype
    DV,  # (B, H, Lk, D) contiguous out, v's dtype
    KV_LENS,  # (B,) int32; read only if HAS_KV_LENS
    COS,  # (Lt, D/2) fp32 cos table; read only if ROPE
    SIN,  # (Lt, D/2) fp32 sin table; read only if ROPE
    sm_scale, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, H, Lq, Lk, rope_p0,
    lq_bucket, lk_bucket,  # powers of two of Lq, Lk: autotune keys only
    HEAD_DIM: tl.constexpr, HALF1: tl.constexpr, HALF2: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    q_shift = Lk - Lq
    n_valid = Lk
    if HAS_KV_LENS:
        n_valid = tl.minimum(tl.maximum(tl.load(KV_LENS + b), 0), Lk)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_h = tl.arange(0, BLOCK_H)
    d_v = tl.arange(0, BLOCK_D)
    k1, k2 = _load_qk(K + b * stride_kb + h * stride_kh, offs_n, Lk, stride_kl, COS, SIN,
                      offs_n - rope_p0, d_h, HALF1, HALF2, ROPE)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, Lk, stride_vl, d_v, HEAD_DIM)

    # Query blocks before lo see none of these keys (causal); those in [lo, m_full) cross the
    # diagonal; those from m_full on see every key here, unless the block holds padding keys.
    lo = 0
    m_full = 0
    if CAUSAL:
        lo = tl.maximum(start_n - q_shift, 0) // BLOCK_M * BLOCK_M
        m_full = (tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0) + BLOCK_M - 1) // BLOCK_M
        m_full = m_full * BLOCK_M
    end = tl.where(start_n < n_valid, Lq, lo)  # a block of padding keys only: zero grads
    m_full = tl.where(start_n + BLOCK_N <= n_valid, m_full, end)
    m_full = tl.minimum(tl.maximum(m_full, lo), end)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + bh * Lq * HEAD_DIM
    qk_scale = sm_scale * 1.4426950408889634
    dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, q_base, do_base,
                                   LSE + bh * Lq, DELTA + bh * Lq, COS, SIN, stride_ql, lo,
                                   m_full, Lq, n_valid, q_shift, rope_p0, qk_scale, HEAD_DIM,
                                   HALF1, HALF2, CAUSAL, ROPE, True, DOT_PREC, BLOCK_M,
                                   BLOCK_H, BLOCK_D)
    dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, q_base, do_base,
                                   LSE + bh * Lq, DELTA + bh * Lq, COS, SIN, stride_ql, m_full,
                                   end, Lq, n_valid, q_shift, rope_p0, qk_scale, HEAD_DIM,
                                   HALF1, HALF2, CAUSAL, ROPE, False, DOT_PREC, BLOCK_M,
                                   BLOCK_H, BLOCK_D)

    _store_grad(DK + bh * Lk * HEAD_DIM, offs_n, Lk, dk1, dk2, sm_scale, COS, SIN,
                offs_n - rope_p0, d_h, HALF1, HALF2, ROPE)
    ok = (offs_n[:, None] < Lk) & (d_v[None, :] < HEAD_DIM)
    dv_ptr = DV + (bh * Lk + offs_n)[:, None] * HEAD_DIM + d_v[None, :]
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, offs_m,
                  k_base,  # K at (b, h): (Lk, D), row stride stride_kl
                  v_base,  # V at (b, h): (Lk, D), row stride stride_vl
                  COS,  # (Lt, D/2) fp32 cos table
                  SIN,  # (Lt, D/2) fp32 sin table
                  stride_kl, stride_vl, lo, hi, n_valid, q_shift, rope_p0, qk_scale,
                  HEAD_DIM: tl.constexpr, HALF1: tl.constexpr, HALF2: tl.constexpr,
                  CAUSAL: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Accumulate dq of one query block over key blocks [lo, hi)."""
    d_h = tl.arange(0, BLOCK_H)
    d_v = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k1, k2 = _load_qk(k_base, offs_n, n_valid, stride_kl, COS, SIN, offs_n - rope_p0, d_h,
                          HALF1, HALF2, ROPE)
        v = _load_rows(v_base, offs_n, n_valid, stride_vl, d_v, HEAD_DIM)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < n_valid
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + q_shift)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    Q,  # (B, H, Lq, D), strides (stride_qb, stride_qh, stride_ql, 1)
    K,  # (B, H, Lk, D), strides (stride_kb, stride_kh, stride_kl, 1)
    V,  # (B, H, Lk, D), strides (stride_vb, stride_vh, stride_vl, 1)
    DO,  # (B, H, Lq, D) contiguous
    LSE,  # (B, H, Lq) fp32 from the forward
    DELTA,  # (B, H, Lq) fp32 rowsum(dO * O)
    DQ,  # (B, H, Lq, D) contiguous out, q's dtype
    KV_LENS,  # (B,) int32; read only if HAS_KV_LENS
    COS,  # (Lt, D/2) fp32 cos table; read only if ROPE
    SIN,  # (Lt, D/2) fp32 sin table; read only if ROPE
    sm_scale, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, H, Lq, Lk, rope_p0,
    lq_bucket, lk_bucket,  # powers of two of Lq, Lk: autotune keys only
    HEAD_DIM: tl.constexpr, HALF1: tl.constexpr, HALF2: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    q_shift = Lk - Lq
    n_valid = Lk
    if HAS_KV_LENS:
        n_valid = tl.minimum(tl.maximum(tl.load(KV_LENS + b), 0), Lk)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    d_h = tl.arange(0, BLOCK_H)
    d_v = tl.arange(0, BLOCK_D)
    q1, q2 = _load_qk(Q + b * stride_qb + h * stride_qh, offs_m, Lq, stride_ql, COS, SIN,
                      offs_m + q_shift - rope_p0, d_h, HALF1, HALF2, ROPE)
    row = bh * Lq + offs_m
    q_ok = offs_m < Lq
    do = _load_rows(DO + bh * Lq * HEAD_DIM, offs_m, Lq, HEAD_DIM, d_v, HEAD_DIM)
    lse2 = tl.load(LSE + row, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=q_ok, other=0.0)

    hi = n_valid  # the same key ranges as the forward
    n_full = n_valid
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + q_shift)
        n_full = tl.minimum(n_full, start_m + 1 + q_shift)
    hi = tl.maximum(hi, 0)
    n_full = tl.maximum(n_full, 0) // BLOCK_N * BLOCK_N

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, offs_m, k_base, v_base, COS,
                             SIN, stride_kl, stride_vl, 0, n_full, n_valid, q_shift, rope_p0,
                             qk_scale, HEAD_DIM, HALF1, HALF2, CAUSAL, ROPE, False, DOT_PREC,
                             BLOCK_N, BLOCK_H, BLOCK_D)
    dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, offs_m, k_base, v_base, COS,
                             SIN, stride_kl, stride_vl, n_full, hi, n_valid, q_shift, rope_p0,
                             qk_scale, HEAD_DIM, HALF1, HALF2, CAUSAL, ROPE, True, DOT_PREC,
                             BLOCK_N, BLOCK_H, BLOCK_D)
    _store_grad(DQ + bh * Lq * HEAD_DIM, offs_m, Lq, dq1, dq2, sm_scale, COS, SIN,
                offs_m + q_shift - rope_p0, d_h, HALF1, HALF2, ROPE)


# fmt: on

# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim on sm_80, on sm_90). Small
# BLOCK_M serves decoding (Lq = 1) and short captions; 128-row tiles serve long sequences. The
# head-dim limits come from tests/gpu_compile.py: Triton 3.8's cubin for each architecture, read
# with cuobjdump, has no stack frame and no local memory at head dims up to the limit (checked
# at 64, 128 and 256, the top of each range: the register tiles are padded to powers of two).
# A 0 limit drops the tile on that architecture; the trailing comments give the stack frame
# (fp16) that lowered a limit. Timing them needs a GPU; that tuning is still open.
_FWD_SHAPES = [
    (16, 64, 4, 2, 256, 256),
    (32, 32, 4, 2, 256, 256),
    (32, 64, 4, 3, 64, 64),
    (64, 64, 4, 3, 64, 64),
    (128, 32, 8, 3, 128, 256),  # sm_80, D 256: 152 B of stack and 200 KiB of shared memory
    (128, 64, 8, 3, 64, 128),  # sm_80, D 128: 480 B of stack
    (128, 128, 8, 3, 0, 64),  # sm_80, D 64: 384 B of stack
]
# dk/dv: one program per key block (BLOCK_N) streams query blocks (BLOCK_M), so BLOCK_M is small.
# It holds three fp32 accumulators (dk1, dk2, dv) and k, v beside the recomputed scores, so it is
# the kernel that runs out of registers first; sm_80 (mma.sync, operands in registers) sooner.
_DKDV_SHAPES = [
    (16, 32, 4, 2, 128, 128),  # D 256: 328 B of stack on sm_80, 344 B on sm_90
    (16, 64, 4, 2, 64, 64),
    (32, 64, 4, 2, 0, 64),  # sm_80, D 64: 112 B
    (16, 128, 8, 2, 64, 64),
    (32, 128, 8, 2, 0, 64),  # sm_80, D 64: 96 B
    (16, 64, 8, 2, 64, 128),  # sm_80, D 128: 328 B
    (32, 64, 8, 2, 0, 128),  # sm_80: 16 B at D 64, 4,824 B at D 128 (ptxas fell to 32 registers)
    (32, 32, 8, 2, 128, 128),  # replaces 32 x 64 at D 128 on sm_80: 227 registers
    (16, 16, 8, 2, 256, 256),  # the D 256 tile on both: 241 registers
]
# dq: one program per query block (BLOCK_M) streams key blocks (BLOCK_N), so BLOCK_N is small.
_DQ_SHAPES = [
    (16, 32, 4, 2, 128, 256),  # sm_80, D 256: 32 B
    (32, 16, 4, 2, 128, 128),  # D 256: 144 B on both
    (64, 16, 4, 2, 64, 64),
    (64, 32, 4, 2, 64, 64),
    (64, 16, 8, 2, 64, 128),  # sm_80, D 128: 104 B
    (128, 16, 8, 2, 64, 128),  # sm_80, D 128: 232 B
    (128, 32, 8, 2, 64, 64),
    (16, 16, 4, 2, 256, 256),  # the D 256 tile on sm_80: 251 registers
]
_INTERPRET_BLOCKS = (16, 16)  # fixed under TRITON_INTERPRET=1: forces multi-block loops on CPU
_CHECKED_HEAD_DIMS = (64, 128, 256)  # compiled by tests/gpu_compile.py: the top of each range
_KIND = {"fwd": _FWD_SHAPES, "dkdv": _DKDV_SHAPES, "dq": _DQ_SHAPES}

# Shared memory per block, bytes, of each (kernel, BLOCK_M, BLOCK_N, warps, stages) by code
# family (80: mma.sync + cp.async, sm_80 to sm_89; 90: Hopper) and padded head dim (BLOCK_D 64,
# 128, 256; 16 and 32 take the 64 figure), as tests/gpu_compile.py measured them with Triton 3.8
# for 16-bit inputs (causal + kv_lens + RoPE: the most code). The pruning compares them with the
# device's opt-in limit (an A10, L4 or RTX 4090 has 99 KB, an A100 163 KB, an H100 227 KB); the
# compile-only table fails any row whose compiled kernel needs more than its figure here, so a
# Triton that allocates more is caught there, not at a launch. fp32 inputs: twice the figure.
# fmt: off
_SHARED_BYTES: dict[tuple, dict[int, dict[int, int]]] = {
    ('dkdv', 16, 16, 8, 2): {80: {64: 12928, 128: 25216, 256: 49792},
                            90: {64: 13952, 128: 26240, 256: 50816}},
    ('dkdv', 16, 32, 4, 2): {80: {64: 16512, 128: 33920}, 90: {64: 17536, 128: 34944}},
    ('dkdv', 16, 64, 4, 2): {80: {64: 24704}, 90: {64: 29824}},
    ('dkdv', 16, 64, 8, 2): {80: {64: 24704}, 90: {64: 29824, 128: 58496}},
    ('dkdv', 16, 128, 8, 2): {80: {64: 41088}, 90: {64: 46208}},
    ('dkdv', 32, 32, 8, 2): {80: {64: 24832, 128: 51456}, 90: {64: 25856, 128: 52480}},
    ('dkdv', 32, 64, 4, 2): {90: {64: 42240}},
    ('dkdv', 32, 64, 8, 2): {90: {64: 42240, 128: 83200}},
    ('dkdv', 32, 128, 8, 2): {90: {64: 58624}},
    ('dq', 16, 16, 4, 2): {80: {64: 12800, 128: 25088, 256: 49664},
                            90: {64: 13824, 128: 26112, 256: 50688}},
    ('dq', 16, 32, 4, 2): {80: {64: 21504, 128: 41984}, 90: {64: 22528, 128: 43008, 256: 83968}},
    ('dq', 32, 16, 4, 2): {80: {64: 16384, 128: 33792}, 90: {64: 17408, 128: 34816}},
    ('dq', 64, 16, 4, 2): {80: {64: 24576}, 90: {64: 29696}},
    ('dq', 64, 16, 8, 2): {80: {64: 24576}, 90: {64: 29696, 128: 58368}},
    ('dq', 64, 32, 4, 2): {80: {64: 32768}, 90: {64: 41984}},
    ('dq', 128, 16, 8, 2): {80: {64: 40960}, 90: {64: 46080, 128: 91136}},
    ('dq', 128, 32, 8, 2): {80: {64: 49152}, 90: {64: 58368}},
    ('fwd', 16, 64, 4, 2): {80: {64: 36864, 128: 71680, 256: 141312},
                            90: {64: 37888, 128: 72704, 256: 142336}},
    ('fwd', 32, 32, 4, 2): {80: {64: 22528, 128: 43008, 256: 83968},
                            90: {64: 23552, 128: 44032, 256: 84992}},
    ('fwd', 32, 64, 4, 3): {80: {64: 73728}, 90: {64: 74752}},
    ('fwd', 64, 64, 4, 3): {80: {64: 73728}, 90: {64: 91136}},
    ('fwd', 128, 32, 8, 3): {80: {64: 49152, 128: 98304},
                            90: {64: 58368, 128: 115712, 256: 230400}},
    ('fwd', 128, 64, 8, 3): {80: {64: 81920}, 90: {64: 99328, 128: 197632}},
    ('fwd', 128, 128, 8, 3): {90: {64: 181248}},
}
# fmt: on


def _arch(device: torch.device) -> int:
    """The code family whose tile limits apply on this device: 90 from Hopper on (warpgroup
    MMA), else 80 (mma.sync and cp.async from sm_80 to sm_89: the same code, and the same shared
    memory, which is then compared with the device's own limit)."""
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _shared_bytes(kind: str, tile: tuple, arch: int, head_dim: int, itemsize: int = 2) -> int:
    """Shared memory ``tile`` of kernel ``kind`` needs on ``arch`` at ``head_dim`` (see
    :data:`_SHARED_BYTES`); a tile without a figure counts as not fitting anywhere."""
    block_d = max(64, triton.next_power_of_2(head_dim))
    fam = 90 if arch >= 90 else 80
    got = _SHARED_BYTES.get((kind, *tile[:4]), {}).get(fam, {}).get(block_d)
    return 1 << 40 if got is None else got * max(1, itemsize // 2)


def _configs(shapes):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s, *_ in shapes
    ]


def _kind(shapes) -> str:
    return next(k for k, v in _KIND.items() if v is shapes)


def _tiles(shapes, arch: int, head_dim: int, lq_bucket: int, lk_bucket: int,
           shared_limit: int | None = None, itemsize: int = 2) -> list[tuple]:  # fmt: skip
    """(BLOCK_M, BLOCK_N, warps, stages) the autotuner may time: within the tile's head-dim limit
    on this architecture (no spill), within ``shared_limit`` bytes of shared memory (the
    device's opt-in limit; None: the architecture's own), and not far longer than the sequence
    (else the smallest that fits: a lone config is launched without a trial, so it must fit)."""
    col = 5 if arch >= 90 else 4
    if shared_limit is None:
        shared_limit = OPTIN_SHARED.get((arch // 10, arch % 10), OPTIN_SHARED[(9, 0)])
    kind = _kind(shapes)
    fits = [t[:4] for t in shapes if head_dim <= t[col]
            and _shared_bytes(kind, t, arch, head_dim, itemsize) <= shared_limit]  # fmt: skip
    if not fits:
        raise ValueError(
            f"no attention {kind} tile for head dim {head_dim} on sm_{arch} within "
            f"{shared_limit // 1024} KB of shared memory"
        )
    kept = [t for t in fits if t[0] <= max(16, lq_bucket) and t[1] <= max(16, lk_bucket)]
    return kept or [min(fits, key=lambda t: t[0] * t[1])]


def _reachable(shapes, arch: int, head_dim: int, shared_limit: int | None = None) -> list[tuple]:
    """Every tile :func:`_tiles` keeps for some pair of length buckets."""
    buckets = [2**i for i in range(14)]  # _bucket's range, 1 .. 8192
    seen = {t for lq in buckets for lk in buckets
            for t in _tiles(shapes, arch, head_dim, lq, lk, shared_limit)}  # fmt: skip
    return [t[:4] for t in shapes if t[:4] in seen]


def _pruner(shapes):
    """Early pruning by (Q's device: its code family and its opt-in shared memory, head dim,
    length buckets)."""

    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        q = named_args["Q"]
        keep = _tiles(shapes, _arch(q.device), d, named_args["lq_bucket"],
                      named_args["lk_bucket"], shared_memory_limit(q.device),
                      q.element_size())  # fmt: skip
        key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        return [c for c in configs if key(c) in keep]

    return prune


def _tuned(kernel, shapes):
    # Every kernel here writes each output element exactly once (no atomics, no accumulation
    # into its outputs), so the autotuner may rerun it without resetting anything.
    key = ["HEAD_DIM", "CAUSAL", "ROPE", "HAS_KV_LENS", "lq_bucket", "lk_bucket"]
    prune = {"early_config_prune": _pruner(shapes)}
    return triton.autotune(_configs(shapes), key=key, prune_configs_by=prune)(kernel)


_fwd_tuned = _tuned(_fwd_kernel, _FWD_SHAPES)
_dkdv_tuned = _tuned(_bwd_dkdv_kernel, _DKDV_SHAPES)
_dq_tuned = _tuned(_bwd_dq_kernel, _DQ_SHAPES)


def _bucket(n: int) -> int:
    """Length bucket for autotuning: powers of two, so decoding does not retune every step."""
    return min(triton.next_power_of_2(max(n, 1)), 8192)


@lru_cache(maxsize=32)
def _rope_table(p0: int, n: int, half: int, theta: float, device: torch.device):
    """fp32 (n, half) cos and sin of positions p0 .. p0 + n - 1, from fp64 like the reference.

    Built outside inference mode: a cached table first made while decoding must still be
    usable by a later training step."""
    with torch.inference_mode(False):
        cos, sin = rope_cos_sin(torch.arange(p0, p0 + n, device=device), 2 * half, theta)
        return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def _check(q: Tensor, rope_theta: float | None) -> None:
    D = q.shape[-1]
    if q.dtype not in _DTYPES:
        raise ValueError(f"triton attention: dtype must be fp16, bf16 or fp32; got {q.dtype}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim {D} > {MAX_HEAD_DIM} is not supported")
    if rope_theta is not None and D % 2:
        raise ValueError(f"triton attention: rope_theta needs an even head dim, got D={D}")


def _launch_args(q, k, v, causal, kv_lens, rope_theta, scale):
    """(positional arguments after the tensors, constexpr keywords) shared by the kernels."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    p0 = min(0, Lk - Lq)  # the first query position; negative when Lq > Lk
    if rope_theta is not None:
        n_tab = triton.next_power_of_2(Lk - p0)  # rounded up so decoding reuses one table
        cos, sin = _rope_table(p0, n_tab, D // 2, float(rope_theta), q.device)
    else:
        cos = sin = q  # never read
    lens = kv_lens.to(device=q.device, dtype=torch.int32) if kv_lens is not None else q
    sm_scale = float(scale) if scale is not None else D**-0.5
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    args = (lens, cos, sin, sm_scale, *strides, H, Lq, Lk, p0, _bucket(Lq), _bucket(Lk))
    half1 = (D + 1) // 2  # without RoPE an odd D splits unevenly, which is harmless
    fp32_ieee = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    meta = {
        "HEAD_DIM": D,
        "HALF1": half1,
        "HALF2": D - half1,
        "CAUSAL": bool(causal),
        "HAS_KV_LENS": kv_lens is not None,
        "ROPE": rope_theta is not None,
        "DOT_PREC": "ieee" if fp32_ieee else "tf32",  # ignored for 16-bit inputs
        "BLOCK_H": max(16, triton.next_power_of_2(half1)),
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
    }
    return args, meta


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    kv_lens: Tensor | None = None,
    rope_theta: float | None = None,
    scale: float | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward launcher: the attention output and the log-sum-exp saved for backward.

    Args: as :func:`attention`; ``blocks`` = (BLOCK_M, BLOCK_N) bypasses autotuning (tests,
    single-tile benchmarks).

    Returns:
        out (B, H, Lq, D) in q's dtype; lse (B, H, Lq) fp32, the natural-log log-sum-exp of each
        row's scaled, masked scores, or EMPTY_ROW_LSE (1e30) for a row that sees no key (its
        output is 0).
    """
    _check(q, rope_theta)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, H, Lq, D = q.shape
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args, meta = _launch_args(q, k, v, causal, kv_lens, rope_theta, scale)
    blocks = blocks or (_INTERPRET_BLOCKS if _INTERPRET else None)
    if blocks is not None:
        bm, bn = blocks
        grid = (triton.cdiv(Lq, bm), H, B)
        _fwd_kernel[grid](q, k, v, out, lse, *args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), H, B)
        _fwd_tuned[grid](q, k, v, out, lse, *args, **meta)
    return out, lse


def attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool = False,
    kv_lens: Tensor | None = None,
    rope_theta: float | None = None,
    scale: float | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward launcher: (dq, dk, dv), contiguous, in the shapes and dtypes of q, k, v.

    Args: ``do`` (B, H, Lq, D) the output gradient; ``out`` and ``lse`` from
    :func:`attention_fwd`; the rest exactly as given to it. ``blocks`` = (BLOCK_M, BLOCK_N)
    bypasses autotuning.
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    do = do.contiguous()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    rows, bd = B * H * Lq, max(16, triton.next_power_of_2(D))
    bm_delta = 16 if _INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(rows, bm_delta),)](
        out, do, delta, rows, HEAD_DIM=D, BLOCK_M=bm_delta, BLOCK_D=bd
    )
    args, meta = _launch_args(q, k, v, causal, kv_lens, rope_theta, scale)
    blocks = blocks or (_INTERPRET_BLOCKS if _INTERPRET else None)
    if blocks is not None:
        bm, bn = blocks
        tile = {"BLOCK_M": bm, "BLOCK_N": bn}
        dkdv, dq_k = _bwd_dkdv_kernel, _bwd_dq_kernel
        grid_kv, grid_q = (triton.cdiv(Lk, bn), H, B), (triton.cdiv(Lq, bm), H, B)
    else:
        tile = {}
        dkdv, dq_k = _dkdv_tuned, _dq_tuned
        grid_kv = lambda m: (triton.cdiv(Lk, m["BLOCK_N"]), H, B)
        grid_q = lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), H, B)
    dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, *args, **meta, **tile)
    dq_k[grid_q](q, k, v, do, lse, delta, dq, *args, **meta, **tile)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library), so that torch.compile traces through the op without a graph break
# ----------------------------------------------------------------------------------------------
# The op bodies are opaque to dynamo: the Triton launches and the autotuner run inside them. The
# fake (meta) implementations give every output's shape, dtype and strides without touching data,
# which is all that tracing needs. The forward op returns what the backward needs (out and lse);
# the backward is an op of its own, so a compiled backward graph calls it too.


@torch.library.custom_op("fastcap::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_lens: Tensor | None,
    causal: bool,
    rope_theta: float | None,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    # out (B, H, Lq, D) contiguous in q's dtype; lse (B, H, Lq) fp32, fresh tensors
    return attention_fwd(
        q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta, scale=scale
    )


@_attention_fwd_op.register_fake
def _(q, k, v, kv_lens, causal, rope_theta, scale):
    _check(q, rope_theta)  # the same ValueError at trace time as at run time
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("fastcap::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_lens: Tensor | None,
    causal: bool,
    rope_theta: float | None,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    # dq, dk, dv: contiguous, in the shapes and dtypes of q, k, v
    return attention_bwd(
        do, q, k, v, out, lse, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta, scale=scale
    )


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, kv_lens, causal, rope_theta, scale):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, kv_lens, causal, rope_theta, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens)
    ctx.opts = (causal, rope_theta, scale)
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _dlse):
    # _dlse: lse is non-differentiable; nothing flows back through it
    q, k, v, out, lse, kv_lens = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, out, lse, kv_lens, *ctx.opts)
    return dq, dk, dv, None, None, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


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
    """Fused attention; see :func:`fastcap.ops.attention` for the contract.

    Args:
        q: (B, H, Lq, D) fp16, bf16 or fp32, D <= 256; any strides with the last dim contiguous.
        k, v: (B, H, Lk, D), same dtype and device.
        causal: query i sees keys j <= i + (Lk - Lq).
        kv_lens: (B,) integer; keys j >= kv_lens[b] are padding.
        rope_theta: rotate q and k (NeoX rotate-half) in the kernel; key j at position j,
            query i at i + (Lk - Lq).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, H, Lq, D) in q's dtype; rows that see no key are 0, and their gradients are 0.
    """
    rope_theta = None if rope_theta is None else float(rope_theta)
    scale = None if scale is None else float(scale)
    return _attention_fwd_op(q, k, v, kv_lens, bool(causal), rope_theta, scale)[0]


# ----------------------------------------------------------------------------------------------
# Compile-only check (tests/gpu_compile.py)
# ----------------------------------------------------------------------------------------------


def compile_targets(arch: int, dtype: torch.dtype):
    """Every (kernel, tile) the launchers may run on sm_``arch`` in ``dtype``, as the calls they
    make (tensors on the meta device): what tests/gpu_compile.py compiles and checks.

    The variant is the one with the most code (causal, kv_lens and RoPE), at head dims 64, 128
    and 256, the top of each tile-limit range, with a length that is no multiple of 16, as a
    ragged caption batch gives. The tiles are those the pruning keeps within the architecture's
    opt-in shared memory (:data:`fastcap.common.capability.OPTIN_SHARED`); each carries the
    figure the pruning assumed, which the compiled kernel must not exceed. Nothing below sm_80:
    the dispatch refuses Triton attention there (``tl.dot`` has no tensor cores)."""
    if arch < 80:
        return
    limit = OPTIN_SHARED[(arch // 10, arch % 10)]
    B, H, L = 2, 4, 200
    for D in _CHECKED_HEAD_DIMS:
        q = torch.empty(B, H, L, D, dtype=dtype, device="meta")
        lse = torch.empty(B, H, L, dtype=torch.float32, device="meta")
        lens = torch.empty(B, dtype=torch.int32, device="meta")
        args, meta = _launch_args(q, q, q, True, lens, 10000.0, None)
        calls = {
            "fwd": (_fwd_kernel, _FWD_SHAPES, (q, q, q, q, lse)),
            "dkdv": (_bwd_dkdv_kernel, _DKDV_SHAPES, (q, q, q, q, lse, lse, q, q)),
            "dq": (_bwd_dq_kernel, _DQ_SHAPES, (q, q, q, q, lse, lse, q)),
        }
        for name, (kernel, shapes, tensors) in calls.items():
            for m, n, w, s in _reachable(shapes, arch, D, limit):
                yield {
                    "name": f"attention.{name}",
                    "config": f"D{D} {m}x{n} w{w} s{s}",
                    "kernel": kernel,
                    "args": (*tensors, *args),
                    "kwargs": {**meta, "BLOCK_M": m, "BLOCK_N": n, "num_warps": w,
                               "num_stages": s},
                    "shared_estimate": _shared_bytes(name, (m, n, w, s), arch, D,
                                                     q.element_size()),
                }  # fmt: skip
        yield {
            "name": "attention.bwd_delta",
            "config": f"D{D} 64 rows",
            "kernel": _bwd_delta_kernel,
            "args": (q, q, lse, B * H * L),
            "kwargs": {"HEAD_DIM": D, "BLOCK_M": 64, "BLOCK_D": meta["BLOCK_D"]},
        }
