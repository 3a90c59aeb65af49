"""The fused linear cross-entropy kernel against an fp64 definition written here and against
the reference: loss, d h and d weight; awkward shapes, ignored targets, label smoothing; the
public op through ``FASTCAP_KERNELS=lce=triton``.

Without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where
bf16 is broken, so bf16 runs on a GPU only. Inputs are drawn from FASTCAP_TEST_SEED (printed).
"""

from __future__ import annotations

import pytest
import torch

from fastcap.ops import dispatch
from fastcap.ops import linear_cross_entropy as public_lce
from fastcap.ops.ref.lce import linear_cross_entropy as ref_lce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 64

# dtype -> (floor, atol, rtol). Against the fp64 definition (flash-attention's rule): the
# kernel's largest error, as a fraction of the largest |value|, is at most twice PyTorch's own
# (the reference run in that dtype), or ``floor`` when that is smaller. In fp32 both are a few
# ulp of summation order (measured 1e-8 to 2e-6), so the floor decides; in fp16 the reference's
# error (16-bit logits and 16-bit d logits / n, 5e-4 to 1e-3) bounds the kernel's (3e-4 to
# 5e-4: 16-bit d logits and outputs). Against the reference: assert_close with atol as a
# fraction of the reference's largest |value|, and rtol.
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-4),
    torch.float16: (1e-3, 3e-3, 3e-3),
    torch.bfloat16: (8e-3, 2.4e-2, 2.4e-2),
}
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason="bf16 tl.dot and arithmetic are wrong in the Triton interpreter; GPU only",
        ),
    ),
]
# (N, V, d, ignore_index): N = 1, 37 (< one chunk of 64), 64 (exactly one), 257 (4 + 1 row);
# V and d not powers of two; ignore_index a real class id in two rows (7 and 0).
SHAPES = [
    (1, 101, 48, -100),
    (37, 1000, 96, -100),
    (64, 101, 96, 7),
    (257, 101, 48, -100),
    (257, 1000, 96, 0),
]


@pytest.fixture(autouse=True)
def _seed(test_seed):
    print(f"FASTCAP_TEST_SEED={test_seed}")
    torch.manual_seed(test_seed)


def kernel_lce(h, weight, targets, **kw):
    from fastcap.kernels.lce import linear_cross_entropy

    return linear_cross_entropy(h, weight, targets, **kw)


def naive_lce(h, weight, targets, ignore_index=-100, label_smoothing=0.0):
    """The definition in fp64: -sum_j q_j log p_j per row with q = (1 - eps) onehot + eps / V,
    summed over the rows whose target is not ignore_index, divided by max(their count, 1)."""
    x = h.double() @ weight.double().T  # (N, V)
    m = x.max(dim=1, keepdim=True).values
    logp = x - m - (x - m).exp().sum(dim=1, keepdim=True).log()  # log_softmax
    valid = targets != ignore_index
    nll = -logp.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]
    smooth = -logp.mean(dim=1)
    eps = label_smoothing
    rows = torch.where(valid, (1 - eps) * nll + eps * smooth, 0.0)
    return rows.sum() / valid.sum().clamp(min=1)


def make_inputs(N, V, d, dtype, ignore_index, p_ignore=0.25, scale=3.0):
    """h (N, d), weight (V, d) with logits of std ~scale, targets (N,) with about p_ignore of
    them ignore_index (the first always kept)."""
    h = torch.randn(N, d, device=DEVICE).to(dtype)
    w = (torch.randn(V, d, device=DEVICE) * scale / d**0.5).to(dtype)
    t = torch.randint(0, V, (N,), device=DEVICE)
    t = torch.where(t == ignore_index, (t + 1) % V, t)  # ignored only where drawn below
    drop = torch.rand(N, device=DEVICE) < p_ignore
    drop[0] = False
    return h, w, torch.where(drop, ignore_index, t)


def loss_and_grads(fn, h, w, t, **kw):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, t, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.abs().max().clamp(min=1e-30)).item()


