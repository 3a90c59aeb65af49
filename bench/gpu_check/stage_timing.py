"""Stage ``timing``: every kernel against its reference and peers at the issues' shapes.

CUDA events, warm-up (which also absorbs autotuning), the median of repeats over rotating input
sets, TFLOP/s from the analytic counts of ``bench/flops.py`` (the ones the pytest benchmarks
use), peak memory above the inputs. In a dry run: tiny shapes, Triton in the interpreter; the
times only show that the code runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from flops import attention_flops, moe_flops, siglip_flops

from .harness import Report, Skip, peak_mib, time_ms


def run(rep: Report, a) -> None:
    import torch
    import torch.nn.functional as F

    from fastcap.common.rope import rope_cos_sin
    from fastcap.ops.ref.attention import attention as ref_attn
    from fastcap.ops.ref.moe import moe_ffn as ref_moe
    from fastcap.ops.ref.rope import apply_rope
    from fastcap.ops.ref.siglip import siglip_loss as naive_siglip
    from fastcap.ops.ref.siglip import siglip_loss_chunked

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    warmup, reps = (1, 2) if a.dry_run else ((2, 5) if a.quick else (3, 10))
    note = (
        "dry run: tiny shapes, Triton in the interpreter; the times only show the code runs"
        if a.dry_run
        else "median of CUDA-event times; the first warm-up call autotunes"
    )
    rep.set(dtype=str(dt), warmup=warmup, reps=reps, note=note)

    def triton_or_skip():
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("no GPU and TRITON_INTERPRET is not set")

    def timed(fn, make, flops, n_sets=2):
        sets = [make() for _ in range(n_sets)]  # rotate: no cache sees the same inputs twice
        ms = time_ms(lambda i: fn(*sets[i % n_sets]), warmup, reps)
        mem = peak_mib(lambda: fn(*sets[0]))
        out = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 4), "peak_mib": mem}
        out["summary"] = f"{ms:.3f} ms, {out['tflops']} TFLOP/s, peak {mem} MiB"
        return out

    # --- attention: (B, H, Lq, Lk, D, causal, rope, ragged)
    att = {
        "self_32": (256, 8, 32, 32, 64, True, True, True),
        "cross_32x64": (256, 8, 32, 64, 64, False, False, False),
        "cross_32x196": (256, 8, 32, 196, 64, False, False, False),
        "long_4096": (4, 16, 4096, 4096, 128, True, True, False),
    }
    if a.dry_run:
        att = {
            n: (2, 2, min(lq, 16), min(lk, 24), 32, c, r, p)
            for n, (_, _, lq, lk, _, c, r, p) in list(att.items())[:2]
        }
    tables: dict = {}
    queue: list[tuple[bool, str, Callable[[], dict]]] = []  # (largest shape?, name, item)

    def sdpa_rope(q, k, v, causal, kv_lens, rope_theta):
        # right padding needs no mask under causal self-attention (real rows see real keys)
        if rope_theta is not None:
            Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
            if (Lk, D) not in tables:  # a model caches its tables
                tables[(Lk, D)] = rope_cos_sin(torch.arange(Lk, device=q.device), D, rope_theta)
            cos, sin = tables[(Lk, D)]
            q, k = apply_rope(q, cos[Lk - Lq :], sin[Lk - Lq :]), apply_rope(k, cos, sin)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def triton_attn(q, k, v, causal, kv_lens, rope_theta):
        from fastcap.kernels.attention import attention

        return attention(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta)

    def reference_attn(q, k, v, causal, kv_lens, rope_theta):
        return ref_attn(q, k, v, causal=causal, kv_lens=kv_lens, rope_theta=rope_theta)

    att_impls = {"triton": triton_attn, "ref": reference_attn, "sdpa+rope": sdpa_rope}
    for shape, (B, H, Lq, Lk, D, causal, rope, ragged) in att.items():
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in att_impls.items():

                def run(
                    B=B,
                    H=H,
                    Lq=Lq,
                    Lk=Lk,
                    D=D,
                    causal=causal,
                    rope=rope,
                    ragged=ragged,
                    mode=mode,
                    impl=impl,
                    fn=fn,
                ):
                    if impl == "triton":
                        triton_or_skip()
                    grad = mode == "fwd+bwd"

                    def make():
                        q, k, v = (
                            torch.randn(B, H, L, D, device=dev, dtype=dt, requires_grad=grad)
                            for L in (Lq, Lk, Lk)
                        )
                        lens = torch.randint(1, Lk + 1, (B,), device=dev) if ragged else None
                        return q, k, v, lens, torch.randn(B, H, Lq, D, device=dev, dtype=dt)

                    def step(q, k, v, lens, do):
                        th = 10000.0 if rope else None
                        if not grad:
                            with torch.no_grad():
                                return fn(q, k, v, causal, lens, th)
                        return torch.autograd.grad(fn(q, k, v, causal, lens, th), (q, k, v), do)

                    return timed(step, make, attention_flops(B, H, Lq, Lk, D, causal, grad))

                queue.append((shape == "long_4096", f"attention/{shape}/{mode}/{impl}", run))

    # --- MoE: (T, d, f, E, k)
    moe_shapes = {"T8192": (8192, 1024, 512, 64, 6), "T32768": (32768, 1024, 512, 64, 6)}
    if a.quick:
        moe_shapes.pop("T32768")
    if a.dry_run:
        moe_shapes = {"T61": (61, 32, 16, 8, 2)}

    def grouped_mm(x, w13, w2, ids, tw):
        f, k = w2.shape[1], ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=w13.shape[0])
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = order // k
        h = torch._grouped_mm(x[tok], w13, offs=offs)
        y = torch._grouped_mm(F.silu(h[:, :f]) * h[:, f:], w2, offs=offs)
        return torch.zeros_like(x).index_add(0, tok, y * tw.reshape(-1)[order, None].to(x.dtype))

    def moe_impl(name):
        def call(*args):
            from fastcap.kernels import moe

            return (moe.moe_ffn if name == "triton" else moe.moe_ffn_cuda)(*args)

        return call

    moe_impls = {
        "triton": moe_impl("triton"),
        "triton+ext_align": moe_impl("ext"),
        "grouped_mm": grouped_mm,
        "ref": ref_moe,
    }
    for shape, (T, d, f, E, k) in moe_shapes.items():
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in moe_impls.items():

                def run(T=T, d=d, f=f, E=E, k=k, mode=mode, impl=impl, fn=fn):
                    if impl.startswith("triton"):
                        triton_or_skip()
                    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
                        raise Skip("this torch has no torch._grouped_mm")
                    # torch._grouped_mm on the CPU is bf16 only
                    dtype = torch.bfloat16 if impl == "grouped_mm" else dt
                    grad = mode == "fwd+bwd"

                    def make():
                        x = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=grad)
                        w13 = (torch.randn(E, d, 2 * f, device=dev) / d**0.5).to(dtype)
                        w2 = (torch.randn(E, f, d, device=dev) / f**0.5).to(dtype)
                        tw, ids = torch.randn(T, E, device=dev).softmax(-1).topk(k, dim=-1)
                        tw = tw.to(dtype)
                        for t in (w13, w2, tw):
                            t.requires_grad_(grad)
                        return x, w13, w2, ids, tw, torch.randn(T, d, device=dev, dtype=dtype)

                    def step(x, w13, w2, ids, tw, dout):
                        if not grad:
                            with torch.no_grad():
                                return fn(x, w13, w2, ids, tw)
                        return torch.autograd.grad(fn(x, w13, w2, ids, tw), (x, w13, w2, tw), dout)

                    return timed(step, make, moe_flops(T, d, f, k, grad))

                queue.append((shape == "T32768", f"moe/{shape}/{mode}/{impl}", run))

    # --- SigLIP, forward + backward at d 512
    sizes = [1024, 8192] if a.quick else [1024, 8192, 32768]
    D_sig = 512
    if a.dry_run:
        sizes, D_sig = [67], 32

    def triton_siglip(*args):
        from fastcap.kernels.siglip import siglip_loss

        return siglip_loss(*args)

    sig_impls = {"triton": triton_siglip, "chunked": siglip_loss_chunked, "naive": naive_siglip}
    for B in sizes:
        for impl, fn in sig_impls.items():

            def run(B=B, impl=impl, fn=fn):
                if impl == "triton":
                    triton_or_skip()

                def make():
                    img, txt = (
                        F.normalize(torch.randn(B, D_sig, device=dev), dim=-1)
                        .to(dt)
                        .requires_grad_()
                        for _ in range(2)
                    )
                    ls = torch.tensor(math.log(10.0), device=dev, requires_grad=True)
                    lb = torch.tensor(-10.0, device=dev, requires_grad=True)
                    return img, txt, ls, lb

                def step(*args):
                    return torch.autograd.grad(fn(*args), args)

                try:
                    return timed(step, make, siglip_flops(B, D_sig), n_sets=1 if B > 8192 else 2)
                except torch.cuda.OutOfMemoryError:
                    raise Skip(f"{impl} at B={B} does not fit in this GPU's memory") from None

            queue.append((B > 8192, f"siglip/B{B}_d{D_sig}/fwd+bwd/{impl}", run))

    # the largest shapes last: if the stage runs out of time, they are what is lost
    for _, name, run in sorted(queue, key=lambda q: q[0]):
        rep.item(name, run)
