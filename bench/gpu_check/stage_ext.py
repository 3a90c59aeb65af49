"""Stage ``ext``: build ``fastcap_C`` for this device's architecture only (one compile), then
check that it aligns exactly as the PyTorch implementation does, at awkward sizes."""

from __future__ import annotations

import os
import time

from .harness import Report, Skip


def run(rep: Report, a) -> None:
    import torch

    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this device only: one compile
    from fastcap.common import moe_align as ma

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