NAMES = ("loss", "d h", "d weight")


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V,d,ignore_index", SHAPES)
def test_matches_definition_and_reference(N, V, d, ignore_index, dtype, eps):
    h, w, t = make_inputs(N, V, d, dtype, ignore_index)
    kw = {"ignore_index": ignore_index, "label_smoothing": eps}
    got = loss_and_grads(kernel_lce, h, w, t, chunk_size=CHUNK, **kw)
    ref = loss_and_grads(ref_lce, h, w, t, **kw)
    exact = loss_and_grads(naive_lce, h.double(), w.double(), t, **kw)
    floor, atol, rtol = TOL[dtype]
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, g, r, e in zip(NAMES, got, ref, exact):
        err_k, err_ref = rel_err(g, e), rel_err(r, e)
        assert err_k <= max(2 * err_ref, floor), (
            f"{name}: kernel error {err_k:.2e} vs fp64, PyTorch's own {err_ref:.2e}"
        )
        torch.testing.assert_close(
            g.float(), r.float(), atol=atol * r.abs().max().item(), rtol=rtol, msg=name
        )


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_targets_ignored_gives_zero_not_nan(dtype, eps):
    h, w, _ = make_inputs(37, 101, 48, dtype, -100)
    t = torch.full((37,), 5, device=DEVICE)
    loss, dh, dw = loss_and_grads(
        kernel_lce, h, w, t, ignore_index=5, label_smoothing=eps, chunk_size=16
    )
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    assert ref_lce(h, w, t, ignore_index=5, label_smoothing=eps).item() == 0.0


def test_large_logits_stay_finite():
    """Logits of std ~60 (exp overflows fp32 without the running max): still the definition."""
    h, w, t = make_inputs(37, 1000, 48, torch.float32, -100, scale=60.0)
    got = loss_and_grads(kernel_lce, h, w, t, label_smoothing=0.1, chunk_size=CHUNK)
    ref = loss_and_grads(ref_lce, h, w, t, label_smoothing=0.1)
    exact = loss_and_grads(naive_lce, h.double(), w.double(), t, label_smoothing=0.1)
    for name, g, r, e in zip(NAMES, got, ref, exact):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, e) <= max(2 * rel_err(r, e), TOL[torch.float32][0]), name


def test_default_chunk_and_chunk_rows():
    from fastcap.kernels.lce import chunk_rows

    assert chunk_rows(256 * 40, 32000, 768) == 1024  # ~d rows at the training shape
    assert chunk_rows(256 * 40, 64, 64) == 256 * 40  # small V: one chunk
    assert chunk_rows(3, 50257, 768) == 3
    h, w, t = make_inputs(37, 101, 48, torch.float32, -100)
    got = loss_and_grads(kernel_lce, h, w, t, label_smoothing=0.1)
    ref = loss_and_grads(ref_lce, h, w, t, label_smoothing=0.1)
    for name, g, r in zip(NAMES, got, ref):
        torch.testing.assert_close(g, r, atol=1e-5 * r.abs().max().item(), rtol=1e-4, msg=name)


def test_backward_scales_by_grad_output_and_retains():
    h, w, t = make_inputs(37, 101, 48, torch.float32, -100)
    h.requires_grad_(), w.requires_grad_()
    loss = kernel_lce(h, w, t, label_smoothing=0.1, chunk_size=CHUNK)
    (3.0 * loss).backward(retain_graph=True)
    loss.backward()  # the saved gradients were not scaled in place: 3 + 1
    _, dh, dw = loss_and_grads(ref_lce, h, w, t, label_smoothing=0.1)
    torch.testing.assert_close(h.grad, 4 * dh, atol=4e-5 * dh.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(w.grad, 4 * dw, atol=4e-5 * dw.abs().max().item(), rtol=1e-4)


def test_requires_grad_subsets_skip_work(monkeypatch):
    """Only the gradients asked for are computed; without any, the kernel writes no gradient.
    Nothing of the inputs is saved for backward (ZeRO-3 would keep the gathered weight)."""
    import fastcap.kernels.lce as lce

    calls = []
    real = lce._ce_rows
    monkeypatch.setattr(lce, "_ce_rows", lambda x, g, *a: (calls.append(g), real(x, g, *a)))
    h0, w0, t = make_inputs(37, 101, 48, torch.float32, -100)
    want_loss, want_dh, want_dw = loss_and_grads(ref_lce, h0, w0, t)
    for need_h, need_w in ((True, False), (False, True), (True, True)):
        h, w = h0.clone().requires_grad_(need_h), w0.clone().requires_grad_(need_w)
        loss = kernel_lce(h, w, t, chunk_size=CHUNK)
        saved = loss.grad_fn.saved_tensors
        assert all(s is None or s.data_ptr() not in (h.data_ptr(), w.data_ptr()) for s in saved)
        assert [s is not None for s in saved] == [need_h, need_w]
        loss.backward()
        if need_h:
            torch.testing.assert_close(h.grad, want_dh, atol=1e-6, rtol=1e-4)
        if need_w:
            torch.testing.assert_close(w.grad, want_dw, atol=1e-6, rtol=1e-4)
    calls.clear()
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.no_grad():
        loss = kernel_lce(h, w, t, chunk_size=CHUNK)
    loss_plain = kernel_lce(h0, w0, t, chunk_size=CHUNK)
    assert calls and all(g is None for g in calls)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_plain, want_loss, atol=1e-6, rtol=1e-5)


