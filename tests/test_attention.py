"""The Triton attention kernel against the reference: output and every gradient.

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET
before triton is imported), in fp32 and fp16; bf16 runs only on a GPU. Error rule from
flash-attention: against an fp64 evaluation of the reference, the kernel's max error must be at
most twice the error of PyTorch's own computation in the same dtype, plus a small atol.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastcap.common import capability
from fastcap.ops import attention as ops_attention
from fastcap.ops.ref.attention import attention as ref_attention
from fastcap.ops.ref.attention import attention_mask
from fastcap.ops.ref.rope import apply_rope, rope_cos_sin

triton = pytest.importorskip("triton")
from fastcap.kernels import attention as K  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16_SKIP = pytest.mark.skipif(
    not CUDA, reason="bf16 dot and arithmetic are broken in the Triton interpreter; GPU only"
)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=BF16_SKIP),
]
# atol added to 2x PyTorch's own error (max abs, output and gradients alike).
ATOL = {torch.float32: 5e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
THETA = 10000.0


def _inputs(B, H, Lq, Lk, D, dtype):
    g = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype)
    return g(B, H, Lq, D), g(B, H, Lk, D), g(B, H, Lk, D), g(B, H, Lq, D)


def _lens(kind, B, Lk):
    """kv_lens per kind: None, or a batch holding a full row, an empty row and random lengths."""
    if kind is None:
        return None
    rand = torch.randint(1, max(Lk, 1) + 1, (max(B - 2, 0),)).tolist()
    return torch.tensor(([Lk, 0] + rand)[:B], device=DEVICE)


def _run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn at these inputs."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _compare(q, k, v, do, **kw):
    """Kernel vs reference under the flash-attention rule; returns the kernel's results."""
    got = _run(K.attention, q, k, v, do, **kw)
    gold = _run(ref_attention, *(x.double() for x in (q, k, v, do)), **kw)
    torch_own = _run(ref_attention, q, k, v, do, **kw)
    for name, a, g, t in zip(("out", "dq", "dk", "dv"), got, gold, torch_own):
        assert a.dtype == q.dtype and a.shape == g.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/Inf"
        err = (a.double() - g).abs().max().item()
        own = (t.double() - g).abs().max().item()
        assert err <= 2 * own + ATOL[q.dtype], f"{name}: err {err:.3g} vs torch {own:.3g}"
    return got


# (B, H, Lq, Lk, D, causal, kv_lens kind, rope)
CASES = {
    # self-attention, causal, RoPE, ragged kv_lens with a full and an empty row
    "self_L1": (3, 2, 1, 1, 32, True, "ragged", True),
    "self_L7": (3, 2, 7, 7, 64, True, "ragged", True),
    "self_L33": (3, 2, 33, 33, 32, True, "ragged", True),
    "self_L127": (3, 1, 127, 127, 64, True, "ragged", True),
    "self_rope_nomask": (2, 2, 33, 33, 32, False, None, True),
    "self_causal_plain": (2, 2, 31, 31, 64, True, None, False),
    # cross-attention, text over image tokens with padding
    "cross_7x33": (3, 2, 7, 33, 64, False, "ragged", False),
    "cross_33x7": (3, 2, 33, 7, 32, False, "ragged", False),
    "cross_rope_7x33": (2, 2, 7, 33, 32, False, "ragged", True),
    # one-token decoding against a cache (bottom-right causal)
    "decode_1x33": (3, 2, 1, 33, 64, True, "ragged", True),
    "decode_1x127": (3, 2, 1, 127, 32, True, "ragged", True),
    # causal with more queries than keys: the first Lq - Lk rows see nothing
    "causal_33x7": (3, 2, 33, 7, 32, True, "ragged", False),
    "causal_rope_33x7": (3, 2, 33, 7, 32, True, "ragged", True),
    # head dims that are not 32/64: padded halves, an odd split without RoPE, 128
    "d24_rope": (2, 2, 17, 17, 24, True, "ragged", True),
    "d17_odd": (2, 1, 17, 13, 17, False, "ragged", False),
    "d128": (2, 1, 7, 19, 128, True, "ragged", True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, dtype):
    B, H, Lq, Lk, D, causal, lens, rope = CASES[case]
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype)
    _compare(
        q, k, v, do, causal=causal, kv_lens=_lens(lens, B, Lk), rope_theta=THETA if rope else None
    )


