"""Fused sigmoid contrastive (SigLIP) loss in Triton: the (M, N) logits never reach memory.

The loss over image rows i and text columns j is

    L = sum_ij softplus(-z_ij * x_ij) / denom,    x_ij = exp(logit_scale) * img_i . txt_j + bias,

with z_ij = +1 where j == i + offset (the positive pair) and -1 elsewhere; softplus(-z x) is
-log sigmoid(z x). The single-process loss is (M = N = B, offset 0, denom B); the multi-rank
form (:mod:`fastcap.ops.siglip_dist`) uses a rank's local images against every rank's texts.

Forward: each program tiles BM image rows against a range of text columns, forms the logits
tile in registers (fp32 accumulation for any input dtype), applies a stable softplus and writes
one fp32 partial sum. Backward recomputes the tiles. With p_ij = d softplus(-z x)/dx =
-z sigmoid(-z x):

    d img_i = t/denom * sum_j p_ij txt_j,   d txt_j = t/denom * sum_i p_ij img_i,
    d logit_scale = t/denom * sum_ij p_ij (img_i . txt_j),   d bias = 1/denom * sum_ij p_ij.

The loss is symmetric under swapping the roles of images and texts (with offset -> -offset),
so one kernel produces both d img (a pass over image rows) and d txt (a pass over text rows);
each program owns its output rows, so there are no atomics and the result is bit-for-bit
deterministic. The price is one extra recompute of the dot products (backward costs four
B x B x d products instead of three). The scalar gradients are written as per-program partials
and summed in a fixed order on the host. Extra memory: the gradients, O(B * d), plus O(B / BM)
partials; nothing of size B x B is allocated. A width that is no multiple of 16 is zero-padded
to one first, so that the kernels' loads vectorise (:func:`_pad_width`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _softplus(y):
    # softplus(y) = max(y, 0) + log1p(exp(-|y|)). log1p via Goldberg's trick (exact to a few
    # ulp): log(1 + e) loses everything once e < 2^-24, which is every negative pair when the
    # bias is very negative; Triton's interpreter has no log1p.
    e = tl.exp(-tl.abs(y))
    u = 1.0 + e
    tiny = u == 1.0
    l1p = tl.where(tiny, e, tl.log(u) * (e / tl.where(tiny, 1.0, u - 1.0)))
    return tl.maximum(y, 0.0) + l1p


@triton.jit
def _sigmoid(y):
    # Both branches use exp(-|y|) <= 1, so nothing overflows for |y| up to fp32's range.
    e = tl.exp(-tl.abs(y))
    return tl.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _dot_tile(
    row_ptr,  # (M, D) row-side embeddings, contiguous
    col_ptr,  # (N, D) column-side embeddings, contiguous
    rows,  # (BM,) int row indices of this tile
    cols,  # (BN,) int column indices of this tile
    M,
    N,
    D,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BM, BN) fp32 tile of row . col; out-of-range rows/columns read as zero vectors."""
    rk = tl.arange(0, BK)
    row_off = rows.to(tl.int64)[:, None] * D
    col_off = cols.to(tl.int64)[:, None] * D
    s = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + rk
        a = tl.load(
            row_ptr + row_off + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < D), other=0.0
        )
        c = tl.load(
            col_ptr + col_off + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < D), other=0.0
        )
        s = tl.dot(a, tl.trans(c), s, input_precision=PRECISION)
    return s


