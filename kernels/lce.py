"""Fused linear cross-entropy: the tied LM head and the token loss in one op, in row chunks.

Computes what :func:`fastcap.ops.ref.lce.linear_cross_entropy` computes,

    loss = sum_{i valid} [(1 - eps) (lse_i - x_i,t_i) + eps (lse_i - mean_j x_ij)] / max(n, 1),

with x = h @ weight.T, lse_i = logsumexp_j x_ij, eps the label smoothing, a row valid when its
target is not ``ignore_index`` and n the count of valid rows (PyTorch's ``cross_entropy`` with
``label_smoothing``, summed, divided by n), without ever holding the (N, V) logits. The design
is Liger-Kernel's FusedLinearCrossEntropy, written anew:

* A host loop over chunks of C rows. Per chunk: x_c = h_c @ weight.T, (C, V) fp32; one Triton
  kernel turns each row of x_c into its loss and overwrites x_c in place with
  g = d loss_i / d x_i = softmax(x_i) - (1 - eps) onehot(t_i) - eps / V (zero for an ignored
  row); then d h_c = g @ weight and d weight += g.T @ h_c, the latter into an fp32 accumulator.
  So the forward produces the loss AND both gradients; backward only multiplies the saved
  gradients by grad_output. Nothing of the inputs is saved: under ZeRO-3 the weight is a
  gathered Parameter, and holding it for backward would keep the gather alive.
* The three products per chunk are torch matmuls (cuBLAS on a GPU): they are ordinary dense
  GEMMs of C x d x V, which cuBLAS runs near peak, and a Triton GEMM would only add tuning. The
  fused part that matters, the softmax over V and the gradient written over the logits, is the
  kernel. Logits are accumulated and kept in fp32 for every input dtype (``out_dtype=fp32`` on
  CUDA; on the CPU half inputs are upcast, which gives the same products exactly). The
  reference instead rounds 16-bit logits to the input dtype before promoting them.
* The 1/n scale is applied on the host to the fp32 GEMM results, not to g: in fp16 g / n would
  lose the small probabilities to underflow (p ~ 1e-5 over n ~ 1e4 rows is below fp16's
  smallest subnormal). For 16-bit inputs g is written in the input dtype into a second buffer
  (cuBLAS needs both operands in one dtype); its entries lie in [-1, 1], so rounding costs only
  their relative precision - in fp16 once they are stored times 2^14 (``G_SCALE_FP16``), which
  keeps entries down to 3.7e-9 out of fp16's subnormal range; 1 / (n 2^14) is applied to the
  fp32 products. n is counted on the device: there is no host synchronisation.
* Loss scaling (fp16 training): the gradients are made in the forward, before the loss scale S
  (grad_output) is known, so they are kept in fp32 and rounded to the inputs' dtype only after
  backward multiplies them by S. Rounding d h / n to fp16 first would flush its small entries
  (d h / n of a 1024-row batch is mostly below fp16's smallest normal, 6.1e-5), which the loss
  scale exists to prevent (tests/test_lce.py, ``test_fp16_loss_scaling_...``).
* The kernel makes two passes over each row in blocks of BLOCK_V: an online max / sum-exp
  (plus the row sum of x when smoothing) for the loss, then exp(x - lse) for the gradient. The
  row loss is written per row and summed by torch; all targets ignored gives n = 0, clamped to
  1, so the loss is 0 and every gradient is 0, not NaN. A target outside [0, V) that is not
  ``ignore_index`` is not checked (that would need a synchronisation): its target logit reads
  as 0 and it gets no one-hot term.
* Chunk size: C = max(next_pow2(d), 2^22 / V rows), at most N. At C ~ d the (C, V) fp32
  logits are the size of the fp32 weight-gradient accumulator (V x d), which this design holds
  anyway, and the weight-gradient GEMM has a reduction depth of C, enough for cuBLAS to run at
  full rate and to amortise the read-modify-write of the accumulator once per chunk. Extra
  memory is thus O(V d + N d), never O(N V). Not yet timed on a GPU.
* ``weight.requires_grad=False`` skips the weight-gradient GEMM and its accumulator;
  ``h.requires_grad=False`` skips the h-gradient GEMM; neither (or grad mode off) skips the
  gradient pass of the kernel too. The saved gradients are fp32 (the weight gradient is the
  fp32 accumulator itself), so between forward and backward the op holds N x d + V x d fp32
  elements (20 MB at V 10240, d 512). With ``retain_graph`` a second backward is correct (the
  saved tensors are scaled out of place); double backward is not supported.

The kernel's blocks: under ``TRITON_INTERPRET=1`` a fixed 16-row x 32-column tile, so CPU tests
run multi-block loops over V; on a GPU one row per program and BLOCK_V up to 4096 (a heuristic,
not yet timed: the kernel streams 12 bytes per logit and is memory bound).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["linear_cross_entropy", "lce_forward", "chunk_rows", "compile_targets"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_BLOCKS = (16, 32)  # (BLOCK_M, BLOCK_V) under the interpreter
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp16 d loss / d logits lies in [-1, 1]; stored times 2^14 its entries down to 3.7e-9 stay
# normal fp16 numbers (6.1e-5 / 2^14) instead of subnormal, and |g| <= 16384 cannot overflow.
G_SCALE_FP16 = 2.0**14

# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _ce_rows_kernel(
    x_ptr,  # (M, V) fp32 logits of this chunk, contiguous; read
    g_ptr,  # (M, V) out, if WRITE_GRAD: d loss_i / d x_i (unscaled), contiguous; may alias x_ptr
    t_ptr,  # (M,) int targets of this chunk
    loss_ptr,  # (M,) fp32 out: the row losses, 0 for an ignored row
    M,
    V,
    ignore_index,
    eps,  # label smoothing
    g_scale,  # the gradient is stored times this (2^14 for fp16: keeps small entries normal)
    SMOOTH: tl.constexpr,  # eps > 0
    WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    row_off = rows.to(tl.int64)[:, None] * V
    t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (t != ignore_index)
    hit = valid & (t >= 0) & (t < V)
    cv = tl.arange(0, BLOCK_V)

    # pass 1: running max, sum of exp(x - max) and (when smoothing) sum of x, per row
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cv
        col_ok = cols < V
        # rows past M read 0 (finite), columns past V read -inf (exp gives 0)
        x = tl.load(x_ptr + row_off + cols[None, :], mask=row_ok[:, None] & col_ok[None, :])
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        if SMOOTH:
            sx += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(x_ptr + rows.to(tl.int64) * V + t, mask=hit, other=0.0)
    loss = lse - x_t
    if SMOOTH:
        loss = (1.0 - eps) * loss + eps * (lse - sx / V)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)

    # pass 2: g = softmax - (1 - eps) onehot - eps / V over the same blocks, written over x
    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cv
            ok = row_ok[:, None] & (cols[None, :] < V)
            x = tl.load(x_ptr + row_off + cols[None, :], mask=ok, other=0.0)
            g = tl.exp(x - lse[:, None])
            g -= tl.where(cols[None, :] == t[:, None], 1.0 - eps, 0.0)
            if SMOOTH:
                g -= eps / V
            g = tl.where(valid[:, None], g * g_scale, 0.0)
            tl.store(g_ptr + row_off + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _kernel_config(V: int, interpret: bool = _INTERPRET) -> dict:
    if interpret:
        bm, bv = _INTERPRET_BLOCKS
        return {"BLOCK_M": bm, "BLOCK_V": bv, "num_warps": 4}
    bv = min(4096, max(128, triton.next_power_of_2(V)))
    return {"BLOCK_M": 1, "BLOCK_V": bv, "num_warps": 8 if bv >= 2048 else 4}


def chunk_rows(N: int, V: int, d: int) -> int:
    """Rows per chunk: about d (so the fp32 logits match the fp32 weight gradient in size),
    more when V is small (at least 2^22 logits per chunk), at most N."""
    return max(1, min(N, max(triton.next_power_of_2(d), (1 << 22) // max(V, 1))))


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b accumulated in fp32 with an fp32 result, for fp32, fp16 or bf16 operands."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU: exact products, fp32 sums, as on the GPU


def _ce_rows(
    x: Tensor, g: Tensor | None, t: Tensor, loss: Tensor, ignore_index, eps, g_scale=1.0
) -> None:
    M, V = x.shape
    cfg = _kernel_config(V)
    _ce_rows_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x,
        x if g is None else g,
        t,
        loss,
        M,
        V,
        ignore_index,
        eps,
        g_scale,
        SMOOTH=eps > 0.0,
        WRITE_GRAD=g is not None,
        **cfg,
    )


def lce_forward(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    *,
    need_h: bool = True,
    need_weight: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The loss and, as asked, both gradients (for grad_output = 1), in one chunked pass.

    Args: as :func:`linear_cross_entropy`; ``need_h`` / ``need_weight`` say which gradients to
    produce; ``chunk_size`` overrides :func:`chunk_rows` (tests, benchmarks).

    Returns:
        loss, 0-d fp32; d loss / d h, (N, d) fp32, or None; d loss / d weight, (V, d) fp32, or
        None. fp32 for every input dtype: the caller scales them by grad_output (an fp16 loss
        scale) before rounding them to the inputs' dtype.
    """
    if h.dtype not in _DTYPES or weight.dtype != h.dtype:
        raise ValueError(
            f"linear_cross_entropy: h and weight must share a dtype among fp32, fp16, bf16; "
            f"got {h.dtype} and {weight.dtype}"
        )
    if not (h.device == weight.device == targets.device):
        raise ValueError(
            f"linear_cross_entropy: h, weight, targets on different devices: {h.device}, "
            f"{weight.device}, {targets.device}"
        )
    h, weight, targets = h.contiguous(), weight.contiguous(), targets.contiguous()
    N, d = h.shape
    V = weight.shape[0]
    eps = float(label_smoothing)
    C = min(chunk_size or chunk_rows(N, V, d), max(N, 1))
    inv_n = 1.0 / (targets != ignore_index).sum().clamp(min=1).float()  # 0-d, on the device
    grad = need_h or need_weight
    # g is stored times g_scale; 1/(n g_scale) is applied to the fp32 products
    g_scale = G_SCALE_FP16 if h.dtype == torch.float16 else 1.0
    row_loss = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty(N, d, dtype=torch.float32, device=h.device) if need_h else None
    grad_w32 = torch.zeros(V, d, dtype=torch.float32, device=h.device) if need_weight else None
    g16 = None  # the 16-bit gradient buffer, one chunk's size, allocated once
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        h_c = h[r0:r1]
        x = _mm32(h_c, weight.T)  # (r1 - r0, V) fp32
        g = None
        if grad:
            if h.dtype == torch.float32:
                g = x  # in place
            else:
                if g16 is None:
                    g16 = torch.empty((C, V), dtype=h.dtype, device=h.device)
                g = g16[: r1 - r0]
        _ce_rows(x, g, targets[r0:r1], row_loss[r0:r1], ignore_index, eps, g_scale)
        if need_h:
            if g.dtype == torch.float32:
                torch.mm(g, weight, out=grad_h[r0:r1])
            else:
                grad_h[r0:r1] = _mm32(g, weight)
        if need_weight:
            if g.dtype == torch.float32:
                grad_w32.addmm_(g.T, h_c)
            else:
                grad_w32 += _mm32(g.T, h_c)
        del x, g
    loss = row_loss.sum() * inv_n
    unscale = inv_n / g_scale
    if need_h:
        grad_h.mul_(unscale)
    if need_weight:
        grad_w32.mul_(unscale)
    return loss, grad_h, grad_w32


