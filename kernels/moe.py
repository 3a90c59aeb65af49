"""Routed SwiGLU experts as Triton grouped GEMMs over expert-aligned blocks of routed pairs.

``moe_align`` (:mod:`fastcap.common.moe_align`) sorts the P = T*k pairs by expert and pads
each expert's segment to a multiple of BLOCK_M, so every block of BLOCK_M slots belongs to one
expert (or is unused: expert id -1, the program exits at once). "Slot" below is a position in
that padded order, "pair" is p = t*k + c. Buffers indexed by slot have S = max_padded rows.

Forward:
  1. gate/up  A[slot] = silu(x[t] @ Wg[e]) * (x[t] @ Wu[e]): x rows are gathered from their
     original positions (no permuted copy of x); both halves of w13 in one program so the SwiGLU
     runs in the epilogue. For backward the pre-activations H = [g, u] are kept as well.
  2. down     Y[pair] = w[pair] * (A[slot] @ W2[e]), one row per pair (no atomics), then
     out = Y.view(T, k, d).sum(1): deterministic.
Backward (dout = dL/dout):
  3. dA_raw[slot] = dout[t] @ W2[e]^T; d w[pair] = <dA_raw, A> (partial sums per column tile,
     reduced in PyTorch); dA = w * dA_raw; dH = [dA * u * silu'(g), dA * silu(g)].
  4. dX[pair] = dH[slot] @ W13[e]^T, then dx = dX.view(T, k, d).sum(1).
  5. dW13[e] = sum over e's slots of x[t]^T dH[slot]; dW2[e] = sum of A[slot]^T (w * dout[t]):
     one program per (expert, output tile) loops over that expert's blocks, so an expert with no
     token costs one store of zeros and no reduction order depends on scheduling.

Memory kept for backward: A (S, f) and H (S, 2f) in x's dtype, the alignment, and the inputs
themselves (the Parameters, as ZeRO-3 needs). BLOCK_M follows the mean rows per expert (16/32/64);
BLOCK_N/BLOCK_K are autotuned on a GPU, among tiles that compile without register spills for
sm_80 and sm_90 (tests/gpu_compile.py): one space when every size and stride is a multiple of
16, a register-lighter one otherwise. None of these choices has been timed on a GPU yet.

``moe_ffn`` aligns with PyTorch (:func:`~fastcap.common.moe_align.moe_align_torch`);
``moe_ffn_cuda`` with the compiled extension ``fastcap_C``, built on first access of the name (a
build failure is a ``RuntimeError`` at that point, so the dispatch's ``auto`` can fall back to
``triton``). An empty batch (T = 0) launches nothing and needs no reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import has_free_unbacked_symbols

from fastcap.common.moe_align import load_extension, max_padded, moe_align

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Tuning spaces, (BLOCK_N, BLOCK_K, warps, stages), two per kernel. When every size and stride
# is a multiple of 16 (or 1), Triton vectorises the loads and streams the tiles through shared
# memory with asynchronous copies: the ALIGNED space. Otherwise each element is loaded on its
# own, with its own 64-bit address, and the next tiles wait in registers; the tiles of the
# aligned space then spill (up to 3,344 bytes of stack, gate-up at 64 x 64 x 64 on sm_80), so
# such shapes get the UNALIGNED space: tiles that fit there. tests/gpu_compile.py compiles both
# for sm_80 and sm_90 (compile_targets) and finds no spill; none has been timed on a GPU.
_GATE_UP_SPACE = {
    "aligned": [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3)],
    # Two fp32 accumulators (gate and up) per tile: 8 warps hold the 64 x 64 tile, or 4 warps a
    # 64 x 32 one.
    "unaligned": [(64, 32, 8, 4), (32, 32, 4, 3)],
}
_DOWN_SPACE = {  # slots_to_pairs: the forward down projection and the backward dx
    "aligned": [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3)],
    "unaligned": [(64, 32, 4, 4), (128, 64, 8, 3)],
}
# The down-projection backward holds A, g and u (BLOCK_M x BLOCK_N each, in fp32) beside its
# accumulator for the SwiGLU backward: the 64 x 128 tile at K 32 on 4 warps spilled 168-440 bytes
# on sm_80 and sm_90 even aligned, so it runs on 8 warps (184 registers); same tile, same bytes
# per FLOP.
_DOWN_BWD_SPACE = {
    "aligned": [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3)],
    "unaligned": [(64, 32, 8, 4)],
}
# The weight gradients, (BLOCK_P, BLOCK_Q, warps, stages): one accumulator, clean either way.
_WGRAD_SPACE = {
    "aligned": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
    "unaligned": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
}
_INTERPRET_CONFIG = (32, 32, 4, 1)  # one small config in the interpreter
_CHECKED_TOKENS = 2047  # compile_targets: BLOCK_M 64, and T * k no multiple of 16


def _aligned(named_args: dict) -> bool:
    """Whether Triton sees every size and stride of the launch as 1 or a multiple of 16 (the
    pair count excepted: it only bounds the rows)."""
    return all(
        v == 1 or v % 16 == 0
        for k, v in named_args.items()
        if k in ("K", "N", "PD", "QD") or k.startswith("stride")
    )


def _tuning(space: dict, names: tuple[str, str], key: list[str], **kw) -> dict:
    """triton.autotune arguments: both spaces' configs, pruned to the one the launch is in."""
    if _INTERPRET:
        p, q, w, s = _INTERPRET_CONFIG
        configs = [triton.Config({names[0]: p, names[1]: q}, num_warps=w, num_stages=s)]
        return {"configs": configs, "key": key, **kw}
    tiles = list(dict.fromkeys(space["aligned"] + space["unaligned"]))
    configs = [
        triton.Config({names[0]: p, names[1]: q}, num_warps=w, num_stages=s) for p, q, w, s in tiles
    ]

    def prune(configs, named_args, **kwargs):
        keep = space["aligned" if _aligned(named_args) else "unaligned"]
        return [c for c in configs if (*c.kwargs.values(), c.num_warps, c.num_stages) in keep]

    return {"configs": configs, "key": key, "prune_configs_by": {"early_config_prune": prune}, **kw}