@triton.jit
def _siglip_fwd_kernel(
    row_ptr,  # (M, D) image embeddings, contiguous
    col_ptr,  # (N, D) text embeddings, contiguous
    scale_ptr,  # () logit_scale = log t
    bias_ptr,  # () logit_bias b
    part_ptr,  # (cdiv(M, BM) * SPLIT,) fp32 out: this program's sum of softplus(-z x)
    M,
    N,
    D,
    offset,  # positives sit at column row + offset
    blocks_per_split,  # column blocks each program along axis 1 covers
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = tl.exp(tl.load(scale_ptr).to(tl.float32))
    b = tl.load(bias_ptr).to(tl.float32)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    n_lo = pid_s * blocks_per_split * BN
    n_hi = tl.minimum(N, n_lo + blocks_per_split * BN)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BN):
        cols = n0 + tl.arange(0, BN)
        s = _dot_tile(row_ptr, col_ptr, rows, cols, M, N, D, BM, BN, BK, PRECISION)
        x = t * s + b
        pos = cols[None, :] == rows[:, None] + offset
        loss = _softplus(tl.where(pos, -x, x))
        loss = tl.where(row_ok[:, None] & (cols[None, :] < N), loss, 0.0)
        acc += tl.sum(loss, axis=1)
    tl.store(part_ptr + pid_m * SPLIT + pid_s, tl.sum(acc, axis=0))


