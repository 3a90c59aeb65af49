"""Stage ``correct``: each kernel against its reference in bf16, fp16 and fp32, outputs and
every gradient, on fresh random inputs (the seed is recorded).

Rule (flash-attention's): the kernel's error against the reference computed in fp64 is at most
2x the reference's own error in the same dtype plus ``TOL[dtype]``, errors as
max |got - gold| / max |gold|. Output buffers are poisoned with NaN through the CUDA caching
allocator first (the launchers allocate their own outputs).
"""

from __future__ import annotations

import json
import math
import os

from .harness import Report, Skip

# Added to 2x the reference's own error; errors are relative to max |gold|.
TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


def _rel(got, gold) -> float:
    got, gold = got.detach().double(), gold.detach().double()
    return float((got - gold).abs().max() / gold.abs().max().clamp(min=1e-30))


def _poison(tensors) -> str:
    """Fill freed CUDA blocks of the outputs' sizes with NaN, so a launcher that leaves an
    element of a fresh ``torch.empty`` output unwritten shows NaN instead of luck."""
    import torch

    if not torch.cuda.is_available():
        return "no (CPU tensors: no caching allocator to poison)"
    junk = [torch.full_like(t, float("nan")) for t in tensors for _ in range(2)]
    del junk  # the blocks go back to the allocator's cache, NaN inside
    return "yes (allocator cache)"


def compare(fn, ref, make, dtype, outs: list[str]) -> dict:
    """Run ``fn`` and ``ref`` (same dtype) and ``ref`` in fp64 on fresh inputs; outputs and
    gradients of every differentiable input against the fp64 gold."""
    import torch

    args, grad_idx = make(dtype)
    gold_args = [
        x.detach().double().requires_grad_(x.requires_grad)
        if (torch.is_tensor(x) and x.is_floating_point())
        else x
        for x in args
    ]

    dy: list = []  # one output gradient, drawn at the first run, shared by all three

    def run(f, xs):
        y = f(*xs)
        if not dy:
            dy.append(torch.randn(y.shape, device=y.device, dtype=torch.float64))
        grads = torch.autograd.grad(y, [xs[i] for i in grad_idx], dy[0].to(y.dtype))
        return [y, *grads]

    gold = run(ref, gold_args)
    own = run(ref, args)
    poisoned = _poison(own)
    got = run(fn, args)
    tol = TOL[str(dtype).removeprefix("torch.")]
    res, ok = {"poisoned": poisoned}, True
    for name, g, o, w in zip(outs, got, own, gold):
        finite = bool(torch.isfinite(g).all())
        err, own_err = _rel(g, w), _rel(o, w)
        bound = 2 * own_err + tol
        ok &= finite and err <= bound
        res[name] = {"err": f"{err:.2e}", "ref_err": f"{own_err:.2e}", "bound": f"{bound:.2e}"}
        if not finite:
            res[name]["nonfinite"] = True
    res["summary"] = (
        "pass"
        if ok
        else "FAIL: "
        + ", ".join(
            n
            for n in outs
            if float(res[n]["err"]) > float(res[n]["bound"]) or "nonfinite" in res[n]
        )
    )
    if not ok:
        raise AssertionError(json.dumps(res))
    return res