# --------------------------------------------------------------------------------------------
# Custom op (torch.library): torch.compile traces through it without a graph break
# --------------------------------------------------------------------------------------------
# The op body (the chunk loop, the kernel, the matmuls) is opaque to dynamo; the fake
# implementation gives the outputs' shapes and dtypes from the inputs' sizes alone. The
# forward op returns the loss and the two gradients for grad_output = 1; the backward only
# scales them, which is plain torch arithmetic that traces as it is, so it needs no op.


@torch.library.custom_op("fastcap::lce_fwd", mutates_args=())
def _lce_fwd_op(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int,
    label_smoothing: float,
    need_h: bool,
    need_weight: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss 0-d fp32, d loss / d h (N, d) fp32, d loss / d weight (V, d) fp32), both
    gradients contiguous; one not asked for is an empty (0,) tensor. The backward scales them
    by grad_output in fp32 and only then rounds to the inputs' dtypes."""
    loss, grad_h, grad_w = lce_forward(
        h,
        weight,
        targets,
        ignore_index,
        label_smoothing,
        need_h=need_h,
        need_weight=need_weight,
        chunk_size=chunk_size,
    )
    # a gradient not asked for: an empty tensor of its own (outputs may not alias each other)
    grad_h = h.new_empty(0, dtype=torch.float32) if grad_h is None else grad_h
    return loss, grad_h, h.new_empty(0, dtype=torch.float32) if grad_w is None else grad_w


