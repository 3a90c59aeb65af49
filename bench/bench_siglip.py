"""SigLIP loss, forward + backward, side by side: the naive reference (B x B fp32 logits), the
chunked reference (O(chunk x B)), open_clip's formulation (its published formula, in the
input dtype) and the fused Triton kernel (GPU only).

    .venv/bin/python -m pytest bench/bench_siglip.py --benchmark-only -q \
        --benchmark-columns=median,rounds --benchmark-group-by=group

TFLOP/s counts the useful work of every implementation alike (``flops.siglip_flops``): three
B x B x d products (the logits, then d img and d txt), 6 B^2 d FLOPs. The chunked reference
does four and the kernel five (both recompute the logits in backward; the kernel once per
gradient). Peak memory is the extra over the inputs during one forward + backward (CUDA
allocator; RSS on the CPU).

GPU: B in {1024, 8192, 32768}, d = 512, bf16 (the training dtype). CPU: references only, fp32,
B in {1024, 8192}, with few rounds at 8192 so the CPU cases stay near a minute.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flops import siglip_flops

from fastcap.common.capability import precision_for
from fastcap.ops.ref.siglip import siglip_loss as naive_siglip
from fastcap.ops.ref.siglip import siglip_loss_chunked
from fastcap.runs import DTYPES

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the capability policy's precision for this GPU (bf16 from sm_80, fp16 on a T4)
DTYPE = DTYPES[precision_for("cuda")] if CUDA else torch.float32
D = 512
SIZES = [1024, 8192, 32768] if CUDA else [1024, 8192]


def open_clip_formula(img, txt, logit_scale, logit_bias):
    """open_clip's SigLipLoss for one rank, from its published formula: logits in the input
    dtype, labels 2 * eye - 1 as a dense (B, B) matrix, -logsigmoid summed over the batch."""
    B = img.shape[0]
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    labels = 2 * torch.eye(B, device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / B


def triton_siglip(*args):
    from fastcap.kernels.siglip import siglip_loss

    return siglip_loss(*args)


IMPLS = {
    "naive": naive_siglip,
    "chunked": lambda *a: siglip_loss_chunked(*a, chunk=1024),
    "open_clip": open_clip_formula,
    "triton": triton_siglip,
}


def fwd_bwd(fn):
    def run(img, txt, ls, lb):
        loss = fn(img, txt, ls, lb)
        # autograd.grad, not backward: no .grad buffers accumulate between calls
        return torch.autograd.grad(loss, (img, txt, ls, lb))

    return run


def make_inputs(B):
    def make():
        img = F.normalize(torch.randn(B, D, device=DEVICE), dim=-1).to(DTYPE).requires_grad_()
        txt = F.normalize(torch.randn(B, D, device=DEVICE), dim=-1).to(DTYPE).requires_grad_()
        ls = torch.tensor(math.log(10.0), device=DEVICE, requires_grad=True)
        lb = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
        return img, txt, ls, lb

    return make


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("B", SIZES)
def test_siglip_fwd_bwd(measure, B, impl):
    if impl == "triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on a GPU only (the interpreter says nothing)")
    # CPU at B = 8192: one call is seconds; a single timed round and one input set
    heavy = not CUDA and B >= 8192
    try:
        measure(
            fwd_bwd(IMPLS[impl]),
            make_inputs(B),
            group=f"siglip B={B} d={D} fwd+bwd {str(DTYPE).removeprefix('torch.')}",
            impl=impl,
            flops=siglip_flops(B, D),
            n_sets=1 if heavy else 3,
            rounds=1 if heavy else 5,
            warmup=0 if heavy else 1,
        )
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl} at B={B} does not fit in this GPU's memory")
