"""fastcap's public functional ops. The model calls only these.

Each op checks its arguments (a ``ValueError`` naming the shapes), then hands them to the
implementation that :mod:`fastcap.ops.dispatch` picks from ``FASTCAP_KERNELS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from fastcap.ops import dispatch, siglip_dist

__all__ = ["attention", "moe_ffn", "siglip_loss", "linear_cross_entropy", "dispatch"]


def _need(cond: bool, msg: Callable[[], str]) -> None:
    # the message is built only when the check fails: formatting a data-dependent size (the
    # token count after padding is dropped) would specialise it under torch.compile, which
    # torch 2.11 refuses in a fullgraph trace (tests/test_custom_ops.py)
    if not cond:
        raise ValueError(msg())


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
    """Scaled dot-product attention with optional causal mask, key padding and fused RoPE.

    Args:
        q: (B, H, Lq, D) queries.
        k, v: (B, H, Lk, D) keys and values, same dtype and device as q.
        causal: query i sees keys j <= i + (Lk - Lq) (bottom-right aligned).
        kv_lens: (B,) integer; keys j >= kv_lens[b] are padding.
        rope_theta: if given, rotate q and k (NeoX rotate-half) inside the op; key j sits at
            position j, query i at position i + (Lk - Lq).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, H, Lq, D) in q's dtype. A query row that sees no key is 0.
    """
    _need(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        lambda: (
            f"attention: q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        ),
    )
    B, H, Lq, D = q.shape
    _need(
        k.shape == v.shape and k.shape[:2] == (B, H) and k.shape[3] == D,
        lambda: (
            f"attention: k and v must be (B={B}, H={H}, Lk, D={D}); got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        ),
    )
    _need(
        q.dtype == k.dtype == v.dtype,
        lambda: f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}",
    )
    _need(q.device == k.device == v.device, lambda: "attention: q, k, v on different devices")
    if rope_theta is not None:
        _need(D % 2 == 0, lambda: f"attention: rope_theta needs an even head dim, got D={D}")
    if kv_lens is not None:
        _need(
            kv_lens.shape == (B,) and not kv_lens.is_floating_point(),
            lambda: (
                f"attention: kv_lens must be an integer tensor of shape ({B},); got "
                f"{tuple(kv_lens.shape)} {kv_lens.dtype}"
            ),
        )
    fn = dispatch.get("attention", q.device)
    return fn(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta, scale=scale)


def moe_ffn(x: Tensor, w13: Tensor, w2: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """Routed SwiGLU experts: out[t] = sum_c w[t,c] * FFN_{ids[t,c]}(x[t]).

    FFN_e(x) = (silu(x @ gate_e) * (x @ up_e)) @ w2_e.

    Args:
        x: (T, d) tokens.
        w13: (E, d, 2f) stacked expert weights, gate columns [0, f) then up [f, 2f).
        w2: (E, f, d) stacked down projections.
        topk_ids: (T, k) integer expert ids in [0, E).
        topk_weights: (T, k) routing weights.

    Returns:
        (T, d) in x's dtype. Experts that receive no token are legal and get zero gradient.
    """
    _need(
        x.dim() == 2 and w13.dim() == 3 and w2.dim() == 3,
        lambda: (
            f"moe_ffn: need x (T, d), w13 (E, d, 2f), w2 (E, f, d); got {tuple(x.shape)}, "
            f"{tuple(w13.shape)}, {tuple(w2.shape)}"
        ),
    )
    T, d = x.shape
    E, d13, f2 = w13.shape
    _need(
        d13 == d and f2 % 2 == 0 and w2.shape == (E, f2 // 2, d),
        lambda: (
            f"moe_ffn: shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)} "
            f"(want (E, {d}, 2f)), w2 {tuple(w2.shape)} (want ({E}, {f2 // 2}, {d}))"
        ),
    )
    _need(
        topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_weights.shape == topk_ids.shape,
        lambda: (
            f"moe_ffn: topk_ids and topk_weights must both be (T={T}, k); got "
            f"{tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}"
        ),
    )
    _need(
        not topk_ids.is_floating_point(),
        lambda: f"moe_ffn: topk_ids must be integer, got {topk_ids.dtype}",
    )
    _need(
        x.dtype == w13.dtype == w2.dtype,
        lambda: f"moe_ffn: x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, {w2.dtype}",
    )
    fn = dispatch.get("moe", x.device)
    return fn(x, w13, w2, topk_ids, topk_weights)


def siglip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Sigmoid contrastive loss (Zhai et al. 2023), mean over images of the row sums.

    Args:
        img, txt: (B, d) L2-normalised embeddings; row i of each is a positive pair.
        logit_scale: 0-d, log of the temperature t (logits use exp(logit_scale)).
        logit_bias: 0-d bias b.

    Returns:
        0-d fp32 loss. Gradients flow to all four inputs.
    """
    _need(
        img.dim() == 2 and img.shape == txt.shape,
        lambda: (
            f"siglip_loss: img and txt must both be (B, d); got {tuple(img.shape)}, "
            f"{tuple(txt.shape)}"
        ),
    )
    _need(
        img.dtype == txt.dtype, lambda: f"siglip_loss: img {img.dtype} and txt {txt.dtype} differ"
    )
    _need(
        logit_scale.dim() == 0 and logit_bias.dim() == 0,
        lambda: (
            f"siglip_loss: logit_scale and logit_bias must be 0-d; got "
            f"{tuple(logit_scale.shape)}, {tuple(logit_bias.shape)}"
        ),
    )
    fn = dispatch.get("siglip", img.device)
    return fn(img, txt, logit_scale, logit_bias)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of the logits h @ weight.T, averaged over non-ignored targets.

    Args:
        h: (N, d) hidden states.
        weight: (V, d) vocabulary projection (the tied embedding).
        targets: (N,) integer class ids; ``ignore_index`` entries do not count.

    Returns:
        0-d fp32 loss; 0 (not NaN) when every target is ignored.
    """
    _need(
        h.dim() == 2 and weight.dim() == 2 and h.shape[1] == weight.shape[1],
        lambda: (
            f"linear_cross_entropy: need h (N, d) and weight (V, d); got {tuple(h.shape)}, "
            f"{tuple(weight.shape)}"
        ),
    )
    _need(
        targets.shape == (h.shape[0],) and not targets.is_floating_point(),
        lambda: (
            f"linear_cross_entropy: targets must be integer ({h.shape[0]},); got "
            f"{tuple(targets.shape)} {targets.dtype}"
        ),
    )
    _need(
        0.0 <= label_smoothing < 1.0,
        lambda: f"linear_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}",
    )
    fn = dispatch.get("lce", h.device)
    return fn(h, weight, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)


def siglip_loss_distributed(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    group=None,
    mean_over: str = "global",
) -> Tensor:
    """This rank's share of the sigmoid contrastive loss over the batch of all ranks.

    Args:
        img, txt: (B_r, d) this rank's L2-normalised embeddings; row i of each is a positive
            pair. B_r >= 1 may differ between ranks; d, dtype and device must agree.
        logit_scale: 0-d, log of the temperature t (the same value on every rank).
        logit_bias: 0-d bias b (the same value on every rank).
        group: the process group (default: the world). Without an initialised process group
            or with one rank this is :func:`siglip_loss`.
        mean_over: ``"global"`` divides this rank's pair sum by the global batch, so the sum
            over ranks equals the single-process loss on the concatenated batch; ``"local"``
            divides by this rank's batch B_r: the mean over its images, which is what an engine
            that averages gradients over ranks needs (see :mod:`fastcap.ops.siglip_dist`).

    Returns:
        0-d fp32: sum over this rank's images i and ALL ranks' texts j of
        -log sigmoid(z_ij * (t img_i . txt_j + b)), divided as ``mean_over`` says.
    """
    _need(mean_over in ("global", "local"), lambda: f"mean_over {mean_over!r}: use global or local")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return siglip_loss(img, txt, logit_scale, logit_bias)
    _need(
        img.dim() == 2 and img.shape == txt.shape and img.shape[0] >= 1,
        lambda: (
            f"siglip_loss_distributed: img and txt must both be (B_r >= 1, d); got "
            f"{tuple(img.shape)}, {tuple(txt.shape)}"
        ),
    )
    _need(
        img.dtype == txt.dtype,
        lambda: f"siglip_loss_distributed: img {img.dtype} and txt {txt.dtype} differ",
    )
    _need(
        logit_scale.dim() == 0 and logit_bias.dim() == 0,
        lambda: (
            f"siglip_loss_distributed: logit_scale and logit_bias must be 0-d; got "
            f"{tuple(logit_scale.shape)}, {tuple(logit_bias.shape)}"
        ),
    )
    return siglip_dist.siglip_loss_distributed(img, txt, logit_scale, logit_bias, group, mean_over)


__all__ += ["siglip_loss_distributed"]
