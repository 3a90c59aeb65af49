"""moe_align: the compiled extension (CPU twin here, CUDA where present) and the PyTorch version
against a plain Python counting sort; argument checks; the nvcc compile of the CUDA source."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcap.common import moe_align as ma

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


def align_py(ids: list[int], num_experts: int, block_m: int):
    """The definition: pairs grouped by expert in increasing pair id, segments padded."""
    P = len(ids)
    slots = ma.max_padded(P, num_experts, block_m)
    sorted_ids, expert_ids = [P] * slots, [-1] * (slots // block_m)
    off = 0
    for e in range(num_experts):
        mine = [p for p, i in enumerate(ids) if i == e]
        sorted_ids[off : off + len(mine)] = mine
        n_blocks = -(-len(mine) // block_m)
        expert_ids[off // block_m : off // block_m + n_blocks] = [e] * n_blocks
        off += n_blocks * block_m
    return sorted_ids, expert_ids, off


def draw(T: int, k: int, E: int, routing: str, dtype=torch.int64) -> torch.Tensor:
    if routing == "uniform":
        ids = torch.randint(0, E, (T, k))
    elif routing == "one_expert":  # every pair on one expert (the last: all before it empty)
        ids = torch.full((T, k), E - 1)
    else:  # "sparse": a random third of the experts get everything, the rest nothing
        used = torch.randperm(E)[: max(1, E // 3)]
        ids = used[torch.randint(0, used.numel(), (T, k))]
    return ids.to(dtype)


def check(out, ids: torch.Tensor, E: int, block_m: int) -> None:
    sorted_ids, expert_ids, total = out
    want_sorted, want_experts, want_total = align_py(ids.reshape(-1).tolist(), E, block_m)
    assert sorted_ids.dtype == expert_ids.dtype == total.dtype == torch.int32
    assert sorted_ids.tolist() == want_sorted
    assert expert_ids.tolist() == want_experts
    assert total.tolist() == [want_total]


IMPLS = ["ext", "torch"]


@pytest.fixture(scope="module", autouse=True)
def built():
    ma.load_extension()  # first use builds it (~20 s), later runs load the cache


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["uniform", "one_expert", "sparse"])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("E", [1, 8, 64])
@pytest.mark.parametrize("T", [1, 31, 1023, 3001])
def test_matches_definition(T, E, k, block_m, routing, device, impl):
    ids = draw(T, k, E, routing).to(device)
    check(ma.moe_align(ids, E, block_m, impl=impl), ids.cpu(), E, block_m)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_int32_ids_and_odd_block(impl, device):
    ids = draw(257, 3, 13, "uniform", torch.int32).to(device)
    check(ma.moe_align(ids, 13, 7, impl=impl), ids.cpu(), 13, 7)


@pytest.mark.parametrize("device", DEVICES)
def test_ext_equals_torch_bitwise(device):
    ids = draw(4099, 6, 64, "uniform").to(device)
    for a, b in zip(ma.moe_align(ids, 64, 64, impl="ext"), ma.moe_align_torch(ids, 64, 64)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_registered_op(device):
    ids = draw(33, 2, 8, "uniform").to(device)
    torch.library.opcheck(torch.ops.fastcap.moe_align.default, (ids, 8, 16))


def test_checks():
    ids = torch.tensor([[0, 1], [2, 8]])
    with pytest.raises(RuntimeError, match=r"outside \[0, 8\)"):
        torch.ops.fastcap.moe_align(ids, 8, 16)
    with pytest.raises(ValueError, match="lie in"):
        ma.moe_align_torch(ids, 8, 16)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        torch.ops.fastcap.moe_align(ids.float(), 9, 16)
    with pytest.raises(RuntimeError, match="must be \\(T, k\\)"):
        torch.ops.fastcap.moe_align(ids.view(-1), 9, 16)
    with pytest.raises(RuntimeError, match="block_m must be >= 1"):
        torch.ops.fastcap.moe_align(ids, 9, 0)
    with pytest.raises(ValueError, match="impl must be"):
        ma.moe_align(ids, 9, 16, impl="cuda")


def test_unavailable_extension(monkeypatch, caplog):
    monkeypatch.setattr(ma, "_ext_state", {"error": "OSError: no compiler (simulated)"})
    ids = draw(5, 2, 4, "uniform")
    with pytest.raises(RuntimeError, match="no compiler"):
        ma.moe_align(ids, 4, 16, impl="ext")
    with caplog.at_level(logging.INFO, logger="fastcap.ops"):
        check(ma.moe_align(ids, 4, 16), ids, 4, 16)
    assert "falls back to PyTorch" in caplog.text
    from fastcap.kernels import moe

    with pytest.raises(RuntimeError, match="no compiler"):
        moe.moe_ffn_cuda  # noqa: B018 - the attribute access is what builds/raises


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_nvcc_compiles_cuda_source(tmp_path):
    """The CUDA kernel compiles for A100 (sm_80) and H100/H200 (sm_90); no GPU needed."""
    from torch.utils.cpp_extension import include_paths

    nvcc = Path(shutil.which("nvcc"))
    incs = include_paths("cpu")
    # CUDA headers that torch's includes pull in may live in the pip CUDA wheels.
    incs += [str(p) for p in Path(torch.__file__).parents[1].glob("nvidia/cu*/include")]
    src = ma.csrc_dir() / "moe_align_cuda.cu"
    cmd = [
        str(nvcc), "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-c", str(src),
        "-o", str(tmp_path / "moe_align_cuda.o"),
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        *(f"-I{p}" for p in incs),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    # The fat binary names the architecture of each embedded cubin.
    obj = (tmp_path / "moe_align_cuda.o").read_bytes()
    assert b"sm_80" in obj and b"sm_90" in obj


_NO_TOOLKIT = r"""
import json, logging, os, sys
import torch
from unittest import mock
from torch.utils import cpp_extension
from fastcap.common import capability, moe_align as ma
from fastcap.ops import dispatch

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
cpp_extension.CUDA_HOME = None  # torch from pip, a C++ compiler, no nvcc
cuda = torch.device("cuda")
out = {}
with capability.simulate("a100"), mock.patch.object(torch.cuda, "is_available", lambda: True):
    ma.load_extension()  # what such a machine builds: the CPU twin only
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    out["cpu_kernel"] = has("fastcap::moe_align", "CPU")
    out["cuda_kernel"] = has("fastcap::moe_align", "CUDA")
    os.environ["FASTCAP_KERNELS"] = "auto"
    out["auto"] = dispatch.resolve("moe", cuda)
    for spec in ("moe=cuda", "cuda"):
        os.environ["FASTCAP_KERNELS"] = spec
        try:
            dispatch.validate(("moe",), cuda)
            out[spec] = None
        except RuntimeError as e:
            out[spec] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_built_without_cuda_toolkit(tmp_path):
    """A GPU machine with torch from pip and no CUDA toolkit builds a CPU-only fastcap_C: the
    import succeeds but the op has no CUDA kernel. ``auto`` must then pick triton for CUDA
    tensors, and an explicit ``moe=cuda`` (or a bare ``cuda``) must be a one-line error naming
    the missing toolkit, before any work. A fresh process (the policy patched to an A100, the
    toolkit hidden) and a fresh build folder, so the build really is the toolkit-less one."""
    env = {**os.environ, "FASTCAP_EXT_DIR": str(tmp_path / "ext")}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", _NO_TOOLKIT], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["cpu_kernel"] and not out["cuda_kernel"], out
    assert out["auto"] == "triton", out
    assert "fastcap.ops: moe -> triton (auto)" in run.stdout, run.stdout[-3000:]
    for spec in ("moe=cuda", "cuda"):
        msg = out[spec]
        assert msg is not None, f"FASTCAP_KERNELS={spec} passed validation without a CUDA kernel"
        assert "\n" not in msg, msg
        assert "without its CUDA kernel: no CUDA toolkit found" in msg, msg
        assert "valid choices for moe" in msg, msg
