"""The sigmoid contrastive loss across data-parallel ranks.

Each rank holds its local batch of image and text embeddings. The texts of all ranks are
all-gathered; each rank scores its own images against every text, with its positives on the
local diagonal (image i of rank r pairs with global text ``offset_r + i``, ``offset_r`` the
number of samples on ranks before r). The rank's loss is its rows' sum divided by the GLOBAL
batch size, so that

    sum over ranks of siglip_loss_distributed(...) == siglip_loss(all images, all texts).

Gradients: the gathered texts' gradient is summed over ranks and handed back to each text's
owner, so after every rank has run backward, each rank's ``img.grad`` and ``txt.grad`` are the
corresponding rows of the single-process gradient of the global loss, and its ``logit_scale`` /
``logit_bias`` gradients are its share of the global ones (their sum over ranks is the global
gradient). Backward is a collective: every rank must call it.

With an engine that AVERAGES gradients over ranks (DDP, DeepSpeed), every gradient ends up as
the global loss's divided by the world size W. ``mean_over="local"`` divides this rank's rows
by its LOCAL batch instead (open_clip's convention): the mean over this rank's images of the
loss against every text, which, averaged over ranks by the engine, weighs the contrastive term
as the single-process loss does (exactly so when the local batches are equal).

The pair terms of one rank's rows never leave that rank; only the (B_global, d) texts and their
gradient cross the wire. Local batch sizes may differ between ranks (e.g. the last, short
batch of an epoch); each rank needs at least one sample.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from torch import Tensor

from fastcap.ops import dispatch

# Same implementation names as the dispatch's "siglip" entry, rectangular forms.
_RECT = {
    "ref": "fastcap.ops.ref.siglip:_siglip_loss_rect",
    "triton": "fastcap.kernels.siglip:siglip_loss_rect",
}


def _rect_impl(device: torch.device):
    module, fn = _RECT[dispatch.resolve("siglip", device)].split(":")
    return getattr(importlib.import_module(module), fn)


class _GatherRows(torch.autograd.Function):
    """All-gather (B_r, d) row blocks of possibly different B_r into (sum B_r, d).

    Backward: the (sum B_r, d) gradient is all-reduced (summed over ranks) and each rank keeps
    its own rows. An all-reduce rather than a reduce-scatter because gloo has no reduce-scatter
    and the tensor is only O(B * d); the pair terms, O(B^2 * d), dominate by far.
    """

    @staticmethod
    def forward(ctx, x, sizes: list[int], rank: int, group):
        top = max(sizes)
        if x.shape[0] < top:  # all_gather needs equal shapes: pad, then drop the padding
            x = torch.cat([x, x.new_zeros(top - x.shape[0], x.shape[1])])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd may share grad
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def siglip_loss_distributed(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    group,
    mean_over: str = "global",
) -> Tensor:
    """The per-rank term; :func:`fastcap.ops.siglip_loss_distributed` validates and calls it
    with an initialised group of more than one rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # One tiny collective (and a host sync) per call buys support for unequal local batches.
    mine = torch.tensor([img.shape[0]], dtype=torch.int64, device=img.device)
    all_sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(all_sizes, mine, group=group)
    sizes = torch.cat(all_sizes).tolist()
    txt_all = _GatherRows.apply(txt, sizes, rank, group)  # (B_global, d)
    offset = sum(sizes[:rank])
    denom = sum(sizes) if mean_over == "global" else img.shape[0]
    return _rect_impl(img.device)(img, txt_all, logit_scale, logit_bias, offset, float(denom))