@_lce_fwd_op.register_fake
def _(h, weight, targets, ignore_index, label_smoothing, need_h, need_weight, chunk_size):
    f32 = torch.float32
    return (
        h.new_empty((), dtype=f32),
        h.new_empty(h.shape, dtype=f32) if need_h else h.new_empty(0, dtype=f32),
        weight.new_empty(weight.shape, dtype=f32) if need_weight else h.new_empty(0, dtype=f32),
    )


def _lce_setup(ctx, inputs, output):
    need_h, need_w = inputs[5:7]
    _, grad_h, grad_w = output
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    # Only the precomputed gradients are saved, never h or the (ZeRO-3) weight; None, not the
    # empty placeholder, for one not asked for.
    ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)


def _lce_backward(ctx, grad_out, _dgrad_h, _dgrad_w):
    # _dgrad_h, _dgrad_w: the saved gradients are non-differentiable outputs
    grad_h, grad_w = ctx.saved_tensors  # None where need_h / need_weight was False
    # Out of place: a second backward (retain_graph) must see the unscaled gradients. In fp32,
    # rounded to the inputs' dtypes only after grad_out (an fp16 loss scale) multiplied them.
    dt_h, dt_w = ctx.dtypes
    dh = (grad_h * grad_out).to(dt_h) if grad_h is not None else None
    dw = (grad_w * grad_out).to(dt_w) if grad_w is not None else None
    return dh, dw, None, None, None, None, None, None