@triton.jit
def _siglip_bwd_kernel(
    row_ptr,  # (M, D) embeddings whose gradient this pass writes, contiguous
    col_ptr,  # (N, D) the other side's embeddings, contiguous
    scale_ptr,  # () logit_scale = log t
    bias_ptr,  # () logit_bias b
    grad_ptr,  # () upstream gradient of the loss
    drow_ptr,  # (M, D) out: gradient of row_ptr, in its dtype
    dt_ptr,  # (cdiv(M, BM),) fp32 out, if PARTIALS: sum of p * (row . col) over the program
    db_ptr,  # (cdiv(M, BM),) fp32 out, if PARTIALS: sum of p over the program
    M,
    N,
    D,
    offset,  # positives sit at column row + offset
    inv_denom,  # 1 / the loss normaliser
    PARTIALS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    t = tl.exp(tl.load(scale_ptr).to(tl.float32))
    b = tl.load(bias_ptr).to(tl.float32)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rd = tl.arange(0, BD)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    dt = tl.zeros((BM,), dtype=tl.float32)
    db = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < N
        s = _dot_tile(row_ptr, col_ptr, rows, cols, M, N, D, BM, BN, BK, PRECISION)
        x = t * s + b
        pos = cols[None, :] == rows[:, None] + offset
        sig = _sigmoid(tl.where(pos, -x, x))
        # p = -z * sigmoid(-z x), in [-1, 1]; the 1/denom stays out of the loop so that p
        # cast to fp16 stays a normal number at any batch size.
        p = tl.where(pos, -sig, sig)
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        if PARTIALS:
            dt += tl.sum(p * s, axis=1)
            db += tl.sum(p, axis=1)
        c = tl.load(
            col_ptr + cols.to(tl.int64)[:, None] * D + rd[None, :],
            mask=col_ok[:, None] & (rd[None, :] < D),
            other=0.0,
        )
        acc = tl.dot(p.to(c.dtype), c, acc, input_precision=PRECISION)
    g = tl.load(grad_ptr).to(tl.float32) * inv_denom
    acc = acc * (t * g)
    tl.store(
        drow_ptr + rows.to(tl.int64)[:, None] * D + rd[None, :],
        acc.to(drow_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (rd[None, :] < D),
    )
    if PARTIALS:
        tl.store(dt_ptr + pid_m, tl.sum(dt, axis=0) * (t * g))
        tl.store(db_ptr + pid_m, tl.sum(db, axis=0) * g)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


_CHECKED_WIDTHS = (128, 256, 512, 768, 1024)  # compile_targets


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three TF32 products (~fp32 accuracy on tensor cores). Plain TF32 would put
    # a 1e-3 relative error on the dot, i.e. 0.1 absolute on the logits at t = 100.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _fwd_config(D: int, dtype: torch.dtype) -> dict:
    bk = 32 if dtype == torch.float32 else 64
    bk = min(bk, max(16, triton.next_power_of_2(D)))
    stages = 2 if dtype == torch.float32 else 3
    return {"BM": 128, "BN": 64, "BK": bk, "num_warps": 8, "num_stages": stages}


def _bwd_config(D: int, dtype: torch.dtype) -> dict:
    bd = max(16, triton.next_power_of_2(D))
    # The (BM, BD) fp32 accumulator lives in registers: keep it <= 64 KiB per program. The full
    # (BN, BD) column tile is staged once per step: keep it <= 64 KiB of shared memory.
    bm = max(16, min(64, 16384 // bd))
    bn = max(16, min(64, 65536 // (bd * torch.finfo(dtype).bits // 8)))
    bk = min(32 if dtype == torch.float32 else 64, bd)
    warps = 8 if bd >= 256 else 4
    return {"BM": bm, "BN": bn, "BK": bk, "BD": bd, "num_warps": warps, "num_stages": 2}


def _col_split(grid_m: int, n_blocks: int, device: torch.device) -> int:
    """Programs along the column axis: enough to fill the GPU twice when rows alone do not."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, grid_m)
    else:
        want = 2  # the interpreter: exercise the split path at no cost
    return max(1, min(want, n_blocks))


def _launch(kernel, grid, *args, **kwargs) -> None:
    kernel[grid](*args, **kwargs)


def _siglip_fwd(img, txt, logit_scale, logit_bias, offset: int, denom: float, launch=_launch):
    """``launch(kernel, grid, *args, **kwargs)`` runs the kernel; compile_targets records."""
    M, D = img.shape
    N = txt.shape[0]
    cfg = _fwd_config(D, img.dtype)
    grid_m = triton.cdiv(M, cfg["BM"])
    n_blocks = triton.cdiv(N, cfg["BN"])
    split = _col_split(grid_m, n_blocks, img.device)
    per = triton.cdiv(n_blocks, split)
    part = torch.empty(grid_m * split, dtype=torch.float32, device=img.device)
    launch(
        _siglip_fwd_kernel,
        (grid_m, split),
        img,
        txt,
        logit_scale,
        logit_bias,
        part,
        M,
        N,
        D,
        offset,
        per,
        SPLIT=split,
        PRECISION=_precision(img.dtype),
        **cfg,
    )
    return part.sum() / denom


def _siglip_bwd_pass(
    rows, cols, logit_scale, logit_bias, grad, offset, denom, partials, launch=_launch
):
    M, D = rows.shape
    N = cols.shape[0]
    cfg = _bwd_config(D, rows.dtype)
    grid_m = triton.cdiv(M, cfg["BM"])
    d_rows = torch.empty_like(rows)
    dt = torch.empty(grid_m if partials else 1, dtype=torch.float32, device=rows.device)
    db = torch.empty_like(dt)
    launch(
        _siglip_bwd_kernel,
        (grid_m,),
        rows,
        cols,
        logit_scale,
        logit_bias,
        grad,
        d_rows,
        dt,
        db,
        M,
        N,
        D,
        offset,
        1.0 / denom,
        PARTIALS=partials,
        PRECISION=_precision(rows.dtype),
        **cfg,
    )
    return d_rows, dt, db


# --------------------------------------------------------------------------------------------
# Width padding
# --------------------------------------------------------------------------------------------


def _pad_width(x: Tensor) -> Tensor:
    """x (B, d), contiguous, its width zero-padded to a multiple of 16 (zeros change no dot
    product). The kernels then see a row stride Triton knows to be a multiple of 16 and load in
    16-byte vectors. At any other width each element is loaded on its own, with its own address:
    there the backward's config spilled at every width (up to 1,408 bytes of stack on sm_90,
    ``tests/gpu_compile.py --unaligned``), and no smaller tile tried fitted at every width. The
    copy is O(B d), against the loss's O(B^2 d)."""
    pad = -x.shape[1] % 16
    return torch.nn.functional.pad(x, (0, pad)) if pad else x.contiguous()


# --------------------------------------------------------------------------------------------
# Custom ops (torch.library): torch.compile traces through them without a graph break
# --------------------------------------------------------------------------------------------
# The op bodies (padding, launches, host sums) are opaque to dynamo; the fake implementations
# give the outputs' shapes, dtypes and strides from the inputs' sizes alone. offset and denom
# are schema arguments. Nothing but the inputs is saved: the backward op pads them again
# (O(B d), against the loss's O(B^2 d)), so no output of the forward aliases an input.


def _check_devices(img, txt, logit_scale, logit_bias) -> None:
    # the kernel reads the two scalars through pointers: a CPU scalar beside CUDA embeddings
    # would be an illegal address, not an error
    if not (img.device == txt.device == logit_scale.device == logit_bias.device):
        raise ValueError(
            f"siglip_loss: all four inputs must share a device; got img {img.device}, txt "
            f"{txt.device}, logit_scale {logit_scale.device}, logit_bias {logit_bias.device}"
        )


@torch.library.custom_op("fastcap::siglip_fwd", mutates_args=())
def _siglip_fwd_op(
    img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor, offset: int, denom: float
) -> Tensor:
    """The 0-d fp32 loss of images (M, d) against texts (N, d), positives at j = i + offset."""
    _check_devices(img, txt, logit_scale, logit_bias)
    return _siglip_fwd(_pad_width(img), _pad_width(txt), logit_scale, logit_bias, offset, denom)


@_siglip_fwd_op.register_fake
def _(img, txt, logit_scale, logit_bias, offset, denom):
    return img.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastcap::siglip_bwd", mutates_args=())
def _siglip_bwd_op(
    grad: Tensor,
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    offset: int,
    denom: float,
    rows: bool,
    cols: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d img (M, d), d txt (N, d), d logit_scale, d logit_bias (0-d, their dtypes)).

    ``rows``: the pass over image rows, which gives d img and both scalar gradients; ``cols``:
    the pass over text rows, for d txt. A pass not run gives empty (0,) tensors. The two
    embedding gradients are column slices [:, :d] of a width padded to a multiple of 16, so
    their row stride is that padded width (:func:`_grad_rows_like`)."""
    grad = grad.float().contiguous()
    width = img.shape[1]
    img, txt = _pad_width(img), _pad_width(txt)
    # a pass not run: one empty tensor per output (outputs may not alias each other)
    d_img, d_txt, d_scale, d_bias = (img.new_empty(0) for _ in range(4))
    if rows:
        d_img, dt, db = _siglip_bwd_pass(
            img, txt, logit_scale, logit_bias, grad, offset, denom, partials=True
        )
        d_img = d_img[:, :width]
        d_scale = dt.sum().to(logit_scale.dtype)
        d_bias = db.sum().to(logit_bias.dtype)
    if cols:
        # transposed problem: text j is positive with image j - offset
        d_txt, _, _ = _siglip_bwd_pass(
            txt, img, logit_scale, logit_bias, grad, -offset, denom, partials=False
        )
        d_txt = d_txt[:, :width]
    return d_img, d_txt, d_scale, d_bias


def _grad_rows_like(x: Tensor) -> Tensor:
    """An empty (B, d) in x's dtype with the row stride of the padded width, as the backward
    op returns its embedding gradients."""
    B, d = x.shape
    return torch.empty_strided((B, d), (d + (-d % 16), 1), dtype=x.dtype, device=x.device)


@_siglip_bwd_op.register_fake
def _(grad, img, txt, logit_scale, logit_bias, offset, denom, rows, cols):
    none = lambda: img.new_empty(0)
    return (
        _grad_rows_like(img) if rows else none(),
        _grad_rows_like(txt) if cols else none(),
        logit_scale.new_empty(()) if rows else none(),
        logit_bias.new_empty(()) if rows else none(),
    )


def _siglip_setup(ctx, inputs, output):
    img, txt, logit_scale, logit_bias, offset, denom = inputs
    # The Parameters themselves are saved (ZeRO-3 gathers them again for backward).
    ctx.save_for_backward(img, txt, logit_scale, logit_bias)
    ctx.offset, ctx.denom = offset, denom


def _siglip_backward(ctx, grad):
    img, txt, logit_scale, logit_bias = ctx.saved_tensors
    need_img, need_txt, need_scale, need_bias = ctx.needs_input_grad[:4]
    rows = need_img or need_scale or need_bias
    d_img, d_txt, d_scale, d_bias = _siglip_bwd_op(
        grad, img, txt, logit_scale, logit_bias, ctx.offset, ctx.denom, rows, need_txt
    )
    return (
        d_img if need_img else None,
        d_txt if need_txt else None,
        d_scale if need_scale else None,
        d_bias if need_bias else None,
        None,
        None,
    )


_siglip_fwd_op.register_autograd(_siglip_backward, setup_context=_siglip_setup)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def siglip_loss_rect(
    img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor, offset: int, denom: float
) -> Tensor:
    """Rectangular SigLIP loss: images (M, d) against texts (N, d), M + offset <= N.

    Image i's positive is text i + offset; the sum over all M x N pairs of -log sigmoid(z x) is
    divided by ``denom``. Returns a 0-d fp32 tensor; gradients flow to all four inputs.
    """
    if offset < 0 or img.shape[0] + offset > txt.shape[0]:
        raise ValueError(
            f"siglip_loss_rect: need 0 <= offset and M + offset <= N; got "
            f"M={img.shape[0]}, N={txt.shape[0]}, offset={offset}"
        )
    return _siglip_fwd_op(img, txt, logit_scale, logit_bias, int(offset), float(denom))


def siglip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """See :func:`fastcap.ops.siglip_loss`: img, txt (B, d); 0-d scale and bias; 0-d fp32 loss."""
    return _siglip_fwd_op(img, txt, logit_scale, logit_bias, 0, float(img.shape[0]))


# --------------------------------------------------------------------------------------------
# Compile-only check (tests/gpu_compile.py)
# --------------------------------------------------------------------------------------------


def compile_targets(arch: int, dtype: torch.dtype):
    """The kernels as the launchers call them on sm_``arch`` in ``dtype`` (tensors on the meta
    device), at embedding widths 128 .. 1024: what tests/gpu_compile.py compiles and checks.
    The launchers pick one config per (width, dtype), the same on every architecture; a width
    that is no multiple of 16 reaches the kernels padded to one (:func:`_pad_width`). That one
    config needs at most 68 KB of shared memory on sm_80 to sm_89 (the table's sm_86 / sm_89 rows
    check it against their 99 KB), so no pruning by shared memory is needed. Nothing below
    sm_80: the dispatch refuses the tl.dot kernels there."""
    if arch < 80:
        return
    B = 512
    calls = []
    record = lambda kernel, grid, *args, **kwargs: calls.append((kernel, args, kwargs))
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    for D in _CHECKED_WIDTHS:
        img = torch.empty(B, D, dtype=dtype, device="meta")
        _siglip_fwd(img, img, scalar, scalar, 0, float(B), launch=record)
        for partials in (True, False):
            _siglip_bwd_pass(img, img, scalar, scalar, scalar, 0, B, partials, launch=record)
    for kernel, args, kwargs in calls:
        name = kernel.fn.__name__.removeprefix("_siglip_").removesuffix("_kernel")
        cfg = " ".join(f"{k}{v}" for k, v in kwargs.items() if k.startswith("B"))
        extra = f" partials={kwargs['PARTIALS']:d}" if "PARTIALS" in kwargs else ""
        opts = f"w{kwargs['num_warps']} s{kwargs['num_stages']}"
        yield {
            "name": f"siglip.{name}",
            "config": f"D{args[0].shape[1]} {cfg} {opts}{extra}",
            "kernel": kernel,
            "args": args,
            "kwargs": kwargs,
        }
