"""MoE FFN side by side: the seed's loop, a per-expert loop, the vectorised reference,
``torch._grouped_mm``, a dense GEMM of the same FLOPs, and the Triton kernels.

Shapes: DeepSeek-like fine-grained routed experts (d 1024, f 512, E 64, k 6; T 8192 and 32768)
on a GPU, and a small CPU shape (T 512, d 128, f 64, E 16, k 4). DeepSeek's 2 shared experts are
a dense SwiGLU outside ``moe_ffn``, the same cost for every implementation, so they are left out;
TFLOP/s count the routed FLOPs only (``flops.moe_flops``): 6 * T*k * d * f forward, three times
that forward+backward.

Run: ``pytest bench/bench_moe.py --benchmark-only`` (``-k cpu`` for the CPU shape only).
``test_ref_vs_seed_ratio`` measures how much faster the vectorised reference is than the seed's
loop at the CPU shape (median of interleaved pairs, ``conftest.interleaved_ratio``), records
it with its spread in ``extra_info`` and asserts it clears ``RATIO_GATE`` (with a wide margin).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, interleaved_ratio
from flops import moe_flops

from fastcap.common.capability import precision_for
from fastcap.ops.ref.moe import moe_ffn as ref_moe
from fastcap.runs import DTYPES

GPU = DEVICE == "cuda"
# name: (T, d, f, E, k); the cpu shape runs everywhere, the others on a GPU only.
SHAPES = {
    "cpu": (512, 128, 64, 16, 4),
    "dsv-8k": (8192, 1024, 512, 64, 6),
    "dsv-32k": (32768, 1024, 512, 64, 6),
}
# the capability policy's precision for this GPU (bf16 from sm_80, fp16 on a T4)
DTYPE = DTYPES[precision_for("cuda")] if GPU else torch.float32


def group(shape: str, mode: str) -> str:
    """One group per (shape, mode), named like the other bench files: op, shape, mode, dtype."""
    return f"moe {shape} {mode.replace('_', '+')} {str(DTYPE).removeprefix('torch.')}"


# ----------------------------------------------------------------------------- implementations


def seed_loop(x, w13, w2, topk_ids, topk_weights):
    """The seed's approach: a Python loop over experts and, inside, over their tokens, one
    token-vector product at a time; the rows are summed into the output at the end."""
    f = w2.shape[1]
    xs = x.unbind(0)  # one view per token; autograd stacks their gradients once
    rows, toks = [], []
    for e in range(w13.shape[0]):
        w13e, w2e = w13[e], w2[e]
        for t, c in (topk_ids == e).nonzero().tolist():
            h = xs[t] @ w13e
            rows.append(topk_weights[t, c].to(x.dtype) * ((F.silu(h[:f]) * h[f:]) @ w2e))
            toks.append(t)
    tok = torch.tensor(toks, dtype=torch.long, device=x.device)
    return torch.zeros_like(x).index_add(0, tok, torch.stack(rows))


def per_expert_loop(x, w13, w2, topk_ids, topk_weights):
    """One gather + two matmuls + one scatter per expert, looping over experts in Python."""
    f = w2.shape[1]
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, c = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e]
        y = (F.silu(h[:, :f]) * h[:, f:]) @ w2[e]
        out = out.index_add(0, tok, y * topk_weights[tok, c, None].to(x.dtype))
    return out


def grouped_mm(x, w13, w2, topk_ids, topk_weights):
    """torch._grouped_mm over the expert-sorted (permuted) copy of x, as torchtitan does."""
    f = w2.shape[1]
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w13, offs=offs)  # (P, 2f)
    y = torch._grouped_mm(F.silu(h[:, :f]) * h[:, f:], w2, offs=offs)  # (P, d)
    wts = topk_weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, tok, y * wts)


def triton_moe(*args):
    from fastcap.kernels.moe import moe_ffn

    return moe_ffn(*args)


def triton_moe_cuda(*args):
    from fastcap.kernels import moe

    return moe.moe_ffn_cuda(*args)


IMPLS = {
    "seed_loop": seed_loop,
    "per_expert_loop": per_expert_loop,
    "vectorised_ref": ref_moe,
    "grouped_mm": grouped_mm,
    "triton": triton_moe,
    "triton+ext_align": triton_moe_cuda,
}


def skip_reason(impl: str, shape: str) -> str | None:
    if shape != "cpu" and not GPU:
        return "GPU shape: needs a CUDA GPU"
    if impl.startswith("triton") and not GPU:
        return "Triton on CPU runs in the interpreter; its timing means nothing"
    if impl == "seed_loop" and shape == "dsv-32k":
        return "seed loop: ~200k Python iterations per call at T=32768, minutes per benchmark"
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        return "this torch build has no torch._grouped_mm"
    return None


# ----------------------------------------------------------------------------- inputs and steps


def make_inputs(shape: str, dtype: torch.dtype):
    T, d, f, E, k = SHAPES[shape]

    def make():
        x = torch.randn(T, d, device=DEVICE, dtype=dtype, requires_grad=True)
        w13 = (torch.randn(E, d, 2 * f, device=DEVICE) / d**0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(E, f, d, device=DEVICE) / f**0.5).to(dtype).requires_grad_()
        logits = torch.randn(T, E, device=DEVICE)
        topk_weights, topk_ids = logits.softmax(-1).topk(k, dim=-1)
        dout = torch.randn(T, d, device=DEVICE, dtype=dtype)
        return x, w13, w2, topk_ids, topk_weights.requires_grad_(), dout

    return make


def fwd(fn):
    def step(x, w13, w2, ids, tw, dout):
        with torch.no_grad():
            return fn(x, w13, w2, ids, tw)

    return step


def fwd_bwd(fn):
    def step(x, w13, w2, ids, tw, dout):
        out = fn(x, w13, w2, ids, tw)
        return torch.autograd.grad(out, (x, w13, w2, tw), dout)

    return step


def routed_flops(shape: str, mode: str) -> float:
    T, d, f, E, k = SHAPES[shape]
    return moe_flops(T, d, f, k, backward=mode == "fwd_bwd")


# ----------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe(measure, shape, impl, mode):
    why = skip_reason(impl, shape)
    if why:
        pytest.skip(why)
    # torch._grouped_mm on the CPU is bf16 only.
    dtype = torch.bfloat16 if impl == "grouped_mm" else DTYPE
    step = (fwd if mode == "fwd" else fwd_bwd)(IMPLS[impl])
    rounds = 3 if impl == "seed_loop" else 5
    # an implementation run in another dtype than its group says so in its name
    label = impl if dtype == DTYPE else f"{impl} ({str(dtype).removeprefix('torch.')})"
    measure(step, make_inputs(shape, dtype), group=group(shape, mode), impl=label,
            flops=routed_flops(shape, mode), rounds=rounds)  # fmt: skip


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dense_gemm_same_flops(measure, shape, mode):
    """The roofline to aim at: (T*k, d) @ (d, 3f) has the routed forward's FLOPs; forward+
    backward adds the two gradient GEMMs."""
    if shape != "cpu" and not GPU:
        pytest.skip("GPU shape: needs a CUDA GPU")
    T, d, f, E, k = SHAPES[shape]

    def make():
        a = torch.randn(T * k, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
        b = torch.randn(d, 3 * f, device=DEVICE, dtype=DTYPE, requires_grad=True)
        return a, b, torch.randn(T * k, 3 * f, device=DEVICE, dtype=DTYPE)

    def step(a, b, g):
        if mode == "fwd":
            with torch.no_grad():
                return a @ b
        return torch.autograd.grad(a @ b, (a, b), g)

    measure(step, make, group=group(shape, mode), impl="dense_gemm_same_flops",
            flops=routed_flops(shape, mode))  # fmt: skip


# Gates of test_ref_vs_seed_ratio: the median of 11 interleaved (seed, ref) pairs, one thread.
# Measured 2026-12-01 on the shared 2-core CPU (load average 1.2-3.2), 8 runs per mode:
#   fwd      medians 10.6x-18.7x (single pairs 8.7x-26.9x)
#   fwd+bwd  medians 38.7x-67.1x (single pairs 37.3x-91.4x)
# Each gate sits about 2x under the lowest median, so load does not fail it, while a reference
# that fell back to a loop over tokens (the seed's way, 1x) does. (A loop over experts would
# pass: per_expert_loop is within 2x of the reference at this shape; test_moe shows it.) The
# old gate, 20x on forward from one seed run against a median of three ref runs, sat above
# what forward measures here: it failed at 13.2x and passed at 31x on other runs.
RATIO_GATE = {"fwd": 5.0, "fwd_bwd": 20.0}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_ref_vs_seed_ratio(measure, benchmark, mode):
    """At the CPU shape the vectorised reference must beat the seed's loop by RATIO_GATE[mode].

    The ratio is :func:`conftest.interleaved_ratio`'s: the median of per-pair ratios over
    interleaved rounds, each sample at least 0.1 s, on one intra-op thread (with two threads
    on the shared 2-core machine at a load average of 4, calls ran 10-35x slower at random and
    single pairs ranged from 5x to 1,200x); ``measure`` records the reference's own timing."""
    make = make_inputs("cpu", DTYPE)
    wrap = fwd if mode == "fwd" else fwd_bwd
    seed_fn, ref_fn = wrap(seed_loop), wrap(ref_moe)
    if measure(ref_fn, make, group=group("cpu", mode) + " ratio", impl="vectorised_ref",
               flops=routed_flops("cpu", mode)) is None:  # fmt: skip
        pytest.skip("benchmarks disabled: nothing timed")
    r = interleaved_ratio(seed_fn, ref_fn, make(), threads=1)
    benchmark.extra_info["seed_loop_s"] = round(r["slow_s"], 5)
    benchmark.extra_info["ref_interleaved_s"] = round(r["fast_s"], 6)
    benchmark.extra_info["seed_over_ref"] = round(r["median"], 1)
    spread = {k: round(r[k], 1) for k in ("min", "q1", "q3", "max")}
    benchmark.extra_info["seed_over_ref_spread"] = spread
    print(f"\nmoe cpu {mode}, 1 thread: seed loop {r['slow_s'] * 1e3:.1f} ms, vectorised ref "
          f"{r['fast_s'] * 1e3:.2f} ms, median of {r['pairs']} pairs {r['median']:.1f}x "
          f"(min {r['min']:.1f}, quartiles {r['q1']:.1f}-{r['q3']:.1f}, "
          f"max {r['max']:.1f})")  # fmt: skip
    gate = RATIO_GATE[mode]
    assert r["median"] >= gate, (
        f"vectorised reference only {r['median']:.1f}x faster than the seed loop (gate {gate}x)"
    )
