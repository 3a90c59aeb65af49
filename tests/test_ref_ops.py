"""The PyTorch references against independent slow definitions written here with explicit loops.

Outputs and every gradient at awkward sizes, and gradcheck in float64 at tiny sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastcap.ops.ref.attention import attention as ref_attention
from fastcap.ops.ref.lce import linear_cross_entropy as ref_lce
from fastcap.ops.ref.moe import moe_ffn as ref_moe
from fastcap.ops.ref.siglip import siglip_loss as ref_siglip
from fastcap.ops.ref.siglip import siglip_loss_chunked

# dtype -> (atol, rtol) for reference-vs-loop comparisons (both computed in that dtype's math)
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-9)}


def grads(out, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, go, allow_unused=True)


# ---------------------------------------------------------------- attention


def slow_rotate(x, pos, theta):
    """Rotate one vector x (D,) at integer position pos, pairing dims i and i + D/2."""
    D = x.shape[0]
    half = D // 2
    out = x.clone()
    for i in range(half):
        ang = pos * theta ** (-2 * i / D)
        c, s = math.cos(ang), math.sin(ang)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def slow_attention(q, k, v, causal, kv_lens, rope_theta):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        n = Lk if kv_lens is None else int(kv_lens[b])
        for h in range(H):
            keys = [k[b, h, j] for j in range(Lk)]
            if rope_theta is not None:
                keys = [slow_rotate(kj, j, rope_theta) for j, kj in enumerate(keys)]
            for i in range(Lq):
                qi = q[b, h, i]
                if rope_theta is not None:
                    qi = slow_rotate(qi, i + Lk - Lq, rope_theta)
                seen = [j for j in range(n) if not causal or j <= i + Lk - Lq]
                if not seen:
                    continue
                s = torch.stack([qi @ keys[j] for j in seen]) / math.sqrt(D)
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[t] * v[b, h, j] for t, j in enumerate(seen))
    return out


ATTN_CASES = [
    # B, H, Lq, Lk, D, causal, kv_lens, rope
    (1, 1, 1, 1, 8, True, None, 10000.0),
    (2, 3, 7, 7, 8, True, [0, 7], 10000.0),
    (3, 2, 5, 13, 6, False, [13, 1, 4], None),
    (2, 1, 1, 31, 8, True, [31, 17], 500.0),
    (2, 2, 15, 4, 4, True, [3, 4], 100.0),  # Lq > Lk: early rows see nothing
    (1, 2, 7, 9, 8, False, None, 10000.0),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,lens,rope", ATTN_CASES)
def test_attention_matches_loops(B, H, Lq, Lk, D, causal, lens, rope):
    q = torch.randn(B, H, Lq, D, requires_grad=True)
    k = torch.randn(B, H, Lk, D, requires_grad=True)
    v = torch.randn(B, H, Lk, D, requires_grad=True)
    kv_lens = None if lens is None else torch.tensor(lens)
    got = ref_attention(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope)
    want = slow_attention(q, k, v, causal, kv_lens, rope)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        torch.testing.assert_close(torch.nan_to_num(a), b, atol=1e-5, rtol=1e-4)
        assert not a.isnan().any()


def test_attention_fully_masked_rows_zero_and_zero_grad():
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, requires_grad=True)
    v = torch.randn(2, 2, 6, 8, requires_grad=True)
    lens = torch.tensor([0, 6])
    out = ref_attention(q, k, v, causal=True, kv_lens=lens, rope_theta=10000.0)
    assert (out[0] == 0).all() and not out.isnan().any()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert not (dq.isnan().any() or dk.isnan().any() or dv.isnan().any())


def test_attention_gradcheck_float64():
    q = torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([5, 2])
    fn = lambda q, k, v: ref_attention(q, k, v, causal=True, kv_lens=lens, rope_theta=50.0)
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------- moe


def slow_moe(x, w13, w2, ids, weights):
    f = w2.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for c in range(ids.shape[1]):
            e = int(ids[t, c])
            h = x[t] @ w13[e]
            out[t] = out[t] + weights[t, c] * ((F.silu(h[:f]) * h[f:]) @ w2[e])
    return out


@pytest.mark.parametrize(
    "T,d,f,E,k", [(1, 4, 3, 1, 1), (7, 8, 5, 5, 2), (31, 6, 4, 7, 3), (13, 5, 2, 9, 4)]
)
def test_moe_matches_loops(T, d, f, E, k):
    x = torch.randn(T, d, requires_grad=True)
    w13 = torch.randn(E, d, 2 * f, requires_grad=True)
    w2 = torch.randn(E, f, d, requires_grad=True)
    # route only to the lower experts so the top ones receive no token
    used = max(1, E - 2) if k <= E else E
    ids = torch.stack(
        [torch.randperm(used)[:k] if used >= k else torch.randint(0, used, (k,)) for _ in range(T)]
    )
    weights = torch.rand(T, k, requires_grad=True)
    got = ref_moe(x, w13, w2, ids, weights)
    want = slow_moe(x, w13, w2, ids, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ins = (x, w13, w2, weights)
    g_got, g_want = grads(got, ins), grads(want, ins)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    unused = torch.ones(E, dtype=torch.bool)
    unused[ids.unique()] = False
    assert (g_got[1][unused] == 0).all() and (g_got[2][unused] == 0).all()


def test_moe_all_tokens_on_one_expert_and_gradcheck():
    T, d, f, E, k = 5, 3, 2, 4, 2
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(E, d, 2 * f, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, f, d, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[2, 2]] * T)  # the same expert twice per token: legal
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        ref_moe(x, w13, w2, ids, weights), slow_moe(x, w13, w2, ids, weights)
    )
    assert torch.autograd.gradcheck(
        lambda *a: ref_moe(a[0], a[1], a[2], ids, a[3]), (x, w13, w2, weights)
    )


# ---------------------------------------------------------------- siglip


def slow_siglip(img, txt, scale, bias):
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            logit = scale.exp() * (img[i] @ txt[j]) + bias
            total = total - F.logsigmoid(z * logit)
    return total / B


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize(
    "B,d,scale,bias",
    [
        (1, 4, math.log(10), -10.0),
        (3, 7, 0.0, 0.0),
        (17, 5, math.log(100), 10.0),
        (31, 16, math.log(100), -10.0),
    ],
)
def test_siglip_matches_loops(impl, B, d, scale, bias):
    img = F.normalize(torch.randn(B, d), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(B, d), dim=-1).requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    fn = ref_siglip if impl == "naive" else (lambda *a: siglip_loss_chunked(*a, chunk=4))
    got = fn(img, txt, s, b)
    want = slow_siglip(img, txt, s, b)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    ins = (img, txt, s, b)
    for a, c in zip(torch.autograd.grad(got, ins), torch.autograd.grad(want, ins)):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [0, 2, 100])
def test_siglip_gradcheck_float64(chunk):
    img = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1).requires_grad_()
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    fn = ref_siglip if chunk == 0 else (lambda *a: siglip_loss_chunked(*a, chunk=chunk))
    assert torch.autograd.gradcheck(fn, (img, txt, s, b))


# ---------------------------------------------------------------- linear cross-entropy


def slow_lce(h, w, targets, ignore_index, eps):
    V = w.shape[0]
    total, n = 0.0, 0
    for r in range(h.shape[0]):
        t = int(targets[r])
        if t == ignore_index:
            continue
        logits = torch.stack([h[r] @ w[v] for v in range(V)])
        logp = logits - torch.logsumexp(logits, 0)
        total = total - ((1 - eps) * logp[t] + eps * logp.mean())
        n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("N,d,V,eps", [(1, 3, 2, 0.0), (7, 5, 11, 0.1), (31, 8, 13, 0.0)])
def test_lce_matches_loops(N, d, V, eps):
    h = torch.randn(N, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::3] = -100
    if N == 1:
        targets[0] = 1
    got = ref_lce(h, w, targets, label_smoothing=eps)
    want = slow_lce(h, w, targets, -100, eps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lce_all_ignored_is_zero_not_nan():
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss = ref_lce(h, w, torch.full((4,), -100), label_smoothing=0.1)
    assert loss.item() == 0.0
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert (dh == 0).all() and (dw == 0).all()


def test_lce_gradcheck_float64():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 3])
    assert torch.autograd.gradcheck(lambda h, w: ref_lce(h, w, t, label_smoothing=0.2), (h, w))