@pytest.mark.parametrize("blocks", [(32, 16), (16, 64), (64, 32), (16, 16)])
@pytest.mark.parametrize("shape", [(33, 33), (7, 65), (40, 9)], ids=["self", "lq<lk", "lq>lk"])
def test_other_tiles(blocks, shape):
    """The launchers with tiles other than the interpreter default: BLOCK_M != BLOCK_N exercises
    the diagonal and padding block arithmetic that a square tile can hide."""
    Lq, Lk = shape
    B, H, D = 3, 1, 32
    q, k, v, do = _inputs(B, H, Lq, Lk, D, torch.float32)
    kw = {
        "causal": True,
        "kv_lens": _lens("ragged", B, Lk),
        "rope_theta": THETA if Lq <= Lk else None,
    }
    out, lse = K.attention_fwd(q, k, v, blocks=blocks, **kw)
    grads = K.attention_bwd(do, q, k, v, out, lse, blocks=blocks, **kw)
    gold = _run(ref_attention, *(x.double() for x in (q, k, v, do)), **kw)
    for name, a, g in zip(("out", "dq", "dk", "dv"), (out, *grads), gold):
        err = (a.double() - g).abs().max().item()
        assert err <= ATOL[torch.float32], f"{name}: err {err:.3g}"


@pytest.mark.parametrize("causal", [False, True])
def test_rope_negative_positions(causal):
    """Lq > Lk with RoPE: query i sits at i + (Lk - Lq) < 0 for the first rows (docs/DESIGN.md 3.1).

    The gold rotates by hand from rope_cos_sin, independent of the reference's table code."""
    B, H, Lq, Lk, D = 2, 2, 11, 5, 32
    q, k, v, do = _inputs(B, H, Lq, Lk, D, torch.float32)
    cq, sq = rope_cos_sin(torch.arange(Lk - Lq, Lk), D, THETA)
    ck, sk = rope_cos_sin(torch.arange(Lk), D, THETA)

    def gold_fn(q, k, v):
        return ref_attention(apply_rope(q, cq, sq), apply_rope(k, ck, sk), v, causal=causal)

    got = _run(K.attention, q, k, v, do, causal=causal, rope_theta=THETA)
    gold = _run(gold_fn, *(x.double() for x in (q, k, v, do)))
    for name, a, g in zip(("out", "dq", "dk", "dv"), got, gold):
        err = (a.double() - g).abs().max().item()
        assert err <= ATOL[torch.float32], f"{name}: err {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_rows_and_keys(dtype):
    """Rows that see no key: output 0, finite lse, zero dq; padding keys: zero dk and dv."""
    B, H, Lq, Lk, D = 3, 2, 20, 13, 32
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype)
    lens = torch.tensor([Lk, 0, 6], device=DEVICE)
    kw = {"causal": True, "kv_lens": lens, "rope_theta": None}
    out, lse = K.attention_fwd(q, k, v, **kw)
    dq, dk, dv = K.attention_bwd(do, q, k, v, out, lse, **kw)
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf"
    seen = attention_mask(Lq, Lk, causal=True, kv_lens=lens, device=q.device).sum(-1)[:, 0]
    seen = seen.expand(B, Lq)[:, None, :].expand(B, H, Lq)  # (B, H, Lq) keys each row sees
    live = seen > 0
    assert (~live).sum() > 0 and live.sum() > 0
    assert (out[~live] == 0).all() and (dq[~live] == 0).all()
    assert (lse[~live] == K.EMPTY_ROW_LSE).all()
    assert (out[live].abs().sum(-1) > 0).all()
    # A softmax over one key does not depend on the score, so dq is 0 there too.
    assert (dq[seen > 1].abs().sum(-1) > 0).all()
    for b, n in enumerate(lens.tolist()):
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()
        assert (dv[b, :, :n].abs().sum(-1) > 0).all()


