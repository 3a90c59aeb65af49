"""Compile-only GPU readiness: every Triton kernel at every config its launcher or autotuner can
pick, for sm_80 and sm_90, in fp16 and bf16, compiled without a GPU (tests/gpu_compile.py).

A config fails on a register spill (a stack frame or local memory in the cubin) or on shared
memory above the architecture's limit per block. The table is printed (``pytest -s`` or
``-rP`` shows it; a failure shows it too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_compile  # noqa: E402

NVIDIA = Path(triton.__file__).parent / "backends" / "nvidia"


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _bwd_dkdv_kernel:
  REG:32 STACK:2800 SHARED:1024 LOCAL:16 CONSTANT[0]:520 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    use = gpu_compile.parse_resource_usage(text)
    assert use == {"REG": 32, "STACK": 2800, "SHARED": 1024, "LOCAL": 16}
    row = {"arch": 80, "error": None, "stack": 0, "local": 0, "shared": 163 * 1024}
    assert gpu_compile.problems(row) == []
    assert gpu_compile.problems({**row, "shared": 163 * 1024 + 1})
    assert gpu_compile.problems({**row, "arch": 90, "stack": 8})
    assert gpu_compile.problems({**row, "local": 4})


def test_every_kernel_module_has_compile_targets():
    """A new kernels/<op>.py (lce.py) is compiled by the check below only through this hook."""
    for name in gpu_compile.kernel_modules():
        mod = __import__(f"fastcap.kernels.{name}", fromlist=["compile_targets"])
        assert callable(getattr(mod, "compile_targets", None)), f"kernels/{name}.py"


@pytest.mark.slow
def test_every_kernel_compiles_without_spills(tmp_path):
    """All kernels, all configs, sm_80 and sm_90, fp16 and bf16: no spill, shared memory within
    the limit. Two compile processes; about 2 s per distinct compile."""
    if not (NVIDIA / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton build has no NVIDIA backend or no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, str(HERE / "gpu_compile.py"), "--jobs", "2", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(run.stdout)
    assert out.exists(), run.stderr[-5000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n".join(
        f"{r['name']} {r['config']} sm_{r['arch']} {r['dtype']}: {'; '.join(r['problems'])}"
        for r in bad
    )
    assert run.returncode == 0, run.stderr[-5000:]
    # Every kernel of every module, on both architectures, in both dtypes.
    seen = {(r["name"], r["arch"], r["dtype"]) for r in rows}
    names = {r["name"] for r in rows}
    assert seen == {(n, a, d) for n in names for a in (80, 90) for d in ("fp16", "bf16")}
    for kernel in ("attention.fwd", "attention.dkdv", "attention.dq", "moe.gate_up",
                   "moe.slots_to_pairs", "moe.down_bwd", "moe.expert_wgrad", "siglip.fwd",
                   "siglip.bwd"):  # fmt: skip
        assert kernel in names, kernel
    for module in gpu_compile.kernel_modules():
        assert any(n.split(".")[0] == module for n in names), module
