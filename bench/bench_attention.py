"""Attention side by side: the Triton kernel, the reference, and SDPA with RoPE applied apart.

Run: ``python -m pytest bench/bench_attention.py --benchmark-only -q``.

TFLOP/s use the standard count (``flops.attention_flops``): forward 4 * B * H * Lq * Lk * D
(halved when causal), backward 2.5x forward, so forward + backward is 3.5x. Peak memory is in
``extra_info``.

On a GPU every implementation runs in bf16 at the issue's shapes. On a CPU only the reference
and SDPA run, in fp32, at the captioning shapes with the batch cut from 256 to 32 so each case
takes seconds on two cores (the group name says so); the Triton kernel and the long shape are
GPU-only (the interpreter is a correctness tool, not a performance path).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flops import attention_flops

from fastcap.common.capability import precision_for
from fastcap.common.rope import rope_cos_sin
from fastcap.ops.ref.attention import attention as ref_attention
from fastcap.ops.ref.rope import apply_rope
from fastcap.runs import DTYPES

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the capability policy's precision for this GPU (bf16 from sm_80, fp16 on a T4)
DTYPE = DTYPES[precision_for("cuda")] if CUDA else torch.float32
THETA = 10000.0
CPU_BATCH = 32

# name: (B, H, Lq, Lk, D, causal, rope, ragged kv_lens)
SHAPES = {
    "caption_self_32": (256, 8, 32, 32, 64, True, True, True),
    "caption_cross_32x64": (256, 8, 32, 64, 64, False, False, False),
    "caption_cross_32x196": (256, 8, 32, 196, 64, False, False, False),
    "long_4096": (4, 16, 4096, 4096, 128, True, True, False),
}


def _triton_attention(q, k, v, *, causal, kv_lens, rope_theta):
    from fastcap.kernels.attention import attention

    return attention(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta)


_ROPE_TABLES: dict = {}


def _sdpa_rope(q, k, v, *, causal, kv_lens, rope_theta):
    """PyTorch's fused SDPA (flash backend when it can) after a separate RoPE pass.

    Right padding needs no mask under causal self-attention: a real query i < kv_len only sees
    keys j <= i, all real; the padded rows differ but nobody reads them. Cross-attention here
    has no padding. So ``is_causal`` alone keeps SDPA on its flash path.
    """
    assert kv_lens is None or causal
    if rope_theta is not None:
        Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
        key = (Lk, D, q.device)
        if key not in _ROPE_TABLES:  # a model caches its tables; building them is not the op
            _ROPE_TABLES[key] = rope_cos_sin(torch.arange(Lk, device=q.device), D, rope_theta)
        cos, sin = _ROPE_TABLES[key]
        q, k = apply_rope(q, cos[Lk - Lq :], sin[Lk - Lq :]), apply_rope(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


IMPLS = {"triton": _triton_attention, "ref": ref_attention, "sdpa+rope": _sdpa_rope}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(measure, shape, impl, mode):
    B, H, Lq, Lk, D, causal, rope, ragged = SHAPES[shape]
    if not CUDA:
        if impl == "triton":
            pytest.skip("the Triton kernel is benchmarked on a GPU only (interpreter on CPU)")
        if shape.startswith("long"):
            pytest.skip("the long shape needs a GPU")
        B = CPU_BATCH
    fn = IMPLS[impl]
    kw = {"causal": causal, "rope_theta": THETA if rope else None}
    grad = mode == "fwd+bwd"

    def make_inputs():
        q, k, v = (
            torch.randn(B, H, L, D, device=DEVICE, dtype=DTYPE, requires_grad=grad)
            for L in (Lq, Lk, Lk)
        )
        do = torch.randn(B, H, Lq, D, device=DEVICE, dtype=DTYPE)
        # Captions of random length, at least one token: the text self-attention's padding.
        lens = torch.randint(1, Lk + 1, (B,), device=DEVICE) if ragged else None
        return q, k, v, do, lens

    if grad:

        def run(q, k, v, do, lens):
            out = fn(q, k, v, kv_lens=lens, **kw)
            return torch.autograd.grad(out, (q, k, v), do)
    else:

        def run(q, k, v, do, lens):
            with torch.no_grad():
                return fn(q, k, v, kv_lens=lens, **kw)

    where = f"B={B} (CPU; B=256 on GPU)" if not CUDA else f"B={B}"
    group = f"attention {shape} {mode} {where} {str(DTYPE).removeprefix('torch.')}"
    flops = attention_flops(B, H, Lq, Lk, D, causal, backward=grad)
    measure(run, make_inputs, group=group, impl=impl, flops=flops)
