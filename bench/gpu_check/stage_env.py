"""Stage ``env``: the device, the versions, which optional packages exist, and two measured
ceilings: a device-to-device copy (GB/s, read + write counted) and a large matmul (TFLOP/s)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform

from flops import bf16_peak_tflops, matmul_flops

from .harness import Report, time_ms

OPTIONAL = ("deepspeed", "wandb", "pycocoevalcap", "tokenizers", "torchvision", "PIL", "numpy")


def run(rep: Report, a) -> None:
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
        tf = matmul_flops(n, n, n) / ms / 1e9
        return {"n": n, "dtype": str(dt), "ms": round(ms, 3), "tflops": round(tf, 3)}

    rep.item("copy_d2d" if cuda else "copy_cpu", copy)
    rep.item("matmul_bf16_8192" if cuda else "matmul_fp32_512_cpu", matmul)