_lce_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Fused, chunked linear cross-entropy; see :func:`fastcap.ops.linear_cross_entropy`.

    Args:
        h: (N, d) fp32, fp16 or bf16 hidden states.
        weight: (V, d), h's dtype and device.
        targets: (N,) integer class ids in [0, V), or ``ignore_index``.
        ignore_index: rows with this target contribute nothing and are not counted.
        label_smoothing: eps in [0, 1), PyTorch's definition.
        chunk_size: rows per chunk; default :func:`chunk_rows`.

    Returns:
        0-d fp32 loss (0 when every target is ignored). Gradients flow to h and weight, in
        their dtypes; they are computed in the forward.
    """
    grad_on = torch.is_grad_enabled()
    return _lce_fwd_op(
        h,
        weight,
        targets,
        int(ignore_index),
        float(label_smoothing),
        grad_on and h.requires_grad,
        grad_on and weight.requires_grad,
        chunk_size,
    )[0]


# --------------------------------------------------------------------------------------------
# Compile-only check (tests/gpu_compile.py)
# --------------------------------------------------------------------------------------------


def compile_targets(arch: int, dtype: torch.dtype):
    """Every kernel variant the launcher may run on a GPU for ``dtype`` inputs, as the calls it
    makes (tensors on the meta device): what tests/gpu_compile.py compiles and checks. The
    block depends only on V: a small vocabulary (V = 101) and the 4096 cap (V >= 2049); the
    gradient is written in ``dtype`` (fp32 inputs write it in place, which is the same code with
    an fp32 pointer), with and without smoothing, and the loss-only variant (no grad)."""
    del arch  # one config for every architecture
    M = 200
    t = torch.empty(M, dtype=torch.int64, device="meta")
    loss = torch.empty(M, dtype=torch.float32, device="meta")
    for V in (101, 32000):
        x = torch.empty(M, V, dtype=torch.float32, device="meta")
        g = torch.empty(M, V, dtype=dtype, device="meta")
        cfg = _kernel_config(V, interpret=False)
        label = f"V{V} {cfg['BLOCK_M']}x{cfg['BLOCK_V']} w{cfg['num_warps']}"
        for smooth, write in ((True, True), (False, True), (True, False)):
            yield {
                "name": "lce.ce_rows" + ("" if write else "_loss_only"),
                "config": f"{label}{' smooth' if smooth else ''}",
                "kernel": _ce_rows_kernel,
                "args": (x, g, t, loss, M, V, -100, 0.1 if smooth else 0.0, G_SCALE_FP16),
                "kwargs": {"SMOOTH": smooth, "WRITE_GRAD": write, **cfg},
            }