_NK = ("BLOCK_N", "BLOCK_K")


@triton.autotune(**_tuning(_GATE_UP_SPACE, _NK, ["K", "N", "BLOCK_M"]))
@triton.jit
def _gate_up_kernel(
    x_ptr,  # (T, K) tokens, gathered by row
    w13_ptr,  # (E, K, 2N) gate columns [0, N), up columns [N, 2N)
    sorted_ptr,  # (S,) int32 pair id per slot, P in padding
    expert_ptr,  # (S / BLOCK_M,) int32 expert per block, -1 when unused
    a_ptr,  # (S, N) out: silu(g) * u
    h_ptr,  # (S, 2N) out when SAVE_H: pre-activations [g, u]
    num_pairs,
    K,
    N,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_am,
    stride_hm,
    TOP_K: tl.constexpr,
    SAVE_H: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if e < 0:
        # An unused block: A and H are outputs of the op (saved for backward), so they hold
        # zeros here rather than stale memory. Only these rows are written, not the buffers.
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=a_ptr.dtype.element_ty)
        rows0 = offs_m.to(tl.int64)[:, None]
        tl.store(a_ptr + rows0 * stride_am + offs_n[None, :], zero, mask=n_ok[None, :])
        if SAVE_H:
            h_ptrs0 = h_ptr + rows0 * stride_hm + offs_n[None, :]
            tl.store(h_ptrs0, zero.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])
            tl.store(h_ptrs0 + N, zero.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])
        return
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    tok = (pair // TOP_K).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk
    g_ptrs = w13_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        xb = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(xb, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(xb, wu, acc_u, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    # Padding rows hold g = u = 0, so they store A = 0 and H = 0.
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    rows = offs_m.to(tl.int64)[:, None]
    tl.store(
        a_ptr + rows * stride_am + offs_n[None, :],
        act.to(a_ptr.dtype.element_ty),
        mask=n_ok[None, :],
    )
    if SAVE_H:
        h_ptrs = h_ptr + rows * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])
        tl.store(h_ptrs + N, acc_u.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.autotune(**_tuning(_DOWN_SPACE, _NK, ["K", "N", "BLOCK_M"]))
@triton.jit
def _slots_to_pairs_kernel(
    in_ptr,  # (S, K) slot rows: A (forward down) or dH (backward dx)
    w_ptr,  # (E, ., .) expert weights, read as (K, N) through the strides: W2[e] or W13[e]^T
    scale_ptr,  # (P,) routing weight per pair when HAS_SCALE
    sorted_ptr,  # (S,) int32 pair id per slot
    expert_ptr,  # (S / BLOCK_M,) int32 expert per block
    out_ptr,  # (P, N) out: one row per pair
    num_pairs,
    K,
    N,
    stride_im,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    HAS_SCALE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # Slot rows of a used block are all written by the producer kernel (zeros in padding).
    i_ptrs = in_ptr + offs_m.to(tl.int64)[:, None] * stride_im + offs_k[None, :]
    w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(i_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        i_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_SCALE:
        s = tl.load(scale_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    o_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# dw partials are laid out by BLOCK_N: zero them between the configs the autotuner tries.
@triton.autotune(**_tuning(_DOWN_BWD_SPACE, _NK, ["K", "N", "BLOCK_M"], reset_to_zero=["dw_ptr"]))
@triton.jit
def _down_bwd_kernel(
    dout_ptr,  # (T, K) upstream gradient, gathered by row
    w2_ptr,  # (E, N, K) down projections, read as W2[e]^T (K, N)
    a_ptr,  # (S, N) forward activations silu(g) * u
    h_ptr,  # (S, 2N) forward pre-activations [g, u]
    scale_ptr,  # (P,) routing weights
    sorted_ptr,  # (S,) int32 pair id per slot
    expert_ptr,  # (S / BLOCK_M,) int32 expert per block
    dh_ptr,  # (S, 2N) out: [dg, du]
    dw_ptr,  # (N / BLOCK_N, P) fp32 out when DW: partial d(routing weight) per column tile
    num_pairs,
    K,
    N,
    stride_dt,
    stride_we,
    stride_wn,
    stride_wk,
    stride_am,
    stride_hm,
    stride_dhm,
    TOP_K: tl.constexpr,
    DW: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    d_ptrs = dout_ptr + tok[:, None] * stride_dt + offs_k[None, :]
    w_ptrs = w2_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        g = tl.load(d_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PREC)
        d_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    rows = offs_m.to(tl.int64)[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    if DW:
        # dL/dw[pair] = dout[t] . (A[slot] @ W2[e]) = (dout[t] @ W2[e]^T) . A[slot]
        a = tl.load(a_ptr + rows * stride_am + offs_n[None, :], mask=mask, other=0.0)
        part = tl.sum(acc * a.to(tl.float32), axis=1)
        tl.store(dw_ptr + pid_n * num_pairs + pair, part, mask=row_ok)
    s = tl.load(scale_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    da = acc * s[:, None]
    h_ptrs = h_ptr + rows * stride_hm + offs_n[None, :]
    g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    du = da * silu
    dh_ptrs = dh_ptr + rows * stride_dhm + offs_n[None, :]
    tl.store(dh_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=n_ok[None, :])
    tl.store(dh_ptrs + N, du.to(dh_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.autotune(**_tuning(_WGRAD_SPACE, ("BLOCK_P", "BLOCK_Q"), ["PD", "QD", "BLOCK_M"]))
@triton.jit
def _expert_wgrad_kernel(
    lhs_ptr,  # (T, PD) gathered by token if LHS_GATHER (x), else (S, PD) slot rows (A)
    rhs_ptr,  # (T, QD) gathered by token and scaled if RHS_GATHER (dout), else (S, QD) (dH)
    scale_ptr,  # (P,) routing weights, used when RHS_GATHER
    sorted_ptr,  # (S,) int32 pair id per slot
    blk_ptr,  # (E + 1,) int32 first block of each expert's segment, then the end
    dw_ptr,  # (E, PD, QD) out: sum over the expert's rows of lhs^T rhs
    num_pairs,
    PD,
    QD,
    stride_l,
    stride_r,
    stride_we,
    stride_wp,
    stride_wq,
    TOP_K: tl.constexpr,
    LHS_GATHER: tl.constexpr,
    RHS_GATHER: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    q_tiles = tl.cdiv(QD, BLOCK_Q)
    pid_p = tl.program_id(1) // q_tiles
    pid_q = tl.program_id(1) % q_tiles
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < PD
    q_ok = offs_q < QD
    b_lo = tl.load(blk_ptr + e)
    b_hi = tl.load(blk_ptr + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        row_ok = pair < num_pairs
        tok = (pair // TOP_K).to(tl.int64)
        if LHS_GATHER:
            l_rows = tok
        else:
            l_rows = offs_m.to(tl.int64)
        # lhs loaded transposed, (BLOCK_P, BLOCK_M), so the product needs no tl.trans.
        lt = tl.load(
            lhs_ptr + l_rows[None, :] * stride_l + offs_p[:, None],
            mask=p_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        if RHS_GATHER:
            r = tl.load(
                rhs_ptr + tok[:, None] * stride_r + offs_q[None, :],
                mask=row_ok[:, None] & q_ok[None, :],
                other=0.0,
            )
            s = tl.load(scale_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
            r = (r.to(tl.float32) * s[:, None]).to(lt.dtype)
        else:
            r = tl.load(
                rhs_ptr + offs_m.to(tl.int64)[:, None] * stride_r + offs_q[None, :],
                mask=row_ok[:, None] & q_ok[None, :],
                other=0.0,
            )
        acc = tl.dot(lt, r, acc, input_precision=PREC)
    w_ptrs = dw_ptr + e * stride_we + offs_p[:, None] * stride_wp + offs_q[None, :] * stride_wq
    tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------- host launchers


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: small when experts get few rows (less padding), 64 once they get many."""
    if _INTERPRET:
        return 16
    avg = num_pairs / num_experts
    return 16 if avg < 24 else 32 if avg < 96 else 64


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (as torch.bmm does by default); tf32 would lose 10 bits.
    return "ieee" if dtype == torch.float32 else "tf32"


def _grid_rows(num_blocks: int, n: int):
    return lambda meta: (num_blocks * triton.cdiv(n, meta["BLOCK_N"]),)


def _expert_blocks(topk_ids: Tensor, num_experts: int, block_m: int) -> Tensor:
    """(E + 1,) int32 block boundaries of each expert's segment, without a host sync."""
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    nb = (counts + block_m - 1) // block_m
    return torch.cat([nb.new_zeros(1), torch.cumsum(nb, 0)]).to(torch.int32)


def _launch(kernel, grid, *args, **kwargs) -> None:
    kernel[grid](*args, **kwargs)


def _forward(x, w13, w2, topk_ids, topk_weights, align_impl: str, save: bool, launch=_launch):
    """``launch(kernel, grid, *args, **kwargs)`` runs each kernel; compile_targets records."""
    T, d = x.shape
    E, _, f2 = w13.shape
    f = f2 // 2
    k = topk_ids.shape[1]
    P = T * k
    bm = _block_m(P, E)
    sorted_ids, expert_ids, _ = moe_align(topk_ids, E, bm, impl=align_impl)
    S = sorted_ids.numel()
    nblk = S // bm
    prec = _prec(x.dtype)
    a = x.new_empty(S, f)
    h = x.new_empty(S, f2) if save else a  # unused placeholder when not saving
    launch(
        _gate_up_kernel, _grid_rows(nblk, f),
        x, w13, sorted_ids, expert_ids, a, h, P, d, f,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        a.stride(0), h.stride(0),
        TOP_K=k, SAVE_H=save, PREC=prec, BLOCK_M=bm,
    )  # fmt: skip
    y = x.new_empty(P, d)
    tw = topk_weights.reshape(-1)
    launch(
        _slots_to_pairs_kernel, _grid_rows(nblk, d),
        a, w2, tw, sorted_ids, expert_ids, y, P, f, d,
        a.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        HAS_SCALE=True, PREC=prec, BLOCK_M=bm,
    )  # fmt: skip
    out = y.view(T, k, d).sum(1)
    return out, (sorted_ids, expert_ids, bm, a, h)


def _backward(dout, x, w13, w2, topk_ids, topk_weights, saved, needs, launch=_launch):
    sorted_ids, expert_ids, bm, a, h = saved
    T, d = x.shape
    E, _, f2 = w13.shape
    f = f2 // 2
    k = topk_ids.shape[1]
    P = T * k
    S = sorted_ids.numel()
    nblk = S // bm
    prec = _prec(x.dtype)
    tw = topk_weights.reshape(-1)
    need_x, need_w13, need_w2, need_tw = needs
    dh = x.new_empty(S, f2)
    # Partial sums per column tile; the tile width is the autotuned BLOCK_N, so allocate for the
    # smallest one and let unused tiles stay zero.
    min_bn = min(c.kwargs["BLOCK_N"] for c in _down_bwd_kernel.configs)
    rows = triton.cdiv(f, min_bn) if need_tw else 1
    dw_part = torch.zeros(rows, P if need_tw else 1, dtype=torch.float32, device=x.device)
    launch(
        _down_bwd_kernel, _grid_rows(nblk, f),
        dout, w2, a, h, tw, sorted_ids, expert_ids, dh, dw_part, P, d, f,
        dout.stride(0), w2.stride(0), w2.stride(1), w2.stride(2),
        a.stride(0), h.stride(0), dh.stride(0),
        TOP_K=k, DW=need_tw, PREC=prec, BLOCK_M=bm,
    )  # fmt: skip
    dx = dw13 = dw2 = dtw = None
    if need_tw:
        dtw = dw_part.sum(0).view(T, k).to(topk_weights.dtype)
    if need_x:
        dxp = x.new_empty(P, d)
        launch(
            _slots_to_pairs_kernel, _grid_rows(nblk, d),
            dh, w13, tw, sorted_ids, expert_ids, dxp, P, f2, d,
            dh.stride(0), w13.stride(0), w13.stride(2), w13.stride(1), dxp.stride(0),
            HAS_SCALE=False, PREC=prec, BLOCK_M=bm,
        )  # fmt: skip
        dx = dxp.view(T, k, d).sum(1)
    if need_w13 or need_w2:
        blk = _expert_blocks(topk_ids, E, bm)
    if need_w13:
        dw13 = torch.empty_like(w13)
        grid = lambda m: (E, triton.cdiv(d, m["BLOCK_P"]) * triton.cdiv(f2, m["BLOCK_Q"]))
        launch(
            _expert_wgrad_kernel, grid, x, dh, tw, sorted_ids, blk, dw13, P, d, f2,
            x.stride(0), dh.stride(0), dw13.stride(0), dw13.stride(1), dw13.stride(2),
            TOP_K=k, LHS_GATHER=True, RHS_GATHER=False, PREC=prec, BLOCK_M=bm,
        )  # fmt: skip
    if need_w2:
        dw2 = torch.empty_like(w2)
        grid = lambda m: (E, triton.cdiv(f, m["BLOCK_P"]) * triton.cdiv(d, m["BLOCK_Q"]))
        launch(
            _expert_wgrad_kernel, grid, a, dout, tw, sorted_ids, blk, dw2, P, f, d,
            a.stride(0), dout.stride(0), dw2.stride(0), dw2.stride(1), dw2.stride(2),
            TOP_K=k, LHS_GATHER=False, RHS_GATHER=True, PREC=prec, BLOCK_M=bm,
        )  # fmt: skip
    return dx, dw13, dw2, dtw


# ----------------------------------------------------------------------------- custom ops
# torch.library ops, so that torch.compile traces through moe_ffn without a graph break: the op
# bodies (alignment, Triton launches, autotuning) are opaque to dynamo, and the fake
# implementations give each output's shape, dtype and strides from the sizes alone. The forward
# op returns everything the backward op needs; the backward is an op of its own.


def _empty_outputs(x: Tensor, f: int) -> tuple[Tensor, ...]:
    """The forward op's aux outputs for T = 0: no slot, no block."""
    i32 = dict(dtype=torch.int32, device=x.device)
    return torch.empty(0, **i32), torch.empty(0, **i32), x.new_empty(0, f), x.new_empty(0, 2 * f)


@torch.library.custom_op("fastcap::moe_ffn_fwd", mutates_args=())
def _moe_fwd_op(
    x: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    align_impl: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """out (T, d) in x's dtype, then what backward needs: sorted_ids (S,) and expert_ids
    (S / BLOCK_M,) int32 from moe_align, A (S, f) and H (S, 2f) in x's dtype (H is (0, 2f)
    unless ``save``). S = max_padded(T * k, E, BLOCK_M): sizes only, so the fake can know it."""
    f = w2.shape[1]
    if x.shape[0] == 0:
        # Nothing to route and no block to launch (T is only known here under compile).
        return (x.new_zeros(x.shape), *_empty_outputs(x, f))
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    topk_weights = topk_weights.contiguous()
    out, (sorted_ids, expert_ids, _, a, h) = _forward(
        x, w13, w2, topk_ids, topk_weights, align_impl, save
    )
    return out, sorted_ids, expert_ids, a, h if save else x.new_empty(0, 2 * f)


@_moe_fwd_op.register_fake
def _(x, w13, w2, topk_ids, topk_weights, align_impl, save):
    T, d = x.shape
    E, f = w2.shape[0], w2.shape[1]
    P = T * topk_ids.shape[1]
    if has_free_unbacked_symbols(P):
        # T is data-dependent (the model routes x[valid]): S and the block count are then
        # unknown sizes too (BLOCK_M depends on T * k / E), new unbacked symbols of their own.
        ctx = torch.library.get_ctx()
        S, nblk = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    else:
        bm = _block_m(P, E)
        S = max_padded(P, E, bm)
        nblk = S // bm
    i32 = dict(dtype=torch.int32, device=x.device)
    return (
        x.new_empty(T, d),
        torch.empty(S, **i32),
        torch.empty(nblk, **i32),
        x.new_empty(S, f),
        x.new_empty(S if save else 0, 2 * f),
    )


@torch.library.custom_op("fastcap::moe_ffn_bwd", mutates_args=())
def _moe_bwd_op(
    dout: Tensor,
    x: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    sorted_ids: Tensor,
    expert_ids: Tensor,
    a: Tensor,
    h: Tensor,
    need_x: bool,
    need_w13: bool,
    need_w2: bool,
    need_tw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (T, d), dw13 (E, d, 2f), dw2 (E, f, d), d topk_weights (T, k)), each contiguous in
    its input's dtype; a gradient not asked for is an empty (0,) tensor. The rest are the
    forward op's inputs and aux outputs."""
    needs = (need_x, need_w13, need_w2, need_tw)
    if x.shape[0] == 0:  # the reference's zero gradients (and nothing to launch)
        grads = [x.new_zeros(x.shape), w13.new_zeros(w13.shape), w2.new_zeros(w2.shape)]
        grads.append(topk_weights.new_zeros(topk_weights.shape))
    else:
        if h.shape[0] != a.shape[0]:  # the kernels would read H out of bounds
            raise ValueError("moe_ffn_bwd: needs H, the forward op's output with save=True")
        x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
        topk_weights = topk_weights.contiguous()
        bm = sorted_ids.numel() // expert_ids.numel()
        saved = (sorted_ids, expert_ids, bm, a, h)
        grads = _backward(dout.contiguous(), x, w13, w2, topk_ids, topk_weights, saved, needs)
    return tuple(g if need else x.new_empty(0) for g, need in zip(grads, needs))


@_moe_bwd_op.register_fake
def _(dout, x, w13, w2, topk_ids, topk_weights, sorted_ids, expert_ids, a, h, *needs):
    refs = (x, w13, w2, topk_weights)
    return tuple(
        torch.empty(r.shape if need else (0,), dtype=r.dtype if need else x.dtype, device=x.device)
        for r, need in zip(refs, needs)
    )


def _moe_setup(ctx, inputs, output):
    x, w13, w2, topk_ids, topk_weights, align_impl, save = inputs
    _, sorted_ids, expert_ids, a, h = output
    # The Parameters themselves are saved (ZeRO-3 gathers them again for backward).
    ctx.save_for_backward(x, w13, w2, topk_ids, topk_weights, sorted_ids, expert_ids, a, h)
    ctx.mark_non_differentiable(sorted_ids, expert_ids, a, h)
    ctx.align_impl, ctx.save = align_impl, save


def _moe_backward(ctx, dout, *_aux):
    # _aux: the aux outputs are non-differentiable; nothing flows back through them
    x, w13, w2, topk_ids, topk_weights, sorted_ids, expert_ids, a, h = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4)]
    if not ctx.save:  # the op was called without H (moe_ffn never does that): recompute it
        _, sorted_ids, expert_ids, a, h = _moe_fwd_op(
            x, w13, w2, topk_ids, topk_weights, ctx.align_impl, True
        )
    grads = _moe_bwd_op(
        dout, x, w13, w2, topk_ids, topk_weights, sorted_ids, expert_ids, a, h, *needs
    )
    dx, dw13, dw2, dtw = (g if need else None for g, need in zip(grads, needs))
    return dx, dw13, dw2, None, dtw, None, None


_moe_fwd_op.register_autograd(_moe_backward, setup_context=_moe_setup)


# ----------------------------------------------------------------------------- public


def _moe(x, w13, w2, topk_ids, topk_weights, align_impl: str) -> Tensor:
    # T = 0 is handled inside the ops (a (0, d) output, zero gradients, as the reference gives):
    # under compile T may be a data-dependent size, and a branch on it here would not trace.
    # H is saved only when some input needs a gradient (requires_grad is static under compile).
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w13, w2, topk_weights))
    return _moe_fwd_op(x, w13, w2, topk_ids, topk_weights, align_impl, save)[0]


def moe_ffn(x: Tensor, w13: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """Triton grouped-GEMM MoE FFN, pairs aligned by PyTorch. See :func:`fastcap.ops.moe_ffn`.

    Args:
        x: (T, d). w13: (E, d, 2f). w2: (E, f, d). topk_ids: (T, k) int. topk_weights: (T, k).

    Returns:
        (T, d) in x's dtype; gradients for x, w13, w2 and topk_weights.
    """
    return _moe(x, w13, w2, topk_ids, topk_weights, "torch")


def _moe_ffn_cuda(
    x: Tensor, w13: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> Tensor:
    """As :func:`moe_ffn`, pairs aligned by the compiled extension ``fastcap_C``."""
    return _moe(x, w13, w2, topk_ids, topk_weights, "ext")


def __getattr__(name: str):
    # ``moe_ffn_cuda`` exists only where the extension builds: the dispatch looks the name up,
    # so a build failure surfaces there as RuntimeError (auto falls back, an explicit choice
    # raises with the cause). A build without its CUDA kernel (no CUDA toolkit) still aligns CPU
    # tensors; for CUDA tensors the dispatch asks moe_align.cuda_unavailable as well.
    if name == "moe_ffn_cuda":
        load_extension()
        return _moe_ffn_cuda
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- compile-only check


def compile_targets(arch: int, dtype: torch.dtype):
    """Every (kernel, config) the launchers may run on sm_``arch`` in ``dtype``, as the calls
    they make (tensors on the meta device): what tests/gpu_compile.py compiles and checks.

    Two shapes with every gradient needed: coco-base's MoE (d 768, f 512, 64 experts, top-6),
    aligned, and d 761, f 517, where no size or stride is a multiple of 16 (the unaligned
    space). 2,047 tokens make :func:`_block_m` pick its largest block, 64 rows."""
    # The same spaces on every architecture from sm_80 (the largest tile needs 80 KB of shared
    # memory on sm_80 to sm_89: within the 99 KB of sm_86 / sm_89, which the table checks).
    # Nothing below sm_80: the dispatch refuses the tl.dot kernels there.
    if arch < 80:
        return
    E, k, T = 64, 6, _CHECKED_TOKENS
    calls = []
    record = lambda kernel, grid, *args, **kwargs: calls.append((kernel, args, kwargs))
    meta = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")
    for d, f in ((768, 512), (761, 517)):
        x, w13, w2 = meta(T, d), meta(E, d, 2 * f), meta(E, f, d)
        ids, tw = meta(T, k, dt=torch.int64), meta(T, k, dt=torch.float32)
        _, saved = _forward(x, w13, w2, ids, tw, "torch", True, launch=record)
        _backward(x, x, w13, w2, ids, tw, saved, (True,) * 4, launch=record)
    for kernel, args, kwargs in calls:
        name = kernel.fn.__name__.strip("_").removesuffix("_kernel")
        role = _ROLES.get((name, kwargs.get("HAS_SCALE", kwargs.get("LHS_GATHER"))), "")
        named = dict(zip(kernel.arg_names, args))
        space = "aligned" if _aligned(named) else "unaligned"
        for c in kernel.early_config_prune(kernel.configs, named):
            tile = " ".join(f"{n[-1]}{v}" for n, v in c.kwargs.items())
            yield {
                "name": f"moe.{name}",
                "config": f"BM{kwargs['BLOCK_M']} {tile} w{c.num_warps} s{c.num_stages} "
                          f"{space} {role}".rstrip(),
                "kernel": kernel,
                "args": args,
                "kwargs": {**kwargs, **c.kwargs, "num_warps": c.num_warps,
                           "num_stages": c.num_stages},
            }  # fmt: skip


# What each launch of a shared kernel computes, for the table.
_ROLES = {
    ("slots_to_pairs", True): "(fwd down)",
    ("slots_to_pairs", False): "(bwd dx)",
    ("expert_wgrad", True): "(dw13)",
    ("expert_wgrad", False): "(dw2)",
}