def run(rep: Report, a) -> None:
    import torch

    from fastcap.ops.ref.attention import attention as ref_attn
    from fastcap.ops.ref.moe import moe_ffn as ref_moe
    from fastcap.ops.ref.siglip import siglip_loss as ref_siglip

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    rep.set(seed=seed, tol=TOL, rule="err <= 2 * ref_err + TOL[dtype], relative to max |gold|")
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    small = a.dry_run

    # attention cases: (name, B, H, Lq, Lk, D, causal, rope, ragged)
    att = [
        ("self_causal_rope_pad", 3, 2, 37, 37, 64, True, True, True),
        ("cross", 3, 2, 31, 63, 64, False, False, False),
        ("decode_1tok", 3, 2, 1, 37, 64, True, True, True),
        ("long_d128", 1, 2, 257, 257, 128, True, True, False),
    ]
    if small:
        att = [
            (n, 2, 2, min(lq, 17), min(lk, 23), 32, c, r, p)
            for n, _, _, lq, lk, _, c, r, p in att[:3]
        ]

    def make_att(B, H, Lq, Lk, D, causal, rope, ragged):
        def make(dtype):
            q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
            # ragged: lengths from 0 (a row that sees nothing) to Lk
            lens = torch.randint(0, Lk + 1, (B,), device=dev) if ragged else None
            kw = {"causal": causal, "kv_lens": lens, "rope_theta": 10000.0 if rope else None}
            return (q, k, v, kw), [0, 1, 2]

        return make

    def kw_call(f):
        return lambda q, k, v, kw: f(q, k, v, **kw)

    def skip_dtype(dtype):
        if not cuda and dtype == torch.bfloat16:
            raise Skip("bf16 is wrong in the Triton interpreter; checked on a GPU only")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("no GPU and TRITON_INTERPRET is not set")

    def run_att(case, dtype):
        skip_dtype(dtype)
        from fastcap.kernels.attention import attention

        name, *shape = case
        return compare(
            kw_call(attention),
            kw_call(ref_attn),
            make_att(*shape),
            dtype,
            ["out", "dq", "dk", "dv"],
        )

    T, d, f, E, k = (37, 32, 16, 5, 2) if small else (257, 128, 64, 16, 4)

    def make_moe(dtype):
        x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
        w13 = (torch.randn(E, d, 2 * f, device=dev) / d**0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(E, f, d, device=dev) / f**0.5).to(dtype).requires_grad_()
        logits = torch.randn(T, E, device=dev)
        logits[:, -1] = -1e4  # the last expert receives no token: legal, zero gradient
        tw, ids = logits.softmax(-1).topk(k, dim=-1)
        return (x, w13, w2, ids, tw.to(dtype).requires_grad_()), [0, 1, 2, 4]

    def run_moe(impl, dtype):
        skip_dtype(dtype)
        from fastcap.kernels import moe

        fn = moe.moe_ffn if impl == "triton" else moe.moe_ffn_cuda
        return compare(fn, ref_moe, make_moe, dtype, ["out", "dx", "dw13", "dw2", "dtw"])

    B_sig, D_sig = (67, 32) if small else (1023, 512)

    def make_sig(dtype):
        img = torch.nn.functional.normalize(torch.randn(B_sig, D_sig, device=dev), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(B_sig, D_sig, device=dev), dim=-1)
        ls = torch.tensor(math.log(10.0), device=dev, requires_grad=True)
        lb = torch.tensor(-10.0, device=dev, requires_grad=True)
        img, txt = (t.to(dtype).requires_grad_() for t in (img, txt))
        return (img, txt, ls, lb), [0, 1, 2, 3]

    def run_sig(dtype):
        skip_dtype(dtype)
        from fastcap.kernels.siglip import siglip_loss

        return compare(
            siglip_loss, ref_siglip, make_sig, dtype, ["loss", "dimg", "dtxt", "dscale", "dbias"]
        )

    # Every kernel in every dtype first, the other attention cases after: each new case costs
    # Triton compiles, and if the stage runs out of time the coverage lost is the least useful.
    first = [
        (f"attention/{att[0][0]}/{{dt}}", lambda t: run_att(att[0], t)),
        (f"moe/triton/T{T}_E{E}_k{k}/{{dt}}", lambda t: run_moe("triton", t)),
        (f"moe/triton+ext_align/T{T}_E{E}_k{k}/{{dt}}", lambda t: run_moe("triton+ext_align", t)),
        (f"siglip/triton/B{B_sig}_d{D_sig}/{{dt}}", run_sig),
    ]
    rest = [[(f"attention/{c[0]}/{{dt}}", lambda t, c=c: run_att(c, t))] for c in att[1:]]
    for items in [first, *rest]:
        for dtype in dtypes:
            dn = str(dtype).removeprefix("torch.")
            for name, fn in items:
                rep.item(name.format(dt=dn), lambda fn=fn, t=dtype: fn(t))