def test_empty_batch_and_bad_dtypes():
    h, w = torch.randn(0, 16, device=DEVICE), torch.randn(11, 16, device=DEVICE)
    loss, dh, dw = loss_and_grads(kernel_lce, h, w, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and dh.shape == (0, 16) and torch.count_nonzero(dw) == 0
    with pytest.raises(ValueError, match="share a dtype"):
        kernel_lce(torch.randn(4, 16), torch.randn(11, 16).half(), torch.zeros(4, dtype=torch.long))


def test_triton_matches_ref_through_the_public_op(monkeypatch):
    """``lce=triton`` runs this kernel (interpreted without a GPU) and agrees with ``lce=ref``:
    loss and both gradients, fp32, smoothing and ignored targets, grad_output != 1."""
    loaded = []
    real_load = dispatch._load
    monkeypatch.setattr(dispatch, "_load", lambda path: (loaded.append(path), real_load(path))[1])
    h0, w0, t = make_inputs(150, 333, 40, torch.float32, 3)
    t = t.int()  # any integer dtype
    results = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("FASTCAP_KERNELS", f"lce={impl}")
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = public_lce(h, w, t, ignore_index=3, label_smoothing=0.1)
        loss.backward(torch.tensor(0.7, device=DEVICE))
        results[impl] = (loss.detach(), h.grad, w.grad)
        assert loaded[-1] == dispatch.IMPLS["lce"][impl]
    for name, got, want in zip(NAMES, results["triton"], results["ref"]):
        tol = {"atol": 1e-5 * want.abs().max().item(), "rtol": 1e-4}
        torch.testing.assert_close(got, want, **tol, msg=name)


def norm_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# DeepSpeed's fp16 engine starts its dynamic loss scale at 2**16 (initial_scale_power 16) and
# keeps it there while no step overflows; 2**10 is where it settles after a few overflows.
@pytest.mark.parametrize("loss_scale", [2.0**16, 2.0**10])
def test_fp16_loss_scaling_keeps_gradient_precision(loss_scale):
    """fp16 training multiplies the loss by a scale S, so that small gradients survive fp16;
    the fused op computes its gradients in the forward, before S is known. They must not be
    rounded to fp16 before S multiplies them: d h / n of a 1024-row batch sits in fp16's
    subnormal range (below 6.1e-5), where rounding first flushes or coarsens it. What the
    optimiser sees, the stored h.grad / S and w.grad / S, must be as close to the fp64
    definition as PyTorch's own fp16 computation (the reference, autograd scaling d logits by S
    before rounding them): at most twice its error, and no more entries flushed to zero."""
    N, V, d = 1024, 1024, 64
    h = torch.randn(N, d, device=DEVICE).half()
    w = (torch.randn(V, d, device=DEVICE) * 0.02).half()  # a freshly initialised tied head
    t = torch.randint(0, V, (N,), device=DEVICE)
    exact = loss_and_grads(naive_lce, h.double(), w.double(), t)[1:]
    stored = {}
    for name, fn, kw in (("kernel", kernel_lce, {"chunk_size": 256}), ("ref", ref_lce, {})):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        (fn(hh, ww, t, **kw) * loss_scale).backward()
        assert hh.grad.dtype == ww.grad.dtype == torch.float16
        stored[name] = (hh.grad.double() / loss_scale, ww.grad.double() / loss_scale)
    for i, what in enumerate(("d h", "d weight")):
        err = {k: norm_err(g[i], exact[i]) for k, g in stored.items()}
        flushed = {k: ((g[i] == 0) & (exact[i] != 0)).double().mean().item()
                   for k, g in stored.items()}  # fmt: skip
        msg = f"{what} at scale {loss_scale:g}: relative error {err}, flushed to zero {flushed}"
        assert err["kernel"] <= 2 * err["ref"], msg
        assert flushed["kernel"] <= flushed["ref"], msg
