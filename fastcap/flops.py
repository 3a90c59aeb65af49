"""Analytic FLOP counts and device peaks: the one place the planner (:mod:`fastcap.plan`), the
benchmarks and ``gpu_check`` take their TFLOP/s and MFU numerators and denominators from
(``bench/flops.py`` re-exports this module).

Counts are matmul work only (2 FLOPs per multiply-add); norms, activations, softmax and
elementwise work are left out, as nanoGPT's ``estimate_mfu`` does. A backward pass costs 2x its
forward (two GEMMs per forward GEMM), so forward + backward is 3x, except attention's backward,
which recomputes the scores: 2.5x, so 3.5x in all (flash-attention's count).

Imports nothing beyond the standard library (and ``import fastcap`` itself imports nothing), so
``bench/gpu_check`` can import it from a plain checkout on a bare GPU machine.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendor data sheets, for MFU.
BF16_PEAK_TFLOPS = {
    "H200": 989.5,
    "H100 SXM": 989.5,
    "H100 80GB HBM3": 989.5,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a device by its CUDA name, or None when unknown."""
    for key, peak in BF16_PEAK_TFLOPS.items():
        if all(part in device_name for part in key.split()):
            return peak
    return None


# ----------------------------------------------------------------------------- one op


def matmul_flops(m: int, n: int, k: int) -> float:
    """(m, k) @ (k, n)."""
    return 2.0 * m * n * k


def attention_flops(
    B: int, H: int, Lq: int, Lk: int, D: int, causal: bool = False, backward: bool = False
) -> float:
    """Scores and values of ``attention(q (B, H, Lq, D), k/v (B, H, Lk, D))``: 4 B H Lq Lk D
    forward, halved when causal; forward + backward 3.5x that. Projections not included."""
    fwd = 4.0 * B * H * Lq * Lk * D / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def moe_flops(T: int, d: int, f: int, k: int, backward: bool = False) -> float:
    """The routed SwiGLU experts of ``moe_ffn``: T*k rows through (d, 2f) and (f, d), 6 T k d f
    forward; forward + backward 3x that. Shared experts and the router not included."""
    return 6.0 * T * k * d * f * (3 if backward else 1)


def siglip_flops(B: int, D: int) -> float:
    """SigLIP loss forward + backward over a (B, D) pair: the logits, d img and d txt, three
    B x B x D products (6 B^2 D) -- the useful work, whatever an implementation recomputes."""
    return 6.0 * B * B * D


# ----------------------------------------------------------------------------- the captioner

_RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}


def _conv(cin: int, cout: int, k: int, res: int) -> float:
    return 2.0 * cin * cout * k * k * res * res


def _trunk_flops(name: str, image_size: int, stride: int) -> tuple[float, int]:
    """Forward FLOPs of the torchvision ResNet cut at ``stride``, and its output channels.
    Convolutions only (norms, ReLU, pooling are not matmul work)."""
    down = lambda r: (r + 1) // 2  # a stride-2 conv or pool with padding: ceil(r / 2)
    res = down(image_size)
    flops = _conv(3, 64, 7, res)
    res = down(res)  # max pool
    cin, bottleneck = 64, name == "resnet50"
    for stage, blocks in enumerate(_RESNET_BLOCKS[name]):
        width = 64 * 2**stage
        for b in range(blocks):
            s = 2 if stage > 0 and b == 0 else 1
            r_in, res = res, down(res) if s == 2 else res
            if bottleneck:
                cout = 4 * width
                flops += _conv(cin, width, 1, r_in) + _conv(width, width, 3, res)
                flops += _conv(width, cout, 1, res)
            else:
                cout = width
                flops += _conv(cin, cout, 3, res) + _conv(cout, cout, 3, res)
            if s != 1 or cin != cout:
                flops += _conv(cin, cout, 1, res)
            cin = cout
        if 4 * 2**stage >= stride:
            break
    return flops, cin


def has_analytic_trunk(name: str) -> bool:
    """Is there an analytic count of this trunk (the torchvision ResNets)? Others (``timm:``
    trunks) are counted by :func:`fastcap.measure.counted_trunk`."""
    return name in _RESNET_BLOCKS