def test_lse_matches_logsumexp():
    """The saved lse is the natural-log log-sum-exp of the scaled, masked (rotated) scores."""
    B, H, Lq, Lk, D = 3, 2, 9, 21, 64
    q, k, v, _ = _inputs(B, H, Lq, Lk, D, torch.float32)
    lens = _lens("ragged", B, Lk)
    _, lse = K.attention_fwd(q, k, v, causal=True, kv_lens=lens, rope_theta=THETA, scale=0.2)
    cos, sin = rope_cos_sin(torch.arange(Lk, device=q.device), D, THETA, torch.float64)
    qr = apply_rope(q.double(), cos[Lk - Lq :], sin[Lk - Lq :])
    kr = apply_rope(k.double(), cos, sin)
    s = (qr @ kr.transpose(-1, -2)) * 0.2
    mask = attention_mask(Lq, Lk, causal=True, kv_lens=lens, device=q.device)
    gold = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    live = torch.isfinite(gold)
    assert (lse[~live] == K.EMPTY_ROW_LSE).all()
    torch.testing.assert_close(lse[live].double(), gold[live], atol=1e-5, rtol=1e-5)


def test_empty_keys_and_queries():
    """Lk = 0: every row sees nothing (zeros, zero grads); Lq = 0: empty output."""
    q, k, v, do = _inputs(2, 2, 5, 0, 32, torch.float32)
    out, dq, dk, dv = _run(K.attention, q, k, v, do, causal=False)
    assert (out == 0).all() and (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0
    q, k, v, do = _inputs(2, 2, 0, 5, 32, torch.float32)
    out, dq, dk, dv = _run(K.attention, q, k, v, do, causal=True)
    assert out.shape == (2, 2, 0, 32) and (dk == 0).all() and (dv == 0).all()


def test_strided_inputs_and_scale():
    """q, k, v as (B, L, H, D) views transposed to (B, H, L, D), as a model produces them."""
    B, H, Lq, Lk, D = 2, 3, 13, 13, 32
    q, k, v, do = (x.transpose(1, 2).contiguous() for x in _inputs(B, H, Lq, Lk, D, torch.float16))
    q, k, v, do = (x.transpose(1, 2) for x in (q, k, v, do))
    assert not q.is_contiguous()
    _compare(q, k, v, do, causal=True, kv_lens=_lens("ragged", B, Lk), rope_theta=THETA, scale=0.3)


def test_dispatch_selects_kernel(monkeypatch):
    """FASTCAP_KERNELS=attention=triton routes fastcap.ops.attention to this kernel."""
    monkeypatch.setenv("FASTCAP_KERNELS", "attention=triton")
    q, k, v, _ = _inputs(2, 2, 7, 7, 32, torch.float32)
    kw = {"causal": True, "kv_lens": _lens("ragged", 2, 7), "rope_theta": THETA}
    torch.testing.assert_close(
        ops_attention(q, k, v, **kw), K.attention(q, k, v, **kw), atol=0, rtol=0
    )


@pytest.mark.parametrize(
    "dtype, D, rope, match",
    [
        (torch.float64, 32, None, "dtype"),
        (torch.float32, 264, None, "head dim"),
        (torch.float32, 33, THETA, "even head dim"),
    ],
)
def test_rejects_unsupported(dtype, D, rope, match):
    q = torch.zeros(1, 1, 4, D, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        K.attention(q, q, q, rope_theta=rope)


GPUS = {80: "a100", 86: "a10", 89: "l4", 90: "h100"}


@pytest.mark.parametrize("arch", list(GPUS))
@pytest.mark.parametrize("shapes", ["_FWD_SHAPES", "_DKDV_SHAPES", "_DQ_SHAPES"])
def test_autotune_prune(shapes, arch):
    """Pruning keeps at least one tile for every head dim on each architecture, never a tile far
    longer than the sequence, and only tiles within their head-dim limit (no spill) and within
    the architecture's opt-in shared memory (99 KB on sm_86 / sm_89), by the figures the
    compile-only table checks (tests/test_gpu_compile.py). The autotuner's hook reads the code
    family and the shared-memory limit from Q's device (torch's queries, patched here)."""
    kind = next(k for k, v in K._KIND.items() if v is getattr(K, shapes))
    shapes = getattr(K, shapes)
    col = 5 if arch >= 90 else 4
    limits = {t[:4]: t[col] for t in shapes}
    smem = K.OPTIN_SHARED[(arch // 10, arch % 10)]
    decode = K._tiles(shapes, arch, 64, 1, 4096, smem)
    assert decode and all(t[0] == 16 for t in decode)
    short = K._tiles(shapes, arch, 64, 32, 32, smem)
    assert short and all(t[0] <= 32 and t[1] <= 32 for t in short)
    for d in (17, 32, 64, 96, 128, 200, 256):
        for lq, lk in ((1, 1), (1, 8192), (64, 64), (8192, 8192)):
            kept = K._tiles(shapes, arch, d, lq, lk, smem)
            assert kept and all(limits[t] >= d for t in kept), (d, lq, lk)
            assert all(K._shared_bytes(kind, t, arch, d) <= smem for t in kept), (d, lq, lk)
    assert set(K._reachable(shapes, arch, 256, smem)) <= {t for t, d in limits.items() if d >= 256}
    # every tile within its head-dim limit has a measured figure (else it is never kept)
    for t in shapes:
        for d in K._CHECKED_HEAD_DIMS:
            if d <= t[col]:
                assert K._shared_bytes(kind, t, arch, d) < 1 << 40, (t, d)

    class _Q:  # the hook's questions to Q: its device and its element size
        device = torch.device("cuda", 0)
        element_size = staticmethod(lambda: 2)

    configs = K._configs(shapes)
    with capability.simulate(GPUS[arch]):
        pruned = K._pruner(shapes)(configs, {"Q": _Q(), "lq_bucket": 4096, "lk_bucket": 4096},
                                   HEAD_DIM=128)  # fmt: skip
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    assert [key(c) for c in pruned] == K._tiles(shapes, arch, 128, 4096, 4096, smem)


def test_lone_decode_tile_fits_99kb():
    """Decoding at head dim 256 (Lq = 1) leaves one forward tile, which the autotuner launches
    without a trial: on sm_80 that is 16 x 64 (138 KB of shared memory), which an sm_86 / sm_89
    card (99 KB) cannot launch. There the pruning must leave a tile that fits."""
    a100 = K._tiles(K._FWD_SHAPES, 80, 256, 1, 1, K.OPTIN_SHARED[(8, 0)])
    assert a100 == [(16, 64, 4, 2)]
    for arch in (86, 89):
        lone = K._tiles(K._FWD_SHAPES, arch, 256, 1, 1, K.OPTIN_SHARED[(8, 6)])
        assert len(lone) == 1 and K._shared_bytes("fwd", lone[0], arch, 256) <= 99 * 1024, lone


@pytest.mark.skipif(not CUDA, reason="determinism across parallel programs only shows on a GPU")
def test_backward_deterministic():
    q, k, v, do = _inputs(4, 4, 300, 300, 64, torch.bfloat16)
    kw = {"causal": True, "kv_lens": _lens("ragged", 4, 300), "rope_theta": THETA}
    a = _run(K.attention, q, k, v, do, **kw)
    b = _run(K.attention, q, k, v, do, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif(not CUDA, reason="autotuned tiles at real sizes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, causal",
    [
        (8, 8, 32, 32, 64, True),
        (8, 8, 32, 196, 64, False),
        (1, 4, 1000, 1000, 128, True),
        (4, 2, 1, 777, 128, True),
    ],
)
def test_gpu_sizes(B, H, Lq, Lk, D, causal, dtype):
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype)
    _compare(
        q,
        k,
        v,
        do,
        causal=causal,
        kv_lens=_lens("ragged", B, Lk),
        rope_theta=THETA if Lq == Lk or causal else None,
        scale=1 / math.sqrt(D),
    )
