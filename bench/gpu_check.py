#!/usr/bin/env python
"""The one script to run when a GPU is lent: ceilings, the CUDA extension, every kernel checked
against its reference in bf16/fp16/fp32, every kernel timed against its reference and peers at
the benchmark shapes, and a 50-step training run of the captioner with ``ref`` and ``auto``.

    python bench/gpu_check.py --out runs/gpu-check            # on the GPU (make gpu-check)
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check  # on a CPU, before spending a GPU

Stages, in order (``--stages env,ext`` runs a subset):

* ``env``     device, torch/Triton/CUDA versions, which optional packages exist, and measured
              ceilings: a 2 GiB device-to-device copy (GB/s, read + write counted) and a bf16
              8192^3 matmul (TFLOP/s).
* ``ext``     build ``fastcap_C`` (:mod:`fastcap.ops.moe_align`) for this device's architecture
              only, then check it against the PyTorch alignment.
* ``correct`` each kernel against its reference in bf16, fp16 and fp32: outputs and every
              gradient, fresh random inputs (the seed is recorded), output buffers poisoned with
              NaN through the CUDA caching allocator (the launchers allocate their own outputs).
              Rule (flash-attention's): the kernel's error against the reference computed in fp64
              is at most 2x the reference's own error in the same dtype plus ``TOL[dtype]``,
              errors as max |got - gold| / max |gold|.
* ``timing``  kernels against references and peers at the issues' shapes: CUDA events, warm-up
              (which also absorbs autotuning), median of repeats, TFLOP/s from an analytic count,
              peak memory above the inputs.
* ``train``   the shapes captioner trained 50 steps with ``FASTCAP_KERNELS=ref`` and with
              ``auto`` from the same weights and batches: losses side by side, step time, MFU.
              A plain PyTorch loop with AdamW and fp32 master weights (bf16 forward/backward on a
              GPU, as DeepSpeed's bf16 mode does), so neither DeepSpeed nor ``tokenizers`` is
              needed: the data are rendered in memory and tokenised with a word vocabulary. The
              ZeRO-3 step itself is measured by ``bench/bench_step.py``.

Each stage runs in its own process with a time limit (the process group is killed when it runs
over) inside a global budget of 7.5 minutes, and writes ``<out>/<stage>.json`` after every item,
so a hang or a crash loses at most the item in flight. ``<out>/summary.json`` gathers all of it
and a short table is printed last.

``--dry-run`` (no GPU needed): the same stages at tiny shapes and few steps, Triton under
``TRITON_INTERPRET=1``; bf16 checks are skipped there (the interpreter's bf16 is wrong) and the
timings only prove that the code runs. ``--quick``: fewer repeats and steps, largest shapes left
out.

Needs only torch, Triton, ninja and nvcc (plus numpy, Pillow and torchvision for the training
stage, which says so and skips when they are missing); works from a plain checkout without
``pip install``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "ext", "correct", "timing", "train")
# Seconds per stage on a GPU, and the whole run's budget: the issue allows 8 minutes.
LIMIT_S = {"env": 60, "ext": 180, "correct": 150, "timing": 240, "train": 150}
TOTAL_S = 450
DRY_LIMIT_S = {"env": 60, "ext": 150, "correct": 150, "timing": 120, "train": 120}
DRY_TOTAL_S = 420
# Kept back for each later stage when a stage's limit is set, so one slow stage cannot starve
# the rest of the run.
RESERVE_S = {"env": 15, "ext": 30, "correct": 60, "timing": 60, "train": 60}
OPTIONAL = ("deepspeed", "wandb", "pycocoevalcap", "tokenizers", "torchvision", "PIL", "numpy")

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


# ----------------------------------------------------------------------------- model FLOPs

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


def model_flops_per_image(cfg, caption_len: int) -> float:
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
    and the SigLIP loss's B x B products (2 B e per image, under 0.1% here).
    """
    d, L = cfg.width, caption_len
    trunk, channels = _trunk_flops(cfg.trunk, cfg.image_size, cfg.trunk_stride)
    grid = cfg.image_size // cfg.trunk_stride
    n = (grid // cfg.patch) ** 2
    fwd = trunk + _conv(channels, d, 1, grid)
    if cfg.patch > 1:
        fwd += 2.0 * n * cfg.patch**2 * d * d
    h = cfg.ffn_hidden
    attn = lambda lq, lk: 2.0 * lq * d * d * 2 + 2.0 * lk * d * 2 * d + 4.0 * lq * lk * d
    fwd += cfg.encoder_layers * (attn(n, n) + 6.0 * n * d * h)
    fwd += 2.0 * d * cfg.embed_dim  # pooled image embedding
    moe = cfg.moe
    for i in range(cfg.unimodal_layers + cfg.multimodal_layers):
        fwd += attn(L, L)
        if i >= cfg.unimodal_layers:
            fwd += attn(L, n)  # q/o over the caption, k/v projected once over the image tokens
        if moe.enabled and not (moe.first_dense and i == 0):
            f = moe.expert_hidden
            fwd += L * (moe.top_k * 6.0 * d * f + 6.0 * d * moe.num_shared * f)
            fwd += 2.0 * L * d * moe.num_experts
        else:
            fwd += 6.0 * L * d * h
    fwd += 2.0 * (L - 1) * d * cfg.vocab_size + 2.0 * d * cfg.embed_dim
    return 3.0 * fwd


# ----------------------------------------------------------------------------- small helpers


def _bootstrap() -> None:
    """Make ``fastcap`` and ``fastcap.kernels`` importable from a plain checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import fastcap.kernels  # noqa: F401
    except ImportError:
        # not installed: ``kernels/`` is the package ``fastcap.kernels`` (see pyproject.toml)
        spec = importlib.util.spec_from_file_location(
            "fastcap.kernels",
            REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastcap.kernels"] = mod
        spec.loader.exec_module(mod)


class Report:
    """A stage's results, rewritten to ``<out>/<stage>.json`` after every item."""

    def __init__(self, out: Path, stage: str, dry_run: bool):
        self.path = out / f"{stage}.json"
        self.data: dict = {"stage": stage, "status": "running", "dry_run": dry_run, "items": []}
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def set(self, **kw) -> None:
        self.data.update(kw)
        self.flush()

    def item(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one item; an exception is recorded as that item's failure, not the stage's."""
        t0 = time.perf_counter()
        try:
            res = {"name": name, "status": "ok", **fn()}
        except Skip as e:
            res = {"name": name, "status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - one failing item must not lose the rest
            res = {"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            res["traceback"] = traceback.format_exc(limit=6)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["items"].append(res)
        self.flush()
        mark = {"ok": "ok  ", "skipped": "skip", "failed": "FAIL"}[res["status"]]
        extra = res.get("reason") or res.get("error") or res.get("summary", "")
        print(f"[{self.data['stage']}] {mark} {name} ({res['seconds']} s) {extra}", flush=True)
        return res


class Skip(Exception):
    """An item that cannot run here; the message is the reason."""


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[int], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn(i)`` over ``reps`` calls after ``warmup`` calls; ``i``
    counts calls so ``fn`` can rotate among input sets. CUDA events on a GPU."""
    import torch

    for i in range(warmup):
        fn(i)
    sync()
    times = []
    for i in range(warmup, warmup + reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory one call adds above what is allocated before it (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


# ----------------------------------------------------------------------------- stage: env


def stage_env(rep: Report, a) -> None:
    import torch

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "optional_packages": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL},
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info |= {
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "bf16_peak_tflops_datasheet": bf16_peak_tflops(p.name),
        }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"missing ({e})"
    from torch.utils import cpp_extension

    info["cuda_home"] = cpp_extension.CUDA_HOME
    info["ninja"] = cpp_extension.is_ninja_available()
    rep.set(info=info)
    print(json.dumps(info, indent=1), flush=True)

    dev = "cuda" if cuda else "cpu"

    def copy():
        n = (2 * 2**30 if cuda else 64 * 2**20) // 4
        src, dst = torch.rand(n, device=dev), torch.empty(n, device=dev)
        ms = time_ms(lambda i: dst.copy_(src), warmup=2, reps=10)
        return {"bytes": 8 * n, "ms": round(ms, 3), "gbps": round(8 * n / ms / 1e6, 1)}

    def matmul():
        n, dt = (8192, torch.bfloat16) if cuda else (512, torch.float32)
        x, y = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        ms = time_ms(lambda i: x @ y, warmup=3, reps=10)
        tf = 2 * n**3 / ms / 1e9
        return {"n": n, "dtype": str(dt), "ms": round(ms, 3), "tflops": round(tf, 3)}

    rep.item("copy_d2d" if cuda else "copy_cpu", copy)
    rep.item("matmul_bf16_8192" if cuda else "matmul_fp32_512_cpu", matmul)


# ----------------------------------------------------------------------------- stage: ext


def stage_ext(rep: Report, a) -> None:
    import torch

    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this device only: one compile
    from fastcap.ops import moe_align as ma

    def build():
        t0 = time.perf_counter()
        ma.load_extension()
        from torch.utils import cpp_extension

        cu = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
        return {
            "build_or_load_s": round(time.perf_counter() - t0, 1),
            "with_cuda": cu,
            "arch": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "dir": str(ma._build_dir(cu)),
        }

    built = rep.item("build", build)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for T, k, E, bm in [(4099, 6, 64, 16), (1, 2, 5, 64), (8191, 6, 64, 64)]:

        def check(T=T, k=k, E=E, bm=bm):
            if built["status"] != "ok":
                raise Skip("the extension did not build (see the build item)")
            ids = torch.rand(T, E, device=dev).topk(k, dim=-1).indices.to(torch.int32)
            got = ma.moe_align(ids, E, bm, impl="ext")
            want = ma.moe_align_torch(ids, E, bm)
            same = all(torch.equal(g, w) for g, w in zip(got, want))
            if not same:
                raise AssertionError("extension and PyTorch alignment differ")
            return {"identical": True}

        rep.item(f"align_T{T}_k{k}_E{E}_bm{bm}", check)


# ----------------------------------------------------------------------------- stage: correct

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


def _compare(fn, ref, make, dtype, outs: list[str]) -> dict:
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


def stage_correct(rep: Report, a) -> None:
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
        return _compare(
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
        return _compare(fn, ref_moe, make_moe, dtype, ["out", "dx", "dw13", "dw2", "dtw"])

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

        return _compare(
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


# ----------------------------------------------------------------------------- stage: timing


def stage_timing(rep: Report, a) -> None:
    import torch
    import torch.nn.functional as F

    from fastcap.ops.ref.attention import attention as ref_attn
    from fastcap.ops.ref.moe import moe_ffn as ref_moe
    from fastcap.ops.ref.rope import apply_rope, rope_cos_sin
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

                    fl = 4 * B * H * Lq * Lk * D / (2 if causal else 1) * (3.5 if grad else 1)
                    return timed(step, make, fl)

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

                    return timed(step, make, 6.0 * T * k * d * f * (3 if grad else 1))

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
                    return timed(step, make, 6.0 * B * B * D_sig, n_sets=1 if B > 8192 else 2)
                except torch.cuda.OutOfMemoryError:
                    raise Skip(f"{impl} at B={B} does not fit in this GPU's memory") from None

            queue.append((B > 8192, f"siglip/B{B}_d{D_sig}/fwd+bwd/{impl}", run))

    # the largest shapes last: if the stage runs out of time, they are what is lost
    for _, name, run in sorted(queue, key=lambda q: q[0]):
        rep.item(name, run)


# ----------------------------------------------------------------------------- stage: train


def _shapes_batch_data(n: int, size: int, seed: int):
    """n shapes images rendered in memory (uint8 (n, 3, S, S)) and one reference caption each,
    tokenised with a word vocabulary: pad 0, bos 1, eos 2, then the words in sorted order."""
    import numpy as np
    import torch

    from fastcap.data import shapes

    imgs, caps = [], []
    for i in range(n):
        rng = np.random.default_rng(shapes._image_seed(seed, "train", i))
        objects, relation = shapes.sample_scene(rng, "train", size)
        imgs.append(shapes.render(objects, size, rng))
        refs = shapes.references(objects, relation)
        caps.append(refs[i % len(refs)].split())
    vocab = {w: j + 3 for j, w in enumerate(sorted({w for c in caps for w in c}))}
    L = max(len(c) for c in caps) + 2
    tokens = torch.zeros(n, L, dtype=torch.long)
    lens = torch.tensor([len(c) + 2 for c in caps])
    for i, c in enumerate(caps):
        tokens[i, : len(c) + 2] = torch.tensor([1, *(vocab[w] for w in c), 2])
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, tokens, lens, len(vocab) + 3


def stage_train(rep: Report, a) -> None:
    import torch

    for mod in ("torchvision", "numpy", "PIL"):
        if importlib.util.find_spec(mod) is None:
            raise Skip(f"{mod} is not installed (the captioner and the shapes renderer need it)")
    from fastcap.data.images import normalize
    from fastcap.model import Captioner
    from fastcap.ops import dispatch
    from fastcap.train.config import preset

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    steps = 3 if a.dry_run else (20 if a.quick else 50)
    B = 8 if a.dry_run else 64
    cfg = preset("shapes-tiny").model
    cfg.moe.enabled = True  # routed experts too, so that ``auto`` exercises every kernel
    if not a.dry_run:
        # head dim 64, as the correctness and timing shapes: their compiled kernels are reused
        cfg.heads = 2
    if a.dry_run:
        cfg.image_size, cfg.width, cfg.heads, cfg.encoder_layers = 32, 64, 4, 1
        cfg.multimodal_layers, cfg.embed_dim = 1, 32
    images, tokens, lens, vocab = _shapes_batch_data(B * 4, cfg.image_size, seed=0)
    cfg.vocab_size = vocab
    bf16 = cuda and torch.cuda.is_bf16_supported()
    rep.set(
        steps=steps,
        batch=B,
        images=len(images),
        vocab=vocab,
        model=dataclasses.asdict(cfg),
        precision="bf16 compute, fp32 master weights (AdamW)" if bf16 else "fp32",
        loop="plain PyTorch + AdamW (the ZeRO-3 step is bench/bench_step.py's)",
    )

    def train(spec: str) -> dict:
        os.environ["FASTCAP_KERNELS"] = spec
        torch.manual_seed(0)
        master = Captioner(cfg).to(dev)
        model = Captioner(cfg).to(dev, torch.bfloat16 if bf16 else torch.float32)
        model.load_state_dict(master.state_dict())
        opt = torch.optim.AdamW(master.parameters(), lr=1e-3, weight_decay=0.05)
        chosen = {op: dispatch.resolve(op, dev) for op in dispatch.OPS}
        losses, times = [], []
        for s in range(steps):
            idx = torch.arange(s * B, (s + 1) * B) % len(images)
            L = int(lens[idx].max())
            x = normalize(images[idx].to(dev)).to(next(model.parameters()).dtype)
            sync()
            t0 = time.perf_counter()
            out = model(x, tokens[idx, :L].to(dev), lens[idx].to(dev))
            out["loss"].backward()
            for p, q in zip(master.parameters(), model.parameters()):
                p.grad = q.grad.float() if q.grad is not None else None
                q.grad = None
            torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, q in zip(master.parameters(), model.parameters()):
                    q.copy_(p)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(float(out["loss"].detach()))
            del out
        warm = times[min(5, steps - 1) :]  # the first steps compile and autotune
        step_s = statistics.median(warm)
        tok = float((lens - 1).float().mean()) * B
        res = {
            "kernels": chosen,
            "losses": [round(v, 5) for v in losses],
            "step_ms_median": round(step_s * 1e3, 2),
            "images_per_s": round(B / step_s, 1),
            "tokens_per_s": round(tok / step_s, 1),
        }
        peak = bf16_peak_tflops(torch.cuda.get_device_name()) if cuda else None
        fl = model_flops_per_image(cfg, int(lens.float().mean().round())) * B / step_s
        res["model_tflops"] = round(fl / 1e12, 3)
        res["mfu"] = round(fl / 1e12 / peak, 4) if peak else None
        res["summary"] = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {res['step_ms_median']} ms"
        return res

    runs = {spec: rep.item(f"train/{spec}", lambda s=spec: train(s)) for spec in ("ref", "auto")}

    def compare():
        r, u = runs["ref"], runs["auto"]
        if r["status"] != "ok" or u["status"] != "ok":
            raise Skip("a training run failed; nothing to compare")
        diff = max(abs(x - y) for x, y in zip(r["losses"], u["losses"]))
        last = lambda v: statistics.fmean(v[-5:])
        res = {
            "max_abs_loss_diff": round(diff, 5),
            "final_loss_ref": round(last(r["losses"]), 4),
            "final_loss_auto": round(last(u["losses"]), 4),
            "speedup_auto_over_ref": round(r["step_ms_median"] / u["step_ms_median"], 3),
        }
        if not cuda:
            res["note"] = "CPU: auto resolves to ref for CPU tensors: both runs are the same code"
        # bf16 trajectories of different kernels drift apart; a broken kernel diverges outright
        if res["final_loss_auto"] > res["final_loss_ref"] + 0.25 or not math.isfinite(diff):
            raise AssertionError(f"auto trains worse than ref: {res}")
        res["summary"] = (
            f"last-5 loss ref {res['final_loss_ref']} auto {res['final_loss_auto']}, "
            f"step {r['step_ms_median']} / {u['step_ms_median']} ms"
        )
        return res

    rep.item("train/compare", compare)


# ----------------------------------------------------------------------------- driver

STAGE_FNS = {
    "env": stage_env,
    "ext": stage_ext,
    "correct": stage_correct,
    "timing": stage_timing,
    "train": stage_train,
}


def _child(a) -> int:
    """Run one stage in this process (called by the driver with --stage)."""
    import torch

    if not torch.cuda.is_available():
        if a.dry_run:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _bootstrap()
    rep = Report(Path(a.out), a.stage, a.dry_run)
    try:
        STAGE_FNS[a.stage](rep, a)
    except Skip as e:
        rep.set(status="skipped", reason=str(e))
        return 0
    except Exception as e:  # noqa: BLE001 - recorded; the driver goes on with the next stage
        rep.set(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return 1
    bad = [i["name"] for i in rep.data["items"] if i["status"] == "failed"]
    rep.set(status="failed" if bad else "ok", failed_items=bad)
    return 0


def _run_stage(a, stage: str, limit: float) -> dict:
    out = Path(a.out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--out", str(out)]
    cmd += ["--dry-run"] * a.dry_run + ["--quick"] * a.quick
    t0 = time.perf_counter()
    # own process group: on a timeout the stage and anything it started (nvcc, ninja) go
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, timed_out = proc.wait(), True
    secs = round(time.perf_counter() - t0, 1)
    path = out / f"{stage}.json"
    res = json.loads(path.read_text()) if path.exists() else {"stage": stage, "items": []}
    if timed_out:
        res["status"] = "timeout"
        res["reason"] = f"killed after its {limit:.0f} s limit; items before it are kept"
    elif res.get("status") in (None, "running"):
        res["status"] = "failed"
        res["error"] = f"the stage process exited with {rc} before finishing"
    res["seconds"] = secs
    path.write_text(json.dumps(res, indent=1, default=str))
    return res


def _headline(res: dict) -> str:
    items = res.get("items", [])
    counts = {s: sum(i["status"] == s for i in items) for s in ("ok", "skipped", "failed")}
    head = "/".join(f"{v} {k}" for k, v in counts.items() if v)
    if res["stage"] == "env":
        head = ", ".join(
            f"{i['gbps']} GB/s" if "gbps" in i else f"{i['tflops']} TFLOP/s"
            for i in items
            if i["status"] == "ok"
        )
    if res["stage"] == "train":
        cmp_ = next((i for i in items if i["name"] == "train/compare"), {})
        head = cmp_.get("summary", head)
    return head or res.get("reason", res.get("error", ""))


def _table(summary: dict) -> str:
    lines = [f"{'stage':8} {'status':8} {'s':>6}  result"]
    for st, res in summary["stages"].items():
        lines.append(f"{st:8} {res['status']:8} {res.get('seconds', 0):6}  {_headline(res)}")
    timing = summary["stages"].get("timing", {}).get("items", [])
    ok = [i for i in timing if i["status"] == "ok"]
    if ok:
        lines.append("")
        lines.append(f"{'timing':44} {'ms':>10} {'TFLOP/s':>8} {'peak MiB':>9}")
        for i in ok:
            lines.append(f"{i['name']:44} {i['ms']:10.3f} {i['tflops']:8.2f} {i['peak_mib']!s:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for <stage>.json and summary.json")
    p.add_argument("--dry-run", action="store_true", help="CPU walk-through at tiny shapes")
    p.add_argument("--quick", action="store_true", help="fewer repeats/steps, no largest shapes")
    p.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.stage:
        return _child(a)
    chosen = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: the full check is for a GPU; use --dry-run on a CPU")
    limits, total = (DRY_LIMIT_S, DRY_TOTAL_S) if a.dry_run else (LIMIT_S, TOTAL_S)
    t_end = time.monotonic() + total
    summary = {
        "argv": sys.argv,
        "dry_run": a.dry_run,
        "quick": a.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "stages": {},
    }
    order = [s for s in STAGES if s in chosen]
    for n, stage in enumerate(order):
        later = sum(RESERVE_S[s] for s in order[n + 1 :])
        left = t_end - time.monotonic()
        limit = min(limits[stage], max(left - later, RESERVE_S[stage]), left)
        if left < 10:
            res = {
                "stage": stage,
                "status": "skipped",
                "items": [],
                "reason": f"the {total} s budget of the whole check is spent",
            }
        else:
            print(f"=== {stage} (limit {limit:.0f} s)", flush=True)
            res = _run_stage(a, stage, limit)
        summary["stages"][stage] = res
        (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["seconds"] = round(total - (t_end - time.monotonic()), 1)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + _table(summary) + f"\n\ntotal {summary['seconds']} s", flush=True)
    failed = [s for s, r in summary["stages"].items() if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
