"""Reference sigmoid contrastive loss: the naive B x B form, and a chunked form whose
forward and backward never hold more than (chunk, B) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def siglip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """See :func:`fastcap.ops.siglip_loss`. Materialises the (B, B) logits (fp32)."""
    B = img.shape[0]
    a = _acc(img)
    logits = img.to(a) @ txt.to(a).T * logit_scale.to(a).exp() + logit_bias.to(a)
    z = 2 * torch.eye(B, device=img.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(z * logits).sum() / B


class _ChunkedSigLIP(torch.autograd.Function):
    """Row-chunked loss with a recomputing backward: peak extra memory O(chunk x B)."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, chunk, offset=0, denom=None):
        # img (M, d) against txt (N, d): image r's positive is text r + offset, the sum is
        # divided by denom (default M). The square loss is offset 0, M = N, denom B.
        B = img.shape[0]
        a = _acc(img)
        t, b = logit_scale.to(a).exp(), logit_bias.to(a)
        txtf = txt.to(a)
        total = torch.zeros((), dtype=a, device=img.device)
        for s in range(0, B, chunk):
            logits = img[s : s + chunk].to(a) @ txtf.T * t + b  # (c, N)
            # every entry is a negative except column s + offset + r of row r
            loss = F.softplus(logits).sum()
            diag = logits.diagonal(offset=s + offset)
            total += loss - diag.sum()  # softplus(-x) = softplus(x) - x
        ctx.save_for_backward(img, txt, logit_scale, logit_bias)
        ctx.chunk, ctx.offset = chunk, offset
        ctx.denom = B if denom is None else denom
        return total / ctx.denom

    @staticmethod
    def backward(ctx, g):
        img, txt, logit_scale, logit_bias = ctx.saved_tensors
        B, chunk, offset = img.shape[0], ctx.chunk, ctx.offset
        a = _acc(img)
        t, b = logit_scale.to(a).exp(), logit_bias.to(a)
        txtf = txt.to(a)
        d_img = torch.empty_like(img, dtype=a)
        d_txt = torch.zeros_like(txtf)
        d_t = torch.zeros((), dtype=a, device=img.device)  # d loss / d t
        d_b = torch.zeros((), dtype=a, device=img.device)
        for s in range(0, B, chunk):
            imgc = img[s : s + chunk].to(a)
            dot = imgc @ txtf.T  # (c, N)
            gl = torch.sigmoid(dot * t + b)  # d softplus(x)/dx
            gl.diagonal(offset=s + offset).sub_(1.0)  # positives: sigmoid(x) - 1
            gl.mul_(g / ctx.denom)
            d_img[s : s + chunk] = gl @ txtf * t
            d_txt += gl.T @ imgc * t
            d_t += (gl * dot).sum()
            d_b += gl.sum()
        return (
            d_img.to(img.dtype),
            d_txt.to(txt.dtype),
            (d_t * t).to(logit_scale.dtype),
            d_b.to(logit_bias.dtype),
            None,
            None,
            None,
        )


def siglip_loss_chunked(
    img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor, chunk: int = 1024
) -> Tensor:
    """Same value and gradients as :func:`siglip_loss`, O(chunk x B) extra memory."""
    if chunk < 1:
        raise ValueError(f"siglip_loss_chunked: chunk must be >= 1, got {chunk}")
    return _ChunkedSigLIP.apply(img, txt, logit_scale, logit_bias, chunk)


def _siglip_loss_rect(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    offset: int,
    denom: float,
    chunk: int = 1024,
) -> Tensor:
    """Images (M, d) against texts (N, d); image i's positive is text i + offset; the sum over
    all M x N pairs is divided by ``denom``. O(chunk x N) extra memory. The per-rank term of
    :func:`fastcap.ops.siglip_dist.siglip_loss_distributed`."""
    if offset < 0 or img.shape[0] + offset > txt.shape[0]:
        raise ValueError(
            f"_siglip_loss_rect: need 0 <= offset and M + offset <= N; got M={img.shape[0]}, "
            f"N={txt.shape[0]}, offset={offset}"
        )
    if chunk < 1:
        raise ValueError(f"_siglip_loss_rect: chunk must be >= 1, got {chunk}")
    return _ChunkedSigLIP.apply(img, txt, logit_scale, logit_bias, chunk, int(offset), float(denom))