def captioner_forward_flops(
    cfg, caption_len: int, trunk: tuple[float, int] | None = None
) -> dict[str, float]:
    """Forward FLOPs of the captioner per image, by part: ``trunk`` (the ResNet convolutions),
    ``encoder`` (projection, patch grouping, encoder layers, pooled embedding), ``unimodal``
    and ``multimodal`` (the decoder layers) and ``head`` (the tied LM head and the text
    embedding). :func:`model_flops_per_image` is 3x their sum; see it for what is counted.

    ``trunk``: (forward FLOPs, output channels) of the trunk when it has no analytic count
    here (:func:`has_analytic_trunk`), e.g. from :func:`fastcap.measure.counted_trunk`."""
    d, L = cfg.width, caption_len
    if trunk is None:
        if not has_analytic_trunk(cfg.trunk):
            raise ValueError(
                f"no analytic FLOP count for trunk {cfg.trunk!r}: pass trunk=(flops, channels) "
                "(fastcap.measure.counted_trunk counts it on the meta device)"
            )
        trunk = _trunk_flops(cfg.trunk, cfg.image_size, cfg.trunk_stride)
    trunk, channels = trunk
    grid = cfg.image_size // cfg.trunk_stride
    n = (grid // cfg.patch) ** 2
    enc = _conv(channels, d, 1, grid)
    if cfg.patch > 1:
        enc += matmul_flops(n, d, cfg.patch**2 * d)
    h = cfg.ffn_hidden

    def attn(lq: int, lk: int) -> float:
        # q and o projected over the queries, k and v over the keys, then scores and values
        proj = 2 * matmul_flops(lq, d, d) + 2 * matmul_flops(lk, d, d)
        return proj + attention_flops(1, 1, lq, lk, d)

    enc += cfg.encoder_layers * (attn(n, n) + 6.0 * n * d * h)
    enc += matmul_flops(1, cfg.embed_dim, d)  # pooled image embedding
    moe = cfg.moe
    parts = {"unimodal": 0.0, "multimodal": 0.0}
    for i in range(cfg.unimodal_layers + cfg.multimodal_layers):
        f = attn(L, L)
        if i >= cfg.unimodal_layers:
            f += attn(L, n)  # q/o over the caption, k/v projected once over the image tokens
        if moe.enabled and not (moe.first_dense and i == 0):
            # each shared expert is a dense SwiGLU of the routed experts' width: one more row
            f += moe_flops(L, d, moe.expert_hidden, moe.top_k + moe.num_shared)
            f += matmul_flops(L, moe.num_experts, d)  # the router
        else:
            f += 6.0 * L * d * h  # dense SwiGLU: (d, 2h) and (h, d)
        parts["unimodal" if i < cfg.unimodal_layers else "multimodal"] += f
    head = matmul_flops(L - 1, cfg.vocab_size, d) + matmul_flops(1, cfg.embed_dim, d)
    return {"trunk": trunk, "encoder": enc, **parts, "head": head}


def model_flops_per_image(cfg, caption_len: int, trunk: tuple[float, int] | None = None) -> float:
    """Training FLOPs (forward + backward = 3x forward) of the captioner per image.

    Args:
        cfg: a :class:`fastcap.model.ModelConfig`.
        caption_len: decoder positions per image (bos + caption + eos); the LM head scores
            caption_len - 1 of them.

    Counted: every convolution and matmul of the trunk, the projection, the encoder over
    N = (S / stride / patch)^2 image tokens, the decoder over caption_len positions (routed MoE
    experts as k * 6 * d * f per token plus the shared experts and the router), the tied LM head
    and the contrastive heads. Attention scores and values count in full (4 L_q L_k d per layer),
    masked or not, as nanoGPT's ``estimate_mfu`` does. Left out: norms, activations, softmax,
    and the SigLIP loss's B x B products (2 B e per image, under 0.1% here); and the extra work
    of teacher forcing below 1 (:func:`fastcap.plan.teacher_forcing_flops`).
    """
    return 3.0 * sum(captioner_forward_flops(cfg, caption_len, trunk).values())
