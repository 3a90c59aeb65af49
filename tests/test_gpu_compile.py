"""Compile-only GPU readiness: every Triton kernel at every config its launcher or autotuner can
pick, for sm_75 (fp16; the LCE only: the dispatch refuses the tl.dot kernels below sm_80),
sm_80, sm_86, sm_89 and sm_90 (fp16 and bf16), compiled without a GPU (tests/gpu_compile.py),
with the instruction mix of each cubin.

A config fails on a register spill (a stack frame or local memory in the cubin), on shared
memory above the architecture's opt-in limit per block, or above the figure the launcher's
pruning assumed for it. The table is printed (``pytest -s`` or
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
    for arch, kb in ((75, 64), (86, 99), (89, 99), (90, 227)):
        assert not gpu_compile.problems({**row, "arch": arch, "shared": kb * 1024})
        assert gpu_compile.problems({**row, "arch": arch, "shared": kb * 1024 + 1})
    assert gpu_compile.problems({**row, "shared": 4096, "estimate": 4095})
    assert not gpu_compile.problems({**row, "shared": 4096, "estimate": 4096})


def test_parse_sass_mix():
    text = """
        Function : _fwd_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0450*/              @!P0 LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR4][R2.64] ;
        /*0460*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0470*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0480*/               @P1 FFMA R3, R4, R5, R3 ;
        /*0490*/                   FFMA.FTZ R3, R4, R5, R3 ;
        /*04a0*/                   UTMALDG.2D [UR8], [UR4] ;
        /*04b0*/                   FMUL R3, R4, R5 ;
"""
    assert gpu_compile.parse_sass_mix(text) == {"hgmma": 1, "hmma": 1, "ldgsts": 1, "tma": 1,
                                                "ffma": 2}  # fmt: skip


def test_every_kernel_module_has_compile_targets():
    """A new kernels/<op>.py (lce.py) is compiled by the check below only through this hook."""
    for name in gpu_compile.kernel_modules():
        mod = __import__(f"fastcap.kernels.{name}", fromlist=["compile_targets"])
        assert callable(getattr(mod, "compile_targets", None)), f"kernels/{name}.py"


@pytest.mark.slow
def test_every_kernel_compiles_without_spills(tmp_path):
    """All kernels, all configs, sm_75 (fp16), sm_80, sm_86, sm_89 and sm_90 (fp16 and bf16): no
    spill, shared memory within the limit and within the pruning's figure. As many compile
    processes as CPUs (at least 2); about 2 s per distinct compile on an idle core."""
    if not (NVIDIA / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton build has no NVIDIA backend or no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "gpu_compile.py"),
            "--jobs",
            str(max(2, os.cpu_count() or 2)),
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
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
    # Every kernel of every module on every architecture from sm_80, in both dtypes; on sm_75
    # (fp16) exactly the kernels the dispatch lets run there: the LCE's, which has no tl.dot.
    seen = {(r["name"], r["arch"], r["dtype"]) for r in rows}
    names = {r["name"] for r in rows}
    want = {(n, a, d) for n in names for a in (80, 86, 89, 90) for d in ("fp16", "bf16")}
    want |= {(n, 75, "fp16") for n in names if n.startswith("lce.")}
    assert seen == want, sorted(seen ^ want)
    assert not any(r["shared"] > gpu_compile.SHARED_LIMIT[r["arch"]] for r in rows)
    # the instruction mix is read: tensor cores from sm_80 (HGMMA or HMMA in every attention
    # fwd row), none on sm_75
    for r in rows:
        if r["name"] == "attention.fwd":
            assert r["hgmma"] + r["hmma"] > 0, r
        if r["arch"] == 75:
            assert r["hgmma"] == r["hmma"] == 0, r
    for kernel in ("attention.fwd", "attention.dkdv", "attention.dq", "moe.gate_up",
                   "moe.slots_to_pairs", "moe.down_bwd", "moe.expert_wgrad", "siglip.fwd",
                   "siglip.bwd"):  # fmt: skip
        assert kernel in names, kernel
    for module in gpu_compile.kernel_modules():
        assert any(n.split(".")[0] == module for n in names), module
